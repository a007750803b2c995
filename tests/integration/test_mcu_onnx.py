"""ONNX -> fully int8 TFLite (onnx2torch, litert-torch PT2E) -> TFLM project, through the CLI.

The converted model is run in the LiteRT and TensorFlow Lite Micro interpreters and compared with
onnxruntime running the ONNX model it came from; the build's own agreement check is read back
from the manifest. Also: `edgepack inspect` reads the Keras formats `build` converts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.models.tflite import analyze_tflite
from tests.integration.conftest import edgepack, litert_int8_outputs
from tests.integration.mcu_models import assert_int8_agrees, build_int8_bundle
from tests.model_factory import sample_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ort = pytest.importorskip("onnxruntime")
SHARED = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "onnx"


def _cnn(path: Path, *, tail: str = "Softmax") -> None:
    """x[N,1,8,8] -> Conv(SAME_UPPER, weights from ConstantOfShape+Mul) -> Add -> Relu ->
    MaxPool -> Dropout -> Reshape(0,-1) -> MatMul+Add -> ``tail`` -> y[N,4], at opset 11: the
    forms exporters write that a converter must normalise (auto_pad, constant sub-graphs,
    inference Dropout, run-time Reshape shapes, MatMul+Add, a pre-opset-13 Softmax)."""
    rng = np.random.default_rng(0)
    init = [
        numpy_helper.from_array(np.array([4, 1, 3, 3], np.int64), "w_shape"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w_noise"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 4, 1, 1)).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
        numpy_helper.from_array(rng.normal(0, 0.3, (64, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["w_shape"], ["w_one"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("Mul", ["w_one", "w_noise"], ["w1"]),
        helper.make_node("Conv", ["x", "w1"], ["c"], auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("Add", ["c", "b1"], ["cb"]),
        helper.make_node("Relu", ["cb"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Dropout", ["p"], ["d"]),
        helper.make_node("Reshape", ["d", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["z"]),
        helper.make_node(tail, ["z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-mcu")
    _cnn(root / "cnn.onnx")
    _cnn(root / "shrink.onnx", tail="ThresholdedRelu")
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 1, size=(32, 1, 8, 8)).astype(np.float32)
    pixels = (rng.uniform(0, 1, (32, 1, 28, 28)) * 255).astype(np.float32)
    return {
        "cnn": root / "cnn.onnx",
        "shrink": root / "shrink.onnx",
        "calibration": sample_dir(root / "calibration", set=rows),
        "digits": sample_dir(root / "digits", set=pixels),
    }


def _reference(model: Path, x: Any) -> Any:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: row[None]})[0] for row in x])


def _tflm_outputs(data: bytes, arena: int, x: Any) -> Any:
    """Rows through the TensorFlow Lite Micro interpreter (what the board runs), with the
    model's own int8 quantization parameters."""
    from tflite_micro.python.tflite_micro import runtime

    analysis = analyze_tflite(data, "converted")
    (i_scale,), (i_zero,) = analysis.inputs[0].quant.scales, analysis.inputs[0].quant.zero_points
    (o_scale,), (o_zero,) = (
        analysis.outputs[0].quant.scales,
        analysis.outputs[0].quant.zero_points,
    )
    interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena)
    rows = []
    for sample in x:
        q = np.clip(np.round(sample / i_scale + i_zero), -128, 127).astype(np.int8)
        interpreter.set_input(q.reshape(analysis.inputs[0].shape), 0)
        interpreter.invoke()
        out = np.array(interpreter.get_output(0)).astype(np.float32)
        rows.append(((out - o_zero) * o_scale).reshape(1, -1))
    return np.concatenate(rows)


def _build(model: Path, calibration: Path, out: Path) -> tuple[Path, dict[str, Any], bytes]:
    bundle, manifest, tflite = build_int8_bundle(model, "nrf52840-dk", calibration, out)
    return bundle, manifest, tflite.read_bytes()


def _assert_int8_throughout(data: bytes) -> None:
    analysis = analyze_tflite(data, "converted")
    assert analysis.float_tensors == ()
    assert {t.dtype for t in analysis.inputs + analysis.outputs} == {"int8"}


