"""packager.models.onnx_tflite: the graph normalisation before onnx2torch (checked with real
onnxruntime sessions: the normalised model must compute what the original does), the operator
check that names what no converter handles, and the agreement gate (real LiteRT interpreter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.errors import AccuracyError, UnsupportedError
from packager.models import onnx_tflite

ort = pytest.importorskip("onnxruntime")

TFLM_DIR = Path(__file__).resolve().parents[4] / "shared" / "testdata" / "tflm"


def _model(nodes: list[Any], inits: list[Any], x: list[Any], y: list[Any], opset: int = 13,
           ir: int = 8, inputs_extra: list[Any] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x), *(inputs_extra or [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _run(model: onnx.ModelProto, x: Any) -> Any:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _awkward() -> onnx.ModelProto:
    """SAME_UPPER and SAME_LOWER at stride 2 on odd sizes, a ConstantOfShape-built weight, an
    inference Dropout and a MatMul+Add head."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([3, 2, 3, 3], np.int64), "w_shape"),
        numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w_noise"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
        numpy_helper.from_array(rng.normal(size=(12, 5)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(5,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["w_shape"], ["ones"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]),
        ),
        helper.make_node("Mul", ["ones", "w_noise"], ["w"]),
        helper.make_node(
            "Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2]
        ),
        helper.make_node(
            "MaxPool", ["c"], ["p"], auto_pad="SAME_LOWER", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Dropout", ["p"], ["d"]),
        helper.make_node("Reshape", ["d", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["m"]),
        helper.make_node("Add", ["b2", "m"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 2, 7, 7], ["N", 5])


def test_normalize_computes_what_the_original_does() -> None:
    model = _awkward()
    normal = onnx_tflite.normalize(model, {"x": (1, 2, 7, 7)})
    onnx.checker.check_model(normal)
    ops = [n.op_type for n in normal.graph.node]
    assert "ConstantOfShape" not in ops and "Mul" not in ops  # folded into an initializer
    assert "Dropout" not in ops and "MatMul" not in ops and ops.count("Gemm") == 1
    assert not any(a.name == "auto_pad" for n in normal.graph.node for a in n.attribute)
    dims = [d.dim_value for d in normal.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 2, 7, 7]
    x = np.random.default_rng(1).normal(size=(1, 2, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(normal, x), _run(model, x), rtol=1e-5, atol=1e-5)
    # The caller's model is left as it was.
    assert model.graph.node[0].op_type == "ConstantOfShape"


def test_normalize_drops_initializers_listed_as_inputs() -> None:
    """IR 3 models (the onnx backend tests' light models) list every initializer as an input."""
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "w")
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"])], [w], [1, 1, 2, 2], [1, 1, 2, 2],
        opset=7, ir=3,
        inputs_extra=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 1, 1, 1])],
    )
    assert [t.name for t in onnx_tflite.graph_inputs(model)] == ["x"]
    normal = onnx_tflite.normalize(model, {"x": (1, 1, 2, 2)})
    assert [v.name for v in normal.graph.input] == ["x"] and normal.ir_version >= 4


def test_old_opsets_are_raised_to_one_onnx2torch_converts() -> None:
    model = _model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        [], [1, 1, 4, 4], [1, 1, 2, 2], opset=7, ir=3,
    )
    onnx_tflite._onnx2torch()
    assert onnx_tflite.unconvertible_ops(model) == ["MaxPool (opset 7)"]
    upgraded = onnx_tflite.convertible(model, Path("old.onnx"))
    assert onnx_tflite.unconvertible_ops(upgraded) == []
    x = np.random.default_rng(2).normal(size=(1, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(upgraded, x), _run(model, x))


def test_operator_without_converter_is_named() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ThresholdedRelu", ["r"], ["y"])],
        [], [1, 4], [1, 4],
    )
    onnx_tflite._onnx2torch()
    with pytest.raises(UnsupportedError) as caught:
        onnx_tflite.convertible(model, Path("m.onnx"))
    assert caught.value.exit_code == 10
    assert "ThresholdedRelu (opset 13)" in str(caught.value) and "Relu," not in str(caught.value)


def test_agreement_gate_fails_a_model_that_computes_something_else(tmp_path: Path) -> None:
    """hello_world_int8.tflite (sin x) checked against an ONNX model computing -x: the real
    LiteRT interpreter runs it and the gate refuses with exit 11 naming the output."""
    data = (TFLM_DIR / "hello_world_int8.tflite").read_bytes()
    model = _model([helper.make_node("Neg", ["x"], ["y"])], [], [1, 1], [1, 1])
    path = tmp_path / "neg.onnx"
    onnx.save(model, path)
    rows = [(np.array([[v]], np.float32),) for v in np.linspace(0.1, 6.2, 16)]
    with pytest.raises(AccuracyError) as caught:
        onnx_tflite.agreement(path, ["x"], rows, data)
    assert caught.value.exit_code == 11 and "'y' cosine" in str(caught.value)


def test_agreement_passes_the_same_computation(tmp_path: Path) -> None:
    data = (TFLM_DIR / "hello_world_int8.tflite").read_bytes()
    model = _model([helper.make_node("Sin", ["x"], ["y"])], [], [1, 1], [1, 1])
    path = tmp_path / "sin.onnx"
    onnx.save(model, path)
    rows = [(np.array([[v]], np.float32),) for v in np.linspace(0.1, 6.2, 16)]
    (result,) = onnx_tflite.agreement(path, ["x"], rows, data)
    assert result.name == "y" and result.cosine >= 0.98 and result.top1_agreement is None


def test_folding_never_builds_a_huge_constant() -> None:
    """A ConstantOfShape asking for 2**40 floats stays in the graph (its converter decides)
    instead of being evaluated: normalising a hostile model must not allocate without bound."""
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "s")
    model = _model(
        [
            helper.make_node("ConstantOfShape", ["s"], ["big"]),
            helper.make_node("Add", ["x", "x"], ["y"]),
        ],
        [shape], [1, 4], [1, 4],
    )
    normal = onnx_tflite.normalize(model, {"x": (1, 4)})
    assert [n.op_type for n in normal.graph.node] == ["ConstantOfShape", "Add"]
