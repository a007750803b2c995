"""`edgepack build` proves the runtime it ships loads the model: a model newer than that
onnxruntime is converted down (and the image's own onnxruntime loads and runs the result, under
podman) or refused with exit 10 and the numbers, before anything is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.backends.linux.backend import runtime_requirements
from packager.tools.containers import PODMAN
from tests.integration.conftest import build_json, edgepack

pytestmark = pytest.mark.integration

PINNED = next(r.partition("==")[2] for r in runtime_requirements() if r.startswith("onnxruntime=="))
WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def model(path: Path, *, ir: int, opset: int) -> Path:
    """x [1, 4] -> Relu(x) @ W [1, 3], stamped with the given IR version and opset. No
    onnx.checker: onnx 1.23 itself refuses IR 20 ("higher than the checker's")."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        "newer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(WEIGHT, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir
    onnx.save(proto, path)
    return path


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """podman with its own storage: the test neither sees nor leaves images elsewhere."""
    root = tmp_path_factory.mktemp("podman")
    flags = ["--root", str(root / "storage"), "--runroot", str(root / "run")]
    flags += ["--storage-driver", "vfs"]
    yield flags
    PODMAN.run([*flags, "system", "reset", "--force"], check=False)


def test_opset_30_is_refused_with_the_numbers_and_nothing_written(tmp_path: Path) -> None:
    source = model(tmp_path / "opset30.onnx", ir=11, opset=30)
    out = tmp_path / "bundle"
    proc = edgepack(
        "build", str(source), "--target", "industrial-pc", "--out", str(out), "--json",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 10, proc.stdout + proc.stderr
    document = json.loads(proc.stdout)
    message = document["message"]
    assert document["error"] == "unsupported"
    assert "opset30.onnx" in message and "IR version 11" in message and "ai.onnx 30" in message
    assert f"onnxruntime {PINNED}" in message and "IR <= 14" in message
    assert "ai.onnx opset <= 28" in message
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


@pytest.mark.slow
def test_ir_20_is_converted_and_the_images_onnxruntime_runs_it(
    tmp_path: Path, edgepack_cache: Path, podman: list[str]
) -> None:
    source = model(tmp_path / "newer.onnx", ir=20, opset=21)
    doc = build_json(
        str(source), "--target", "industrial-pc", "--name", "newer", "--version", "1.0.0",
        "--out", str(tmp_path / "bundle"), "--cache-dir", str(edgepack_cache),
    )  # fmt: skip
    bundle = Path(doc["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    notes = manifest["model"]["runtime_compatibility"]
    assert any(f"IR version lowered from 20 to 14 for onnxruntime {PINNED}" in n for n in notes)

    # The proof that matters: the onnxruntime inside the image loads the bundled model and
    # answers as the source model means.
    PODMAN.run([*podman, "load", "-i", str(bundle / "image.tar")], timeout=600)
    script = (
        "import numpy as np, onnxruntime as ort\n"
        "m = '/opt/edgepack/model/newer.onnx'\n"
        "s = ort.InferenceSession(m, providers=['CPUExecutionProvider'])\n"
        "x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)\n"
        "print(ort.__version__, *s.run(None, {'x': x})[0].ravel().tolist())\n"
    )
    proc = PODMAN.run(
        [*podman, "run", "--rm", "--runtime", "runc", "--network", "none",
         "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
         "--entrypoint", "/usr/bin/python3.11", "docker.io/edgepack/newer:1.0.0", "-c", script],
        timeout=600,
    )  # fmt: skip
    version, *values = proc.stdout.decode().split()
    assert version == PINNED
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_allclose([float(v) for v in values], (np.maximum(x, 0) @ WEIGHT).ravel())