def test_generated_onnx_cnn_to_int8_tflm_project(
    onnx_models: dict[str, Path], tmp_path: Path
) -> None:
    bundle, manifest, data = _build(
        onnx_models["cnn"], onnx_models["calibration"], tmp_path / "bundle"
    )
    _assert_int8_throughout(data)
    # The build's own agreement check, reported in the manifest.
    check = manifest["model"]["conversion"]["check"]
    assert "onnx2torch" in manifest["model"]["conversion"]["route"]
    (output,) = check["outputs"]
    assert check["rows"] == 32 and output["name"] == "y"
    assert output["cosine"] >= check["min_cosine"] >= 0.98
    resolver = (bundle / "src" / "op_resolver.h").read_text()
    # A one-channel convolution is written as DEPTHWISE_CONV_2D; the Softmax is int8 too.
    for kernel in ("AddDepthwiseConv2D", "AddFullyConnected", "AddSoftmax"):
        assert kernel in resolver, kernel
    # Fresh inputs, three engines: onnxruntime (the ONNX model), LiteRT and TFLM (the bundle's).
    x = np.random.default_rng(1).uniform(0, 1, size=(16, 1, 8, 8)).astype(np.float32)
    reference = _reference(onnx_models["cnn"], x)
    for converted in (
        litert_int8_outputs(bundle / "model" / "cnn.tflite", x),
        _tflm_outputs(data, int(manifest["device"]["arena_bytes"]), x),
    ):
        assert_int8_agrees(converted, reference, mean_error=0.02, agreement=0.8)
    assert edgepack("verify", str(bundle)).returncode == 0


def test_mnist_onnx_reads_the_handwritten_eight_on_tflm(
    onnx_models: dict[str, Path], tmp_path: Path
) -> None:
    """The shared mnist.onnx (opset 7, SAME_UPPER convolutions, MatMul head), as the issue
    filed it: builds for nrf52840-dk and, in TFLM, reads the shared handwritten 8 as 8."""
    bundle, manifest, data = _build(
        SHARED / "mnist.onnx", onnx_models["digits"], tmp_path / "mnist"
    )
    _assert_int8_throughout(data)
    (output,) = manifest["model"]["conversion"]["check"]["outputs"]
    assert output["cosine"] >= 0.98
    digit = np.loadtxt(SHARED / "media" / "mnist_28.csv", delimiter=",", dtype=np.float32)
    arena = int(manifest["device"]["arena_bytes"])
    scores = _tflm_outputs(data, arena, digit.reshape(1, 1, 28, 28))
    assert int(scores.argmax()) == 8
    assert edgepack("verify", str(bundle)).returncode == 0


def test_onnx_operator_without_conversion_is_named(
    onnx_models: dict[str, Path], tmp_path: Path
) -> None:
    proc = edgepack(
        "build", str(onnx_models["shrink"]), "--target", "nrf52840-dk",
        "--calibration", str(onnx_models["calibration"]), "--out", str(tmp_path / "b"),
        check=False,
    )
    assert proc.returncode == 10, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "ThresholdedRelu" in errors[0]
    assert "Keras" not in proc.stderr
    assert not (tmp_path / "b").exists()


def _inspect(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(edgepack("inspect", str(path), "--json").stdout)
    return document


def test_inspect_reads_every_format_build_converts(tmp_path: Path) -> None:
    """.keras, a SavedModel directory and a .pt2 program: `build` takes them all (to int8
    TFLite), so `inspect` must too (it exited 10 on .keras; .h5 shares the .keras inspector)."""
    tf = pytest.importorskip("tensorflow")
    torch = pytest.importorskip("torch")
    model = tf.keras.Sequential(
        [tf.keras.Input(shape=(8,), name="features"), tf.keras.layers.Dense(4)]
    )
    model.save(tmp_path / "net.keras")
    model.export(str(tmp_path / "saved"))
    for name in ("net.keras", "saved"):
        info = _inspect(tmp_path / name)
        assert info["format"] == "keras", name
        assert [t["shape"] for t in info["inputs"]] == [[None, 8]], name
        assert [t["shape"] for t in info["outputs"]] == [[None, 4]], name
        assert info["param_count"] == 8 * 4 + 4, name
    assert _inspect(tmp_path / "net.keras")["op_histogram"] == {"Dense": 1}
    net = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    program = torch.export.export(net, (torch.zeros(1, 8),))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    info = _inspect(tmp_path / "net.pt2")
    assert info["format"] == "pytorch" and info["param_count"] == 8 * 4 + 4
    assert [t["shape"] for t in info["inputs"]] == [[1, 8]]
    assert [t["shape"] for t in info["outputs"]] == [[1, 4]]


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a hostile torch.save file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.marker),))


def test_inspect_never_unpickles_a_torch_save_file(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Payload(marker)))
    info = _inspect(tmp_path / "evil.pt")
    assert info["format"] == "pytorch" and "not unpickled" in info["notes"][0]
    assert not marker.exists()
