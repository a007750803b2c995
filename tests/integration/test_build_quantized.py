"""`edgepack build --quantize`: the optimize pipeline inside the build, recorded in the manifest,
and the quantized model served by the real runtime in the real image."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from tests.integration.conftest import REPO, build_json, free_port
from tests.process_guard import Processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _eight(onnx_dir: Path) -> np.ndarray:
    eight = np.loadtxt(onnx_dir / "media" / "mnist_28.csv", delimiter=",", dtype=np.float32)
    return eight.reshape(1, 1, 28, 28)


def test_int8_static_bundle_serves_the_quantized_model(
        onnx_dir: Path, edgepack_cache: Path, tmp_path: Path, processes: Processes,
        cleanup_containers: list[str]) -> None:
    eight = _eight(onnx_dir)
    rng = np.random.default_rng(1)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    shifted = [np.roll(eight, tuple(rng.integers(-3, 4, size=2)), axis=(2, 3)) for _ in range(16)]
    np.save(calibration / "set.npy", np.concatenate(shifted))
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    np.savez(evaluation / "eight.npz", Input3=eight, label=np.array([8]))

    doc = build_json(str(onnx_dir / "mnist.onnx"), "--target", "industrial-pc",
                     "--quantize", "int8-static", "--calibration", str(calibration),
                     "--eval", str(evaluation), "--out", str(tmp_path / "bundle"),
                     "--version", "1.0.0", "--cache-dir", str(edgepack_cache))
    manifest = json.loads((Path(doc["bundle"]) / "manifest.json").read_text())
    report = manifest["optimization"]
    assert report, "the optimization report is recorded in the manifest"
    source_digest = subprocess.run(
        [sys.executable, "-m", "packager", "inspect", str(onnx_dir / "mnist.onnx"), "--json"],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert manifest["model"]["digest"] != json.loads(source_digest.stdout)["digest"]
    assert manifest["model"]["size_bytes"] < (onnx_dir / "mnist.onnx").stat().st_size

    port = free_port()
    cleanup_containers.append(f"edgepack-run-{manifest['name']}-{port}")  # if `run` is killed
    proc = processes.own(subprocess.Popen([sys.executable, "-m", "packager", "run", doc["bundle"],
                                           "--port", str(port)], cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=60.0)
        deadline = time.monotonic() + 300
        while True:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "runtime not ready"
            time.sleep(1)
        tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(eight, binary_data=True)
        result = client.infer("mnist", [tensor])
        output = client.get_model_metadata("mnist")["outputs"][0]["name"]
        assert int(np.argmax(result.as_numpy(output))) == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_target_preferred_precision_applies_unless_overridden(
        onnx_dir: Path, edgepack_cache: Path, repo_root: Path, tmp_path: Path) -> None:
    text = (repo_root / "targets" / "industrial-pc.toml").read_text()
    board = tmp_path / "fp16-board.toml"
    board.write_text(text.replace('name = "industrial-pc"', 'name = "fp16-board"').replace(
        "intra_op_threads = 4", 'intra_op_threads = 4\npreferred_precision = "fp16"'))
    common = ["--target", str(board), "--version", "1.0.0", "--cache-dir", str(edgepack_cache)]
    preferred = build_json(str(onnx_dir / "mnist.onnx"), *common, "--out", str(tmp_path / "a"))
    manifest = json.loads((Path(preferred["bundle"]) / "manifest.json").read_text())
    assert manifest["optimization"]["quantize"] == "fp16"
    kept = build_json(str(onnx_dir / "mnist.onnx"), *common, "--quantize", "fp32",
                      "--out", str(tmp_path / "b"))
    manifest = json.loads((Path(kept["bundle"]) / "manifest.json").read_text())
    assert "optimization" not in manifest
    assert manifest["model"]["size_bytes"] == (onnx_dir / "mnist.onnx").stat().st_size
