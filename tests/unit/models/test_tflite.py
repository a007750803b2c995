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
        if theirs.quantization is not None and theirs.quantization.scale is not None:
            assert mine.quant is not None
            assert mine.quant.scales == pytest.approx(list(theirs.quantization.scale))
            assert list(mine.quant.zero_points) == list(theirs.quantization.zeroPoint)
    assert analysis.size_bytes == len(data)


def test_hello_world_is_int8_with_published_shapes() -> None:
    info = inspect_tflite(TFLM / "hello_world_int8.tflite")
    assert info.format == "tflite"
    assert [(t.dtype, t.shape) for t in info.inputs] == [("int8", (1, 1))]
    assert [(t.dtype, t.shape) for t in info.outputs] == [("int8", (1, 1))]
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
