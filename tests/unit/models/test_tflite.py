"""The TFLite analysis against an independent parse (tflite-micro's schema module) and against
damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.errors import InputError
from packager.models.tflite import analyze_tflite, inspect_tflite, read_tflite

TFLM = Path(__file__).resolve().parents[4] / "shared" / "testdata" / "tflm"
MODELS = sorted(TFLM.glob("*.tflite"))


def independent(data: bytes) -> object:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    return fb, fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(data, 0))


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_ops_tensors_and_quantization_match_the_schema(path: Path) -> None:
    data, analysis = read_tflite(path)
    fb, root = independent(data)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if isinstance(v, int)}  # type: ignore[attr-defined]
    sg = root.subgraphs[0]  # type: ignore[attr-defined]
    used = {}
    for g in root.subgraphs:  # type: ignore[attr-defined]
        for op in g.operators:
            code = root.operatorCodes[op.opcodeIndex]  # type: ignore[attr-defined]
            key = (names[max(code.builtinCode, code.deprecatedBuiltinCode)], code.version)
            used[key] = used.get(key, 0) + 1
    assert {(o.name, o.version): o.count for o in analysis.ops} == used
    assert [t.index for t in analysis.inputs] == list(sg.inputs)
    assert [t.index for t in analysis.outputs] == list(sg.outputs)
    for mine, theirs in zip(analysis.tensors, sg.tensors, strict=True):
        shape = theirs.shape if theirs.shape is not None else []
        assert mine.shape == tuple(int(d) for d in shape)
        signature = theirs.shapeSignature if theirs.shapeSignature is not None else shape
        assert mine.signature == tuple(int(d) for d in signature)
        if theirs.quantization is not None and theirs.quantization.scale is not None:
            assert mine.quant is not None
            assert mine.quant.scales == pytest.approx(list(theirs.quantization.scale))
            assert list(mine.quant.zero_points) == list(theirs.quantization.zeroPoint)
    assert analysis.size_bytes == len(data)


def test_hello_world_is_int8_with_published_shapes() -> None:
    """hello_world's batch is dynamic (shape_signature [-1, 1]; stored shape [1, 1])."""
    info = inspect_tflite(TFLM / "hello_world_int8.tflite")
    assert info.format == "tflite"
    assert [(t.dtype, t.shape) for t in info.inputs] == [("int8", (None, 1))]
    assert [(t.dtype, t.shape) for t in info.outputs] == [("int8", (None, 1))]
    assert info.op_histogram == {"FULLY_CONNECTED": 3}
    assert info.digest.startswith("sha256:") and info.size_bytes == 2704


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 3],
        lambda d: d[:4] + b"XXXX" + d[8:],
        lambda d: d[:8] + bytes(b ^ 0xA5 for b in d[8:64]) + d[64:],
        lambda d: b"",
    ],
    ids=["truncated", "wrong-identifier", "scrambled-root", "empty"],
)
def test_corrupt_model_is_one_input_error_naming_the_file(damage: object) -> None:
    data = (TFLM / "micro_speech_quantized.tflite").read_bytes()
    with pytest.raises(InputError) as err:
        analyze_tflite(damage(data), "broken.tflite")  # type: ignore[operator]
    line = err.value.one_line()
    assert line.startswith("broken.tflite: ") and "\n" not in line


def _keras_tflite(batch_size: int | None) -> bytes:
    """A real converted model: Keras Input(shape=(4,)) -> Dense(3), batch ``batch_size``
    (None: dynamic), through tf.lite.TFLiteConverter."""
    tf = pytest.importorskip("tensorflow")
    inputs = tf.keras.Input(shape=(4,), batch_size=batch_size)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(inputs))
    data: bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    return data


@pytest.fixture(scope="module")
def dynamic_batch() -> bytes:
    return _keras_tflite(None)


def test_a_dynamic_batch_is_reported_dynamic_and_sized_as_stored(
    dynamic_batch: bytes, tmp_path: Path
) -> None:
    """The converter stores a dynamic batch as 1 in ``shape`` and -1 in ``shape_signature``:
    inspect (and the manifest, which takes ModelInfo) says dynamic (None, as the Keras
    inspector says for the same model), while sizes and TFLite Micro keep the stored 1."""
    analysis = analyze_tflite(dynamic_batch, "dyn.tflite")
    (x,), (y,) = analysis.inputs, analysis.outputs
    assert (x.shape, x.signature, x.dynamic_axes) == ((1, 4), (-1, 4), (0,))
    assert (y.shape, y.signature, y.dynamic_axes) == ((1, 3), (-1, 3), (0,))
    assert (x.elements, y.elements) == (4, 3)  # never negative, never the -1
    assert x.to_json()["shape"] == [1, 4] and x.to_json()["shape_signature"] == [-1, 4]
    assert analysis.activation_bytes == (4 + 3) * 4  # float32 input and output, batch 1
    path = tmp_path / "dyn.tflite"
    path.write_bytes(dynamic_batch)
    info = inspect_tflite(path)
    assert [t.shape for t in info.inputs] == [(None, 4)] and info.inputs[0].is_dynamic
    assert [t.shape for t in info.outputs] == [(None, 3)]
    assert info.to_json()["inputs"] == [
        {"name": x.name, "dtype": "float32", "shape": [None, 4]}
    ]


def test_a_fixed_batch_is_reported_fixed() -> None:
    analysis = analyze_tflite(_keras_tflite(1), "fixed.tflite")
    (x,) = analysis.inputs
    assert (x.shape, x.signature, x.dynamic_axes) == ((1, 4), (1, 4), ())


def test_a_signature_that_disagrees_with_the_shape_is_corrupt(dynamic_batch: bytes) -> None:
    """A forged shape_signature (7 where 1 is stored) is refused, never reported."""
    stored = (2).to_bytes(4, "little") + (-1).to_bytes(4, "little", signed=True)
    stored += (4).to_bytes(4, "little")
    assert dynamic_batch.count(stored) == 1
    forged = dynamic_batch.replace(stored, stored[:4] + (7).to_bytes(4, "little") + stored[8:])
    with pytest.raises(InputError, match=r"^forged\.tflite: corrupt TFLite flatbuffer"):
        analyze_tflite(forged, "forged.tflite")
