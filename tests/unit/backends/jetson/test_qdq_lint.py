"""The Q/DQ lint against edgepack's real TensorRT INT8 output of mnist.onnx and single-fault
mutations of it. TensorRT itself is not installable here: the rules stand in for its ONNX parser
and are sourced in packager/backends/jetson/qdq_lint.py. Every mutation except the opset one is
still a valid model that real onnxruntime loads: only TensorRT would refuse it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from packager.backends.jetson.qdq_lint import (
    Finding,
    check_qdq,
    lint_qdq,
    parser_profile,
    rules_broken,
)
from packager.errors import ExitCode, InputError, UnsupportedError
from tests.unit.backends.jetson.int8_models import tensorrt_int8

VERSIONS = ("8.2.1", "8.5.2", "8.6.2", "10.3.0")  # the Jetson targets' and JetPack 6.1's


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> ModelProto:
    path, _ = tensorrt_int8(tmp_path_factory.mktemp("int8"))
    return onnx.load(str(path))


def _copy(model: ModelProto) -> ModelProto:
    copied = ModelProto()
    copied.CopyFrom(model)
    return copied


def _node(model: ModelProto, op: str, tensor: str) -> NodeProto:
    return next(n for n in model.graph.node if n.op_type == op and n.input[0] == tensor)


def _init(model: ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _replace_init(model: ModelProto, array: np.ndarray, name: str) -> None:
    model.graph.initializer.remove(_init(model, name))
    model.graph.initializer.append(numpy_helper.from_array(array, name))


def _set_axis(node: NodeProto, axis: int) -> None:
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("axis", axis)])


def _activation_pair(model: ModelProto, tensor: str) -> tuple[NodeProto, NodeProto]:
    q = _node(model, "QuantizeLinear", tensor)
    return q, _node(model, "DequantizeLinear", q.output[0])


def _weight_pair(model: ModelProto, weight: str) -> tuple[NodeProto, NodeProto]:
    return _activation_pair(model, weight)


# --- mutations: each breaks exactly one rule -------------------------------------------------


def nonzero_zero_point(model: ModelProto) -> None:
    q, _ = _activation_pair(model, "ReLU32_Output_0")
    _replace_init(model, np.array(3, np.int8), q.input[2])


def per_channel_activation(model: ModelProto) -> None:
    # Plus30_Output_0 is the first Conv's [1, 8, 24, 24] output: 8 scales along the channels.
    q, dq = _activation_pair(model, "Plus30_Output_0")
    scale = float(numpy_helper.to_array(_init(model, q.input[1])))
    scales, zeros = np.full(8, scale, np.float32), np.zeros(8, np.int8)
    for node, suffix in ((q, "q"), (dq, "dq")):
        names = (f"pc_scale_{suffix}", f"pc_zp_{suffix}")
        model.graph.initializer.extend(
            [numpy_helper.from_array(scales, names[0]), numpy_helper.from_array(zeros, names[1])]
        )
        node.input[1], node.input[2] = names
        _set_axis(node, 1)


def wrong_axis(model: ModelProto) -> None:
    # Parameter87 is the second Conv's [16, 8, 5, 5] weight: 8 scales on the input channels.
    q, dq = _weight_pair(model, "Parameter87")
    weight = numpy_helper.to_array(_init(model, "Parameter87"))
    scales = (np.abs(weight).max(axis=(0, 2, 3)) / 127).astype(np.float32)
    for node in (q, dq):
        _replace_init(model, scales, node.input[1])
        _replace_init(model, np.zeros(8, np.int8), node.input[2])
        _set_axis(node, 1)


def uint8_activation(model: ModelProto) -> None:
    q, _ = _activation_pair(model, "ReLU114_Output_0")
    _replace_init(model, np.array(0, np.uint8), q.input[2])


def quantized_bias(model: ModelProto) -> None:
    # The first Conv's float bias becomes int32 -> DequantizeLinear, as onnxruntime writes it
    # with QuantizeBias=True: scale = input scale * per-channel weight scale, zero point 0.
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias_name = conv.input[2]
    bias = numpy_helper.to_array(_init(model, bias_name))
    x_dq = next(n for n in model.graph.node if n.output[0] == conv.input[0])
    w_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    scale = (
        numpy_helper.to_array(_init(model, x_dq.input[1]))
        * numpy_helper.to_array(_init(model, w_dq.input[1]))
    ).astype(np.float32)
    quantized = np.round(bias / scale).astype(np.int32)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, "bias_q"),
            numpy_helper.from_array(scale, "bias_scale"),
            numpy_helper.from_array(np.zeros_like(quantized), "bias_zp"),
        ]
    )
    dq = helper.make_node(
        "DequantizeLinear", ["bias_q", "bias_scale", "bias_zp"], ["bias_dq"], "bias_DQ", axis=0
    )
    model.graph.node.insert(0, dq)
    conv.input[2] = "bias_dq"


def opset_12(model: ModelProto) -> None:
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 12


def qlinear_conv(model: ModelProto) -> None:
    # DQ(x) -> Conv(., DQ(Q(W)), B) -> Q(y) becomes QLinearConv(x_q, ..., W_q, ..., B_int32).
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    x_dq = next(n for n in model.graph.node if n.output[0] == conv.input[0])
    w_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    w_q = next(n for n in model.graph.node if n.output[0] == w_dq.input[0])
    y_q = next(n for n in model.graph.node if n.input and n.input[0] == conv.output[0])
    weight = numpy_helper.to_array(_init(model, w_q.input[0]))
    w_scale = numpy_helper.to_array(_init(model, w_q.input[1]))
    x_scale = numpy_helper.to_array(_init(model, x_dq.input[1]))
    w_int = np.clip(np.round(weight / w_scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    bias = numpy_helper.to_array(_init(model, conv.input[2]))
    b_int = np.round(bias / (x_scale * w_scale)).astype(np.int32)
    model.graph.initializer.extend(
        [numpy_helper.from_array(w_int, "w_int8"), numpy_helper.from_array(b_int, "b_int32")]
    )
    qconv = helper.make_node(
        "QLinearConv",
        [x_dq.input[0], x_dq.input[1], x_dq.input[2], "w_int8", w_q.input[1], w_q.input[2],
         y_q.input[1], y_q.input[2], "b_int32"],
        [y_q.output[0]],
        "Conv1_QLinear",
    )
    qconv.attribute.extend(conv.attribute)
    index = list(model.graph.node).index(conv)
    for dead in (conv, x_dq, w_dq, w_q, y_q):
        model.graph.node.remove(dead)
    model.graph.node.insert(min(index, len(model.graph.node)), qconv)
    # Topological order again: QLinearConv after the Q that makes x_q.
    nodes = list(model.graph.node)
    x_q = next(n for n in nodes if x_dq.input[0] in n.output)
    nodes.remove(qconv)
    nodes.insert(nodes.index(x_q) + 1, qconv)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


MUTATIONS: dict[str, tuple[Callable[[ModelProto], None], str]] = {
    "non-zero zero point": (nonzero_zero_point, "zero-point-nonzero"),
    "per-channel activations": (per_channel_activation, "activation-per-channel"),
    "wrong axis": (wrong_axis, "weight-axis"),
    "uint8": (uint8_activation, "uint8"),
    "quantized bias": (quantized_bias, "quantized-bias"),
    "opset 12": (opset_12, "opset-min"),
    "QLinearConv": (qlinear_conv, "qoperator"),
}


def _runs(model: ModelProto, path: Path) -> None:
    """The mutated model is valid ONNX that real onnxruntime loads and runs."""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"Input3": np.full((1, 1, 28, 28), 100, np.float32)})
    assert out.shape == (1, 10)


def test_edgepacks_tensorrt_int8_output_passes_every_version(int8_model: ModelProto) -> None:
    quantized = [n for n in int8_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(quantized) >= 8  # the lint had something to judge
    for version in VERSIONS:
        assert lint_qdq(int8_model, version, sm=87) == (), version


@pytest.mark.parametrize("case", list(MUTATIONS))
@pytest.mark.parametrize("version", VERSIONS)
def test_each_mutation_breaks_exactly_its_rule(
    int8_model: ModelProto, case: str, version: str, tmp_path: Path
) -> None:
    mutate, rule = MUTATIONS[case]
    model = _copy(int8_model)
    mutate(model)
    if case != "opset 12":  # per-channel axis attributes are not valid opset 12
        _runs(model, tmp_path / "mutated.onnx")
    findings = lint_qdq(model, version)
    assert rules_broken(findings) == (rule,), [f.line() for f in findings]
    assert all(f.severity == "error" for f in findings)


def test_findings_name_the_node_and_tensor(int8_model: ModelProto) -> None:
    model = _copy(int8_model)
    wrong_axis(model)
    (finding,) = [f for f in lint_qdq(model, "8.6.2") if f.rule == "weight-axis"]
    assert finding.tensor == "Parameter87"
    assert finding.node.endswith("DequantizeLinear")
    assert "axis 1" in finding.message and "output-channel axis 0" in finding.message


def test_check_qdq_refuses_with_one_line_and_exit_10(
    int8_model: ModelProto, tmp_path: Path
) -> None:
    model = _copy(int8_model)
    uint8_activation(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedError) as caught:
        check_qdq(path, "8.6.2")
    line = caught.value.one_line()
    assert caught.value.exit_code == ExitCode.UNSUPPORTED
    assert "\n" not in line
    assert line.startswith("bad.onnx: TensorRT 8.6 would refuse this model: [uint8] node '")
    assert "ReLU114_Output_0" in line and "int8" in line
    assert all(d.startswith("[uint8]") for d in caught.value.details)
    good = tmp_path / "good.onnx"
    onnx.save(int8_model, str(good))
    assert check_qdq(good, "8.6.2") == ()


# --- per-version differences -----------------------------------------------------------------


def _prequantized_weight(model: ModelProto, data_type: int) -> None:
    """Parameter87 as a pre-quantized int4 / fp8 initializer straight into DequantizeLinear."""
    q, dq = _weight_pair(model, "Parameter87")
    weight = numpy_helper.to_array(_init(model, "Parameter87"))
    scales = numpy_helper.to_array(_init(model, q.input[1]))
    levels = 7 if data_type == TensorProto.INT4 else 448
    values = np.clip(weight / (scales.reshape(-1, 1, 1, 1) * 127 / levels), -levels, levels)
    if data_type == TensorProto.INT4:
        values = np.round(values)
    model.graph.initializer.extend(
        [
            helper.make_tensor("w_low", data_type, weight.shape, values.reshape(-1).tolist()),
            helper.make_tensor("w_low_zp", data_type, [16], [0] * 16),
            numpy_helper.from_array((scales * 127 / levels).astype(np.float32), "w_low_scale"),
        ]
    )
    dq.input[0], dq.input[1], dq.input[2] = "w_low", "w_low_scale", "w_low_zp"
    model.graph.node.remove(q)
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 21


def test_int4_weights_only_from_tensorrt_10(int8_model: ModelProto) -> None:
    model = _copy(int8_model)
    _prequantized_weight(model, TensorProto.INT4)
    onnx.checker.check_model(model)
    assert rules_broken(lint_qdq(model, "8.6.2")) == ("opset-max", "quant-type")
    assert rules_broken(lint_qdq(model, "10.3.0")) == ("opset-max",)  # 21 > 20: a warning
    assert all(f.severity == "warning" for f in lint_qdq(model, "10.3.0"))


def test_fp8_needs_tensorrt_10_and_an_ada_gpu(int8_model: ModelProto) -> None:
    model = _copy(int8_model)
    _prequantized_weight(model, TensorProto.FLOAT8E4M3FN)
    onnx.checker.check_model(model)
    errors = lambda v, sm: rules_broken(  # noqa: E731
        [f for f in lint_qdq(model, v, sm=sm) if f.severity == "error"]
    )
    assert errors("8.6.2", 87) == ("quant-type",)
    assert errors("10.3.0", 87) == ("fp8-sm",)  # Orin: compute capability 8.7
    assert errors("10.3.0", 89) == ()


def test_a_missing_zero_point_is_refused_by_8x_only(int8_model: ModelProto) -> None:
    model = _copy(int8_model)
    q, dq = _activation_pair(model, "Pooling66_Output_0")
    for node in (q, dq):
        del node.input[2]
    onnx.checker.check_model(model)
    assert rules_broken(lint_qdq(model, "8.2.1")) == ("zero-point-missing",)
    assert lint_qdq(model, "10.3.0") == ()


def test_int8_weights_without_a_q_are_a_warning_on_8x(int8_model: ModelProto) -> None:
    model = _copy(int8_model)
    q, dq = _weight_pair(model, "Parameter87")
    weight = numpy_helper.to_array(_init(model, "Parameter87"))
    scales = numpy_helper.to_array(_init(model, q.input[1])).reshape(-1, 1, 1, 1)
    model.graph.initializer.append(
        numpy_helper.from_array(np.round(weight / scales).astype(np.int8), "w_int8")
    )
    dq.input[0] = "w_int8"
    model.graph.node.remove(q)
    findings: tuple[Finding, ...] = lint_qdq(model, "8.6.2")
    assert rules_broken(findings) == ("weight-form",)
    assert findings[0].severity == "warning"
    assert lint_qdq(model, "10.3.0") == ()


def test_parser_profiles_follow_onnx_tensorrts_operator_tables() -> None:
    assert parser_profile("8.2.1").max_opset == 13
    assert parser_profile("8.5.2").max_opset == 17
    assert parser_profile("8.6.2").max_opset == 17
    assert parser_profile("10.3.0").max_opset == 20
    assert parser_profile("8.6.2").zero_point_required
    assert not parser_profile("10.3.0").zero_point_required


# '8.²' and '٨.6' pass str.isdigit(): int() refused the first (an internal error).
@pytest.mark.parametrize("version", ["8", "eight.six", "8.6.2\n", "", "8.²", "٨.6", "8.6.+2"])
def test_a_malformed_tensorrt_version_is_an_input_error(version: str) -> None:
    with pytest.raises(InputError):
        parser_profile(version)


def test_an_unreadable_model_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputError, match=r"broken\.onnx"):
        lint_qdq(path, "8.6.2")


def _qdq_model(scale: TensorProto, zero_point: TensorProto) -> ModelProto:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero_point])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _short_raw() -> TensorProto:
    tensor = TensorProto(name="zp", data_type=TensorProto.INT8, dims=[4])
    tensor.raw_data = b"\x01"  # 1 byte for 4 elements
    return tensor


SCALE = numpy_helper.from_array(np.array(0.1, np.float32), "s")
ZERO = numpy_helper.from_array(np.array(0, np.int8), "zp")


@pytest.mark.parametrize(
    ("scale", "zero_point", "tensor"),
    [
        (SCALE, helper.make_tensor("zp", TensorProto.STRING, [], [b"a"]), "zp"),
        (SCALE, _short_raw(), "zp"),
        (SCALE, TensorProto(name="zp", data_type=999), "zp"),
        (helper.make_tensor("s", TensorProto.STRING, [], [b"x"]), ZERO, "s"),
    ],
)
def test_a_malformed_constant_is_an_input_error_naming_the_tensor(
    scale: TensorProto, zero_point: TensorProto, tensor: str
) -> None:
    """Before: numpy's ValueError / KeyError escaped (an internal error, exit 1)."""
    with pytest.raises(InputError, match=f"tensor '{tensor}': a malformed constant"):
        lint_qdq(_qdq_model(scale, zero_point), "8.6.2", sm=87)


def test_a_dequantize_without_an_output_is_linted_not_an_index_error() -> None:
    weight = numpy_helper.from_array(np.zeros(4, np.int32), "w")
    zero = numpy_helper.from_array(np.array(0, np.int32), "zp")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s", "zp"], [])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight, SCALE, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert rules_broken(lint_qdq(model, "8.6.2")) == ("quantized-bias",)
