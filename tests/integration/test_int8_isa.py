"""INT8 that is right on the target's CPU (issue 10, kind 4).

A Conv -> Resize(linear) -> Conv model quantized static QDQ without ``reduce_range`` saturates
onnxruntime's int8 kernels on x86 without VNNI (VPMADDUBSW's 16-bit sums): measured cosine 0.972
and 90% top-1 agreement against FP32 on an AVX2 CPU without VNNI, 0.9999 with ``reduce_range``.
The industrial-pc target (x86-64-v2, no VNNI) must get ``reduce_range``, and its report must say
which CPU its figures come from. This host may have VNNI (AVX-512 VNNI on an AMD EPYC), so the
test computes the bundle's model itself on an AVX2-without-VNNI CPU: qemu-user's Haswell-v4.

For an arm64 target, the build measures the model inside the target's image under qemu on the
target's CPU model (rpi4: cortex-a72).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from tests.integration.conftest import REPO, build_json
from tests.model_factory import float_model
from tests.oci_files import model_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QEMU_X86 = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
NO_VNNI_CPU = "Haswell-v4"  # AVX2 without VNNI: onnxruntime's saturating int8 kernels
_RUN = """
import sys, numpy as np, onnxruntime as ort
model, feeds, out = sys.argv[1:]
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
x = np.load(feeds)
np.save(out, np.stack([s.run(None, {"x": row[None]})[0][0] for row in x]))
"""


def upsample_model(directory: Path) -> tuple[Path, Path, Path]:
    """The model, 16 calibration and 30 held-out uniform [-1, 1] inputs (seeded)."""
    rng = np.random.default_rng(1)
    channels = 32
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((10, channels, 3, 3)) * 0.15).astype(np.float32)
    b2 = (rng.standard_normal(10) * 0.1).astype(np.float32)
    scales = np.array([1, 1, 2, 2], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c1", "", "scales"], ["r"], mode="linear"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    path = float_model(
        directory / "upsample.onnx",
        nodes,
        {"x": [1, 3, 16, 16]},
        {"y": [1, 10]},
        {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "scales": scales},
        name="upsample",
    )
    calibration, evaluation = directory / "cal", directory / "eval"
    calibration.mkdir()
    evaluation.mkdir()
    for i in range(16):
        np.save(calibration / f"{i:02d}.npy", rng.uniform(-1, 1, (1, 3, 16, 16)).astype("f4"))
    for i in range(30):
        np.save(evaluation / f"{i:02d}.npy", rng.uniform(-1, 1, (1, 3, 16, 16)).astype("f4"))
    return path, calibration, evaluation


def agreement(fp32: Any, candidate: Any) -> tuple[float, float]:
    cosine = np.sum(fp32 * candidate, axis=1) / (
        np.linalg.norm(fp32, axis=1) * np.linalg.norm(candidate, axis=1)
    )
    top1 = np.mean(fp32.argmax(axis=1) == candidate.argmax(axis=1))
    return float(cosine.mean()), float(top1)


def host_cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith("model name"):
            return " ".join(line.partition(":")[2].split())
    raise AssertionError("no model name in /proc/cpuinfo")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or QEMU_X86 is None,
    reason="needs an x86-64 host with qemu-user-static (apt-get install qemu-user-static)",
)
def test_industrial_pc_int8_is_right_on_a_cpu_without_vnni(
    edgepack_cache: Path, tmp_path: Path
) -> None:
    model, calibration, evaluation = upsample_model(tmp_path)
    doc = build_json(
        str(model), "--target", "industrial-pc", "--quantize", "int8-static",
        "--calibration", str(calibration), "--eval", str(evaluation),
        "--out", str(tmp_path / "bundle"), "--version", "1.0.0",
        "--cache-dir", str(edgepack_cache),
    )  # fmt: skip
    bundle = Path(doc["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = manifest["optimization"]
    assert report["settings"]["reduce_range"] is True, report["settings"]
    assert "industrial-pc" in report["settings"]["chosen_for"]

    # The model the image ships, computed on an AVX2 CPU without VNNI (emulated), vs FP32 here.
    name = Path(report["model"]).name
    (tmp_path / "shipped").mkdir()
    shipped = model_files(bundle / "image.tar", (name,), tmp_path / "shipped")[name]
    x = np.concatenate([np.load(p) for p in sorted(evaluation.glob("*.npy"))])
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(_RUN)
    assert QEMU_X86 is not None
    subprocess.run(
        [QEMU_X86, "-cpu", NO_VNNI_CPU, sys.executable, str(tmp_path / "run.py"), str(shipped),
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True, capture_output=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    fp32 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = np.stack([fp32.run(None, {"x": row[None]})[0][0] for row in x])
    cosine, top1 = agreement(expected, np.load(tmp_path / "y.npy"))
    assert cosine >= 0.999 and top1 >= 0.95, (cosine, top1)

    # The report: the gate's figure is from those kernels, and it names the CPU it ran on.
    final = report["variants"][-1]["metrics"]
    assert final["cosine_similarity"] >= 0.999
    assert abs(final["cosine_similarity"] - cosine) < 1e-4  # the same kernels as measured above
    measured = report["measured_on"]
    assert host_cpu_name() in measured["host_cpu"]
    if "avx512_vnni" in Path("/proc/cpuinfo").read_text():
        assert measured["accuracy_emulated_cpu"] == NO_VNNI_CPU
        assert "emulated" in measured["accuracy"] and "industrial-pc" in measured["accuracy"]
    else:
        assert "natively" in measured["accuracy"]


def test_rpi4_int8_is_measured_in_its_image_on_a_cortex_a72(
    arm64_emulation: None, edgepack_cache: Path, tmp_path: Path
) -> None:
    model, calibration, evaluation = upsample_model(tmp_path)
    doc = build_json(
        str(model), "--target", "rpi4", "--quantize", "int8-static",
        "--calibration", str(calibration), "--eval", str(evaluation),
        "--name", "edgepack-test-isa", "--out", str(tmp_path / "bundle"),
        "--version", "1.0.0", "--cache-dir", str(edgepack_cache),
    )  # fmt: skip
    report = json.loads((Path(doc["bundle"]) / "manifest.json").read_text())["optimization"]
    assert report["settings"]["reduce_range"] is False  # ARM: no saturation (onnxruntime docs)
    on_target = report["on_target"]
    assert on_target["cpu"] == "cortex-a72"
    assert "rpi4's image" in on_target["measured_on"]
    assert report["measured_on"]["accuracy"] == on_target["measured_on"]
    metrics = on_target["metrics"]
    assert metrics["samples"] == 30 and metrics["cosine_similarity"] >= 0.999
    assert report["variants"][-1]["metrics"] == metrics
    # The host's own figure (other kernels) is kept beside it.
    assert report["variants"][-1]["host_metrics"]["samples"] == 30
    # The build leaves no container behind, nor the image it loaded for the measurement.
    listed = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "edgepack-eval-" not in listed
    images = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}"], capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout  # fmt: skip
    assert "edgepack-test-isa" not in images
