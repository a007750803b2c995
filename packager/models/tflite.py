"""TFLite flatbuffer analysis: tensors, quantization parameters and the exact operator list.

Parsed with the ``tflite`` package (the flatbuffers-generated Python API of TensorFlow Lite's
``schema.fbs``; pure Python, ~2 MB, no TensorFlow needed). The desktop interpreter is deliberately
not used: it rejects some models TFLite Micro runs, and analysis must work without it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tflite  # type: ignore[import-untyped]

from packager.errors import InputError
from packager.models.info import Dim, ModelInfo, TensorInfo, by_frequency

# TFLite's file identifier, stored at bytes 4..8 of every model.
FILE_IDENTIFIER = b"TFL3"

_BUILTIN_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(tflite.BuiltinOperator).items()
    if not name.startswith("_") and isinstance(value, int)
}
_CUSTOM_CODE: int = int(tflite.BuiltinOperator.CUSTOM)

# TensorType name -> numpy dtype spelling (ModelInfo's convention).
_DTYPES: dict[str, str] = {
    "FLOAT32": "float32",
    "FLOAT16": "float16",
    "FLOAT64": "float64",
    "BFLOAT16": "bfloat16",
    "INT4": "int4",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
    "STRING": "string",
    "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
    "RESOURCE": "resource",
    "VARIANT": "variant",
}
_TYPE_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(tflite.TensorType).items()
    if not name.startswith("_") and isinstance(value, int)
}


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``."""

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int

    @property
    def per_tensor(self) -> bool:
        return len(self.scales) == 1

    def to_json(self) -> dict[str, object]:
        return {
            "scales": list(self.scales),
            "zero_points": list(self.zero_points),
            "quantized_dimension": self.quantized_dimension,
        }


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of subgraph 0 as the flatbuffer declares it: ``shape`` as stored, the concrete
    dims an interpreter allocates (a dynamic dim is stored as 1), ``signature`` the declared
    shape (``shape_signature``: -1 per dynamic dim; ``shape`` when the file has none),
    ``dtype`` in numpy spelling, ``constant_bytes`` its buffer's size (0: activation).

    Sizes (``elements``, the activation estimate) and TFLite Micro use ``shape``: TFLM allocates
    and runs exactly the stored dims and never reads ``shape_signature``
    (tensorflow/lite/micro/micro_allocator.cc, ``FlatBufferVectorToTfLiteTypeArray(
    flatbuffer_tensor.shape())``). What a model *accepts* (inspect, the manifest) is
    ``signature``. Source: TensorFlow Lite's schema.fbs, ``Tensor.shape_signature``."""

    index: int
    name: str
    dtype: str  # numpy spelling
    shape: tuple[int, ...]
    signature: tuple[int, ...]  # shape_signature: -1 per dynamic dim
    quant: QuantParams | None
    constant_bytes: int  # size of the tensor's buffer data; 0 for activations
    is_variable: bool

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        """The axes ``signature`` declares dynamic (-1), in order."""
        return tuple(axis for axis, dim in enumerate(self.signature) if dim < 0)

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim if dim >= 0 else 1  # -1 (dynamic) counts as 1, a 0 dim as empty
        return count

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "shape_signature": list(self.signature),
            "quantization": self.quant.to_json() if self.quant else None,
        }


@dataclass(frozen=True)
class TfliteOp:
    """One operator code the model uses: a builtin (by schema name) or a custom op."""

    name: str  # builtin name ("FULLY_CONNECTED") or the custom code ("TFLite_Detection_...")
    version: int
    custom: bool
    count: int  # how many nodes in all subgraphs use this code

    @property
    def label(self) -> str:
        return f"{'custom:' if self.custom else ''}{self.name} v{self.version}"


@dataclass(frozen=True)
class TfliteModel:
    """What :func:`analyze_tflite` read from one flatbuffer: the file's size (bytes) and sha256
    (hex), subgraph 0's tensors, the operator codes every subgraph uses; ``weights_bytes`` and
    ``param_count`` sum subgraph 0's constant tensors, ``activation_bytes`` is the estimated peak
    of its live activations (bytes; the TFLM arena measured on the target is the real figure)."""

    schema_version: int
    description: str
    size_bytes: int
    sha256: str
    subgraph_count: int
    tensors: tuple[TfliteTensor, ...]  # subgraph 0 (the one the interpreter runs)
    inputs: tuple[TfliteTensor, ...]
    outputs: tuple[TfliteTensor, ...]
    ops: tuple[TfliteOp, ...]  # sorted by (custom, name, version)
    weights_bytes: int
    param_count: int
    activation_bytes: int
    # Operators (subgraph 0) that read or write a float activation, QUANTIZE/DEQUANTIZE aside
    # (they only convert): what an int8-only target cannot run, by name.
    float_op_names: tuple[str, ...] = ()

    @property
    def builtin_op_names(self) -> tuple[str, ...]:
        return tuple(sorted({op.name for op in self.ops if not op.custom}))

    @property
    def custom_op_names(self) -> tuple[str, ...]:
        return tuple(sorted({op.name for op in self.ops if op.custom}))

    @property
    def float_tensors(self) -> tuple[TfliteTensor, ...]:
        """Non-constant float tensors: a sign the model is not fully integer-quantized."""
        return tuple(
            t
            for t in self.tensors
            if t.dtype.startswith("float") and t.constant_bytes == 0 and t.elements > 0
        )


