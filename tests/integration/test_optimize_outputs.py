"""`edgepack optimize` judges every output: a two-output model whose second output INT8 ruins
fails the gate naming that output, through the CLI, with real onnxruntime quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli_runner import run_cli

pytestmark = pytest.mark.integration

FEATURES = 16
CLASSES = 4


def two_output_model(path: Path, *, second: bool = True) -> Path:
    """``scores`` [1, 4]: x times a class-selecting matrix (INT8 keeps it).
    ``features`` [1, 2, 4]: x with a constant 1e4 appended, times weights that ignore that
    constant. FP32 never sees the constant in the result; INT8's dynamic activation range
    stretches to 1e4, so every real value of x rounds to zero: the output is ruined."""
    rng = np.random.default_rng(0)
    select = np.zeros((FEATURES, CLASSES), np.float32)
    select[np.arange(CLASSES), np.arange(CLASSES)] = 1.0
    select += rng.normal(0, 0.05, select.shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "select"], ["scores"])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, CLASSES])]
    initializers = [numpy_helper.from_array(select, "select")]
    if second:
        mix = rng.normal(0, 1, (FEATURES + 1, 8)).astype(np.float32)
        mix[-1] = 0.0  # the constant column contributes nothing in FP32
        nodes += [
            helper.make_node("Concat", ["x", "offset"], ["h"], axis=1),
            helper.make_node("MatMul", ["h", "mix"], ["flat"]),
            helper.make_node("Reshape", ["flat", "shape"], ["features"]),
        ]
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 2, 4]))
        initializers += [
            numpy_helper.from_array(np.full((1, 1), 1e4, np.float32), "offset"),
            numpy_helper.from_array(mix, "mix"),
            numpy_helper.from_array(np.array([1, 2, 4], np.int64), "shape"),
        ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURES])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def eval_set(directory: Path, count: int = 40) -> Path:
    """Held-out inputs: class k is a strong value in feature k, plus noise."""
    rng = np.random.default_rng(1)
    directory.mkdir()
    for i in range(count):
        x = rng.normal(0, 0.3, (1, FEATURES)).astype(np.float32)
        x[0, i % CLASSES] += 3.0
        np.save(directory / f"{i:03d}.npy", x)
    return directory


GATE = ["--min-top1-agreement", "0.95", "--max-accuracy-drop", "0.05"]


def optimize(model: Path, evaluation: Path, out: Path, *extra: str) -> list[str]:
    return [
        "optimize",
        str(model),
        "--quantize",
        "int8-dynamic",
        "--eval",
        str(evaluation),
        "--latency-runs",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_a_ruined_second_output_fails_the_gate_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluation = eval_set(tmp_path / "eval")
    both = two_output_model(tmp_path / "two.onnx")
    first_only = two_output_model(tmp_path / "one.onnx", second=False)

    # The first output alone passes this gate...
    code, out, err = run_cli([*optimize(first_only, evaluation, tmp_path / "one"), *GATE], capsys)
    assert code == 0, err

    # ...the model with the ruined second output does not, and the error names it.
    code, out, err = run_cli(
        [*optimize(both, evaluation, tmp_path / "two"), *GATE, "--json"], capsys
    )
    assert code == 11, out + err
    document = json.loads(out)
    assert document["error"] == "accuracy"
    message = document["message"]
    assert "output 'features' (not a score vector)" in message
    assert "relative error" in message and "cosine similarity" in message
    assert "output 'scores'" not in message  # the first output is within the gate
    assert not (tmp_path / "two").exists()

    # Without a gate the report measures both outputs and says which are score vectors.
    code, out, err = run_cli([*optimize(both, evaluation, tmp_path / "report"), "--json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "optimize-report.json").read_text())
    metrics = report["variants"][-1]["metrics"]
    by_name = {o["name"]: o for o in metrics["outputs"]}
    assert set(by_name) == {"scores", "features"}
    assert by_name["scores"]["score_vector"] and by_name["scores"]["top1_agreement"] >= 0.95
    assert not by_name["features"]["score_vector"]
    assert by_name["features"]["top1_agreement"] is None
    assert by_name["features"]["relative_error"] > 0.5
    assert by_name["features"]["cosine_similarity"] < 0.95
    assert report["evaluation"]["worst_output"] == "features"
    assert report["evaluation"]["score_vector_outputs"] == ["scores"]
    markdown = (tmp_path / "report" / "optimize-report.md").read_text()
    assert "## Outputs" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| int8-dynamic |")]
    assert any("| features | no | cosine and relative error |" in r for r in rows), rows
    assert any("| scores | yes | top-1 agreement |" in r for r in rows), rows
