"""Models too large for one protobuf go through `edgepack optimize` (and the build's optimize
step) with their weights in external data, in every precision, and the results run in
onnxruntime.

A real 2.16 GB weight needs several copies of itself in memory on the way (load, quantize,
save): minutes and well over 8 GB on the 2-core CI machine. So these tests lower
``packager.models.onnx_save.INLINE_LIMIT_BYTES`` (what every optimizer save reads) to 256 KiB
and use a 1 MiB weight; tests/unit/models/test_onnx_save.py proves with a real 2 GiB model that
protobuf's own limit is what sends a model down this path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.calibration import MIN_CALIBRATION_SAMPLES
from packager.models import onnx_save
from packager.optimize import optimize_for_build
from tests.cli_runner import run_cli

pytestmark = pytest.mark.integration

ROWS, COLS = 256, 1024  # a 1 MiB float32 weight


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    limit = 256 * 1024
    monkeypatch.setattr(onnx_save, "INLINE_LIMIT_BYTES", limit)
    return limit


def matmul_model(directory: Path) -> tuple[Path, np.ndarray]:
    """The issue's shape of model: one MatMul whose weight lives in an external data file."""
    weight = np.random.default_rng(0).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COLS])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, location="big.weights")
    return path, weight


def samples(directory: Path, count: int = MIN_CALIBRATION_SAMPLES) -> Path:
    """``count`` calibration rows (the fewest the calibration rules take)."""
    rng = np.random.default_rng(1)
    directory.mkdir()
    for i in range(count):
        np.save(directory / f"{i}.npy", rng.normal(0, 1, (1, ROWS)).astype(np.float32))
    return directory


def assert_runs_close(model: Path, weight: np.ndarray, limit: int) -> None:
    """The model file stays under the limit, its weights in NAME.data beside it; it loads in
    onnxruntime and computes x @ w within INT8/FP16 error."""
    files = onnx_save.model_files(model)
    assert files == (model, model.with_name(model.name + ".data")), files
    assert model.stat().st_size < limit
    x = np.random.default_rng(2).normal(0, 1, (1, ROWS)).astype(np.float32)
    got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = x @ weight
    cosine = float(np.sum(got[0] * want) / (np.linalg.norm(got[0]) * np.linalg.norm(want)))
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("quantize", ["int8-dynamic", "int8-static", "fp16"])
def test_optimize_writes_large_models_with_external_data(
    quantize: str, tmp_path: Path, small_limit: int, capsys: pytest.CaptureFixture[str]
) -> None:
    source, weight = matmul_model(tmp_path / "src")
    out = tmp_path / "out"
    args = ["optimize", str(source), "--quantize", quantize, "--latency-runs", "1"]
    if quantize == "int8-static":
        args += ["--calibration", str(samples(tmp_path / "cal"))]
    code, stdout, err = run_cli([*args, "--out", str(out), "--json"], capsys)
    assert code == 0, stdout + err
    document = json.loads(stdout)
    model = Path(document["model"])
    assert model.parent == out and model.name == f"big.{quantize}.onnx"
    assert_runs_close(model, weight, small_limit)
    # Sizes count the weights too, not just the small model file.
    fp32, final = document["variants"][0], document["variants"][-1]
    assert fp32["size_bytes"] > weight.nbytes
    # (Measured before the copy into --out renamed the data file, which the model names.)
    assert abs(final["size_bytes"] - onnx_save.total_size(model)) < 64
    assert final["size_bytes"] > weight.size  # at least one byte per weight
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [model.name, model.name + ".data", "optimize-report.json", "optimize-report.md",
         "optimize-report.png"]
    )  # fmt: skip


def test_opset_conversion_of_a_large_model_keeps_external_data(
    tmp_path: Path, small_limit: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """An opset-9 source is converted to 13 (per-channel QDQ) before quantization: the converter
    serializes its input, so the weights must not travel inline."""
    source, weight = matmul_model(tmp_path / "src")
    model = onnx.load(str(source), load_external_data=True)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 9))
    onnx.save(model, source, save_as_external_data=True, location="big9.weights")
    code, stdout, err = run_cli(
        ["optimize", str(source), "--quantize", "int8-static", "--calibration",
         str(samples(tmp_path / "cal")), "--latency-runs", "1", "--out", str(tmp_path / "out"),
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, stdout + err
    assert any("convert opset 9 -> 13" in s for s in json.loads(stdout)["steps"])
    assert_runs_close(Path(json.loads(stdout)["model"]), weight, small_limit)


def test_the_build_optimize_step_returns_a_model_with_its_data(
    tmp_path: Path, small_limit: int
) -> None:
    """`edgepack build --quantize` runs this step; the bundle is then built from its result."""
    source, weight = matmul_model(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    model, report = optimize_for_build(source, "int8-dynamic", None, None, work)
    assert_runs_close(model, weight, small_limit)
    assert report["model"] == "big.int8-dynamic.onnx"