def _builtin_code(opcode: Any) -> int:
    # Schema 3a moved builtin codes >127 to a new int32 field; old files only fill the
    # deprecated int8 one. The larger of the two is the real code (as upstream readers do).
    return max(int(opcode.BuiltinCode()), int(opcode.DeprecatedBuiltinCode()))


def _quant(tensor: Any) -> QuantParams | None:
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    return QuantParams(
        scales=tuple(float(q.Scale(i)) for i in range(q.ScaleLength())),
        zero_points=tuple(int(q.ZeroPoint(i)) for i in range(q.ZeroPointLength())),
        quantized_dimension=int(q.QuantizedDimension()),
    )


def _buffer_bytes(model: Any, index: int) -> int:
    if index <= 0 or index >= model.BuffersLength():
        return 0  # buffer 0 is the schema's "no data" sentinel
    buffer = model.Buffers(index)
    if buffer.Size() > 0:  # data stored outside the flatbuffer (models over 2 GB)
        return int(buffer.Size())
    return int(buffer.DataLength())


def _signature(t: Any, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The tensor's ``shape_signature`` when the file has one, else ``shape``. The converter
    writes it with the stored shape's rank, -1 where a dim is dynamic and the stored dim
    elsewhere; anything else is a damaged or forged file (ValueError)."""
    if t.ShapeSignatureLength() == 0:
        return shape
    signature = tuple(int(t.ShapeSignature(i)) for i in range(t.ShapeSignatureLength()))
    if len(signature) != len(shape) or any(
        d != -1 and d != s for d, s in zip(signature, shape, strict=True)
    ):
        raise ValueError(f"tensor {index}: shape_signature {signature} disagrees with {shape}")
    return signature


def _tensor(model: Any, subgraph: Any, index: int) -> TfliteTensor:
    t = subgraph.Tensors(index)
    type_name = _TYPE_NAMES.get(int(t.Type()), f"TYPE_{t.Type()}")
    name = t.Name()
    shape = tuple(int(t.Shape(i)) for i in range(t.ShapeLength()))
    return TfliteTensor(
        index=index,
        name=name.decode("utf-8", "replace") if name else f"tensor_{index}",
        dtype=_DTYPES.get(type_name, type_name.lower()),
        shape=shape,
        signature=_signature(t, index, shape),
        quant=_quant(t),
        constant_bytes=_buffer_bytes(model, int(t.Buffer())),
        is_variable=bool(t.IsVariable()),
    )


_ITEM_BYTES = {"int4": 1, "int8": 1, "uint8": 1, "bool": 1, "int16": 2, "uint16": 2,
               "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "uint64": 8,
               "complex64": 8, "complex128": 16}


def _nbytes(t: TfliteTensor) -> int:
    return t.elements * _ITEM_BYTES.get(t.dtype, 4)


def _peak_activations(subgraph: Any, tensors: tuple[TfliteTensor, ...]) -> int:
    """Peak bytes of simultaneously live activation tensors in execution order (an estimate;
    the TFLM planner's real figure comes from measuring the arena)."""
    last_use: dict[int, int] = {}
    first_def: dict[int, int] = {}
    count = subgraph.OperatorsLength()
    for i in range(subgraph.InputsLength()):
        first_def[int(subgraph.Inputs(i))] = -1
    for step in range(count):
        op = subgraph.Operators(step)
        for j in range(op.InputsLength()):
            last_use[int(op.Inputs(j))] = step
        for j in range(op.OutputsLength()):
            first_def.setdefault(int(op.Outputs(j)), step)
    for i in range(subgraph.OutputsLength()):
        last_use[int(subgraph.Outputs(i))] = count
    peak = 0
    for step in range(-1, count + 1):
        live = sum(
            _nbytes(tensors[idx])
            for idx, start in first_def.items()
            if 0 <= idx < len(tensors) and tensors[idx].constant_bytes == 0
            and start <= step <= last_use.get(idx, start)
        )
        peak = max(peak, live)
    return peak


def analyze_tflite(data: bytes, source: str) -> TfliteModel:
    """Parse a TFLite flatbuffer; raise InputError naming ``source`` when it is not one."""
    if len(data) < 8 or data[4:8] != FILE_IDENTIFIER:
        raise InputError(
            f"{source}: not a TFLite model (no '{FILE_IDENTIFIER.decode()}' file identifier)",
            hint="pass a .tflite flatbuffer produced by the TFLite converter",
        )
    try:
        return _analyze(data)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{source}: corrupt TFLite flatbuffer ({type(exc).__name__} while reading it)",
            hint="re-export the model; the file is truncated or damaged",
        ) from exc


def _analyze(data: bytes) -> TfliteModel:
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() < 1:
        raise ValueError("no subgraphs")
    codes: list[tuple[str, int, bool]] = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = _builtin_code(oc)
        if code == _CUSTOM_CODE:
            raw = oc.CustomCode()
            codes.append((raw.decode("utf-8", "replace") if raw else "?", int(oc.Version()), True))
        else:
            codes.append((_BUILTIN_NAMES.get(code, f"BUILTIN_{code}"), int(oc.Version()), False))
    uses: Counter[int] = Counter()
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for k in range(sg.OperatorsLength()):
            index = int(sg.Operators(k).OpcodeIndex())
            if not 0 <= index < len(codes):
                raise ValueError(f"operator {k} names opcode {index}")
            uses[index] += 1
    merged: Counter[tuple[str, int, bool]] = Counter()
    for index, count in uses.items():
        merged[codes[index]] += count
    ops = tuple(
        TfliteOp(name=n, version=v, custom=c, count=merged[(n, v, c)])
        for n, v, c in sorted(merged, key=lambda k: (k[2], k[0], k[1]))
    )
    main = model.Subgraphs(0)
    tensors = tuple(_tensor(model, main, i) for i in range(main.TensorsLength()))
    inputs = tuple(tensors[int(main.Inputs(i))] for i in range(main.InputsLength()))
    outputs = tuple(tensors[int(main.Outputs(i))] for i in range(main.OutputsLength()))
    constants = [t for t in tensors if t.constant_bytes > 0]
    description = model.Description()
    float_ops: set[str] = set()
    for k in range(main.OperatorsLength()):
        op = main.Operators(k)
        name = codes[int(op.OpcodeIndex())][0]
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        used = [int(op.Inputs(j)) for j in range(op.InputsLength())]
        used += [int(op.Outputs(j)) for j in range(op.OutputsLength())]
        if any(
            0 <= i < len(tensors)
            and tensors[i].dtype.startswith("float")
            and tensors[i].constant_bytes == 0
            for i in used
        ):
            float_ops.add(name)
    return TfliteModel(
        schema_version=int(model.Version()),
        description=description.decode("utf-8", "replace") if description else "",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        subgraph_count=int(model.SubgraphsLength()),
        tensors=tensors,
        inputs=inputs,
        outputs=outputs,
        ops=ops,
        weights_bytes=sum(t.constant_bytes for t in constants),
        param_count=sum(t.elements for t in constants),
        activation_bytes=_peak_activations(main, tensors),
        float_op_names=tuple(sorted(float_ops)),
    )


def read_tflite(path: Path) -> tuple[bytes, TfliteModel]:
    """The file's bytes and their analysis."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: model file not found", hint="check the path") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the model ({exc.strerror})") from exc
    return data, analyze_tflite(data, str(path))


def _dims(t: TfliteTensor) -> tuple[Dim, ...]:
    """The declared shape as ModelInfo spells it: a dynamic (-1) dim is None (unknown: TFLite
    has no dim names), as the ONNX and Keras inspectors report theirs."""
    return tuple(None if d < 0 else d for d in t.signature)


def to_model_info(path: Path, analysis: TfliteModel) -> ModelInfo:
    """The :class:`ModelInfo` of an analysed ``.tflite``: opsets ``{"tflite_schema": version}``,
    node counts by operator name over every subgraph, the model's description as producer
    (None when empty), one note per operator code (``op NAME vN xCOUNT``). Input and output
    shapes are the declared ones (``shape_signature``: None per dynamic dim); the sizes are
    the stored shapes' (dynamic dims taken as stored, 1)."""
    histogram = Counter[str]()
    for op in analysis.ops:
        histogram[op.name] += op.count
    return ModelInfo(
        path=path,
        format="tflite",
        digest=f"sha256:{analysis.sha256}",
        size_bytes=analysis.size_bytes,
        inputs=tuple(TensorInfo(t.name, t.dtype, _dims(t)) for t in analysis.inputs),
        outputs=tuple(TensorInfo(t.name, t.dtype, _dims(t)) for t in analysis.outputs),
        opsets={"tflite_schema": analysis.schema_version},
        op_histogram=by_frequency(histogram),
        param_count=analysis.param_count,
        weights_bytes=analysis.weights_bytes,
        activation_bytes=analysis.activation_bytes,
        producer=analysis.description or None,
        notes=tuple(f"op {op.label} x{op.count}" for op in analysis.ops),
    )


def inspect_tflite(path: Path) -> ModelInfo:
    """The inspector for ``.tflite`` files (registered in ``packager.models.INSPECTORS``)."""
    _, analysis = read_tflite(path)
    return to_model_info(path, analysis)
