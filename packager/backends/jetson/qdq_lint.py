"""Does TensorRT's ONNX parser take this explicitly quantized (Q/DQ) model? A lint per TensorRT
version that names the rule, the node and the tensor a parser or builder would refuse, before a
bundle carries a model that only fails on the device, minutes into its first boot.

The rules and where they come from (onnx/onnx-tensorrt at its 8.2 / 8.5 / 8.6-EA / 10.0 / 10.1
release commits: ``docs/operators.md`` and ``QuantDequantLinearHelper`` in
``builtin_op_importers.cpp`` / ``onnxOpImporters.cpp``; NVIDIA's TensorRT developer guide,
"Explicit Quantization"):

``opset-min``
    Q/DQ need default-domain opset >= 13. Guide: "ONNX introduced support for QuantizeLinear
    and DequantizeLinear in opset 10, and a quantization-axis attribute was added in opset 13
    (required for per-channel quantization)".
``opset-max`` (warning)
    Newer opsets than the parser was released for: "TensorRT 8.2 supports operators up to
    Opset 13", 8.5 / 8.6 "up to Opset 17", 10.0 "the inclusive range of opset 9 to opset 20".
    The parser does not refuse the file, but operators newer than that may not import.
``qoperator``
    Integer-operator quantization: operators.md marks ``QLinearConv``, ``QLinearMatMul``,
    ``ConvInteger``, ``MatMulInteger`` and ``DynamicQuantizeLinear`` "N" (unsupported) in every
    version; onnxruntime's ``com.microsoft`` QLinear*/QGemm/DynamicQuantizeMatMul likewise.
``qdq-domain``
    QuantizeLinear/DequantizeLinear outside the ONNX domain (onnxruntime's
    ``UseQDQContribOps``): the parser knows the ONNX operators only.
``zero-point-nonzero``
    operators.md, QuantizeLinear: "`y_zero_point` must be 0"; DequantizeLinear: "`x_zero_point`
    must be zero"; parser: "TRT only supports symmetric quantization - zeroPt must be all zeros".
``zero-point-missing`` (TensorRT 8.x)
    8.2: "This version of TensorRT requires 3 inputs for the DequantizeLinear operator"; 8.6:
    "... requires 3 inputs for the INT8 QuantizeLinear/DequantizeLinear operator". 10.x accepts a
    missing zero point and quantizes to INT8.
``uint8``
    8.6 and 10.x: ``notInvalidType(inputs.at(0), {"UINT8"})``; 10.x, for a UINT8 zero point:
    "TensorRT doesn't support QuantizeLinear/DequantizeLinear with UINT8 zero_point. TensorRT will
    use INT8 instead" (values above 127 then wrap: refused here in every version).
``quant-type``
    The quantized types per version: operators.md DequantizeLinear "INT8" (8.x); "INT8, FP8,
    INT4" (10.x), where INT4 is "weight-only quantization" (developer guide).
``fp8-sm`` (when the SM is known)
    FP8 kernels exist from compute capability 8.9 (Ada) on; no Jetson (Orin: 8.7) has them.
``quantized-bias``
    An int32 DequantizeLinear (a quantized bias): not an importable type in any version (INT8
    only in 8.x; INT8/FP8/INT4 in 10.x). onnxruntime writes one per Conv/Gemm bias unless
    ``QuantizeBias`` is False.
``activation-per-channel``
    Parser: "Per-Channel Quantization. We assume this is weight-quantization with dimensions
    KCRS (K is # output channels). Activations-quantization does not support per-axis
    quantization."
``weight-axis``
    Per-channel weights on the output-channel axis only (the same "KCRS" comment; its check
    "The number of scales is not equal to the number of output channels"): Conv weight axis 0,
    ConvTranspose axis 1 (``[C, K/group, ...]``), Gemm ``transB`` ? 0 : 1, MatMul the last axis.
``scale-positive``
    Parser: "Scale coefficients must all be positive".
``weight-form`` (warning, TensorRT 8.x)
    An int8 weight initializer feeding DequantizeLinear directly. TensorRT 10's guide documents
    pre-quantized weights ("When using pre-quantized weights, an IDequantizeLayer is required");
    8.x's Q/DQ models are float weights with a QuantizeLinear/DequantizeLinear pair, the form
    onnxruntime's ``AddQDQPairToWeight`` was added for ("for example QDQ BERT model for
    TensorRT, QDQ should always appear as a pair", microsoft/onnxruntime#9616). A warning:
    no 8.x source here says the builder refuses the other form.
``scale-not-constant``
    TensorRT's Quantize operator: "The scale tensor must be a build-time constant"; 10.x parser:
    "Dynamic shape for scale tensor is not supported".

Not checked (the builder decides, or edgepack never writes them): INT4 block shapes, FP4
(10.8+), Q/DQ placement for best fusion (a performance matter, not a refusal).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, numpy_helper

from packager.errors import InputError, UnsupportedError
from packager.models.onnx import all_nodes

RuleId = Literal[
    "opset-min",
    "opset-max",
    "qoperator",
    "qdq-domain",
    "zero-point-nonzero",
    "zero-point-missing",
    "uint8",
    "quant-type",
    "fp8-sm",
    "quantized-bias",
    "activation-per-channel",
    "weight-axis",
    "scale-positive",
    "scale-not-constant",
    "weight-form",
]
Severity = Literal["error", "warning"]

# What each rule asks the user to do, for the one-line error.
FIXES: dict[str, str] = {
    "opset-min": "re-export at opset 13 or later (edgepack's INT8 route converts it)",
    "opset-max": "re-export at an opset this TensorRT was released for if the build fails",
    "qoperator": "quantize to Q/DQ (static QDQ), not integer operators: edgepack build "
    "--quantize int8-static --calibration DIR",
    "qdq-domain": "quantize without onnxruntime's contrib Q/DQ (UseQDQContribOps)",
    "zero-point-nonzero": "quantize symmetrically (ActivationSymmetric/WeightSymmetric)",
    "zero-point-missing": "give every QuantizeLinear/DequantizeLinear an int8 zero point",
    "uint8": "quantize to int8 (activation_type/weight_type QInt8)",
    "quant-type": "quantize to int8",
    "fp8-sm": "quantize to int8: this GPU has no FP8 kernels",
    "quantized-bias": "keep biases in float (onnxruntime extra_options QuantizeBias=False)",
    "activation-per-channel": "quantize activations per tensor",
    "weight-axis": "quantize weights per output channel (Conv axis 0)",
    "scale-positive": "every quantization scale must be > 0",
    "scale-not-constant": "make the scale an initializer",
    "weight-form": "keep weights float with a Q/DQ pair (onnxruntime AddQDQPairToWeight)",
}

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# operators.md: "N" in every TensorRT version; onnxruntime's contrib integer operators too.
INTEGER_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "QEmbedLayerNormalization",
    }
)
# ONNX element types by name, for messages.
_TYPE_NAMES: dict[int, str] = {
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT32: "int32",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "uint16",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    TensorProto.FLOAT8E5M2: "float8e5m2",
}
# Bias inputs of the operators onnxruntime quantizes a bias for (input index 2).
_BIAS_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
FP8_MIN_SM = 89  # Ada (8.9) and later have FP8 tensor cores; Orin is 8.7, Xavier 7.2, Nano 5.3


@dataclass(frozen=True)
class ParserProfile:
    """What one TensorRT release line's ONNX parser takes (module docstring for the sources)."""

    name: str  # "TensorRT 8.2"
    max_opset: int
    quantized_types: frozenset[int]  # onnx TensorProto element types it imports as Q/DQ
    zero_point_required: bool


def parser_profile(tensorrt: str) -> ParserProfile:
    """The parser profile of a TensorRT version ``"8.6.2"`` (any ``N.N[.N...]``); InputError
    for anything else. Releases before 8.0 are not Jetson targets edgepack builds for."""
    parts = tensorrt.split(".")
    # ASCII digits, whole part: str.isdigit() also passes '²', which int() refuses.
    if len(parts) < 2 or not all(re.fullmatch(r"[0-9]{1,3}", p) for p in parts):
        raise InputError(f"TensorRT version '{tensorrt}': expected N.N.N (e.g. 8.6.2)")
    major, minor = int(parts[0]), int(parts[1])
    if major < 8:
        raise UnsupportedError(
            f"TensorRT {tensorrt}: explicit quantization (Q/DQ) needs TensorRT 8.0 or later"
        )
    if major == 8:
        return ParserProfile(
            f"TensorRT {major}.{minor}",
            13 if minor < 5 else 17,
            frozenset({TensorProto.INT8}),
            zero_point_required=True,
        )
    return ParserProfile(
        f"TensorRT {major}.{minor}",
        20,
        frozenset({TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}),
        zero_point_required=False,
    )


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``rule`` (a :data:`RuleId`), the ``node`` (its name, else ``Op#index``)
    and ``tensor`` at fault ("" for the model as a whole), what is wrong, and whether TensorRT
    refuses it (``error``) or only may (``warning``)."""

    rule: RuleId
    node: str
    tensor: str
    message: str
    severity: Severity = "error"

    def line(self) -> str:
        where = f"node '{self.node}'" if self.node else "model"
        tensor = f", tensor '{self.tensor}'" if self.tensor else ""
        return f"[{self.rule}] {where}{tensor}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "node": self.node,
            "tensor": self.tensor,
            "message": self.message,
            "severity": self.severity,
        }


def lint_qdq(
    model: ModelProto | Path, tensorrt: str, *, sm: int | None = None
) -> tuple[Finding, ...]:
    """Every rule ``model`` breaks for TensorRT ``tensorrt`` ("8.6.2"), in graph order; ``sm``
    (compute capability as an int, 87 for 8.7) enables the GPU-dependent rules. A model without
    Q/DQ or integer operators gets at most ``opset-max``. InputError for an unreadable file."""
    if isinstance(model, Path):
        model = _load(model)
    profile = parser_profile(tensorrt)
    return tuple(_Linter(model, profile, sm).run())


def check_qdq(path: Path, tensorrt: str, *, sm: int | None = None) -> tuple[Finding, ...]:
    """:func:`lint_qdq` for a build: UnsupportedError (exit 10) with the first error as its one
    line (rule, node, tensor, fix) and every error in ``details``; else the warnings."""
    findings = lint_qdq(path, tensorrt, sm=sm)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UnsupportedError(
            f"{path.name}: {parser_profile(tensorrt).name} would refuse this model: "
            f"{first.line()}{more}",
            hint=FIXES[first.rule],
            details=tuple(f.line() for f in errors),
        )
    return findings


def _load(path: Path) -> ModelProto:
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError for bad files
        raise InputError(f"{path}: cannot load the ONNX model ({exc})") from exc


class _Linter:
    def __init__(self, model: ModelProto, profile: ParserProfile, sm: int | None) -> None:
        self.model = model
        self.profile = profile
        self.sm = sm
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        for node in self.nodes:  # Constant nodes are build-time constants too
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attribute in node.attribute:
                    if attribute.name == "value" and node.output:
                        self.initializers[node.output[0]] = attribute.t
        self.producer: dict[str, NodeProto] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[tuple[NodeProto, int]]] = {}
        for node in self.nodes:
            for index, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, index))
        self.names = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)}

    def name(self, node: NodeProto) -> str:
        return self.names.get(id(node)) or node.name or node.op_type

    def _consumers(self, node: NodeProto) -> list[tuple[NodeProto, int]]:
        """Who reads ``node``'s first output (none when it has no output)."""
        return self.consumers.get(node.output[0], []) if node.output else []

    def _numbers(self, name: str) -> np.ndarray:
        """The build-time constant ``name`` as float64; InputError naming the tensor when its
        TensorProto is malformed (data shorter than its dims, an unknown or a string type):
        a model file is untrusted input, so no ValueError escapes as an internal error."""
        try:
            values = numpy_helper.to_array(self.initializers[name])
            if values.dtype.kind in "OSU":  # strings (int4 / float8 are ml_dtypes, kind "V")
                raise ValueError(f"{values.dtype} is not a numeric type")
            return values.astype(np.float64)
        except (ValueError, TypeError, KeyError) as exc:  # KeyError: an unknown data type
            raise InputError(
                f"tensor '{name}': a malformed constant ({' '.join(str(exc).split())[:120]})",
                hint="export the model again; onnx.checker.check_model(model, full_check=True)",
            ) from None

    def run(self) -> Iterator[Finding]:
        qdq = [n for n in self.nodes if n.op_type in QDQ_OPS]
        opset = next(
            (int(o.version) for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0
        )
        if qdq and opset < 13:
            yield Finding(
                "opset-min",
                "",
                "",
                f"opset {opset}: {self.profile.name} imports Q/DQ from opset 13 (per-channel "
                "axis attribute)",
            )
        if opset > self.profile.max_opset:
            yield Finding(
                "opset-max",
                "",
                "",
                f"opset {opset} is newer than {self.profile.name}'s parser "
                f"(opset <= {self.profile.max_opset})",
                "warning",
            )
        for node in all_nodes(self.model.graph):
            if node.op_type.startswith("QLinear") or node.op_type in INTEGER_OPS:
                yield Finding(
                    "qoperator",
                    self.name(node),
                    node.output[0] if node.output else "",
                    f"{node.op_type} is an integer operator; TensorRT imports INT8 only as "
                    "QuantizeLinear/DequantizeLinear pairs",
                )
        for node in qdq:
            yield from self._qdq(node)

    # --- one QuantizeLinear / DequantizeLinear ------------------------------------------------

    def _qdq(self, node: NodeProto) -> Iterator[Finding]:
        name = self.name(node)
        data = node.input[0] if node.input else ""
        if node.domain not in ("", "ai.onnx"):
            yield Finding(
                "qdq-domain",
                name,
                data,
                f"{node.op_type} in domain '{node.domain}'; TensorRT knows the ONNX one only",
            )
            return
        dtype = self._quantized_type(node)
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if not zero_point and self.profile.zero_point_required:
            yield Finding(
                "zero-point-missing",
                name,
                data,
                f"no zero point; {self.profile.name} requires all 3 inputs of {node.op_type}",
            )
        yield from self._type(node, name, data, dtype)
        if (
            self.profile.zero_point_required
            and node.op_type == "DequantizeLinear"
            and data in self.initializers
            and dtype == TensorProto.INT8
        ):
            yield Finding(
                "weight-form",
                name,
                data,
                f"int8 weight stored quantized; {self.profile.name}'s documented form is a float "
                "weight -> QuantizeLinear -> DequantizeLinear",
                "warning",
            )
        if zero_point in self.initializers:
            values = self._numbers(zero_point)
            if values.size and np.any(values.astype(np.float64) != 0):
                first = values.reshape(-1)[np.flatnonzero(values.reshape(-1))[0]].item()
                yield Finding(
                    "zero-point-nonzero",
                    name,
                    data,
                    f"zero point '{zero_point}' holds {first}; TensorRT quantizes "
                    "symmetrically (zero point 0)",
                )
        yield from self._scale(node, name, data)

    def _quantized_type(self, node: NodeProto) -> int | None:
        """The integer/float8 type ``node`` quantizes to or from; None when it cannot be told."""
        if len(node.input) > 2 and node.input[2] in self.initializers:
            return int(self.initializers[node.input[2]].data_type)
        if node.op_type == "DequantizeLinear" and node.input:
            source = node.input[0]
            if source in self.initializers:
                return int(self.initializers[source].data_type)
            producer = self.producer.get(source)
            if producer is not None and producer.op_type == "QuantizeLinear":
                return self._quantized_type(producer)
        # No zero point: ONNX means uint8, TensorRT 10 reads int8, 8.x refuses it
        # (zero-point-missing); the type stays untold rather than reported twice.
        return None

    def _type(self, node: NodeProto, name: str, data: str, dtype: int | None) -> Iterator[Finding]:
        if dtype is None or dtype == TensorProto.INT8:
            return
        type_name = _TYPE_NAMES.get(dtype) or _type_name(dtype)
        if dtype == TensorProto.UINT8:
            yield Finding(
                "uint8",
                name,
                data,
                f"uint8 quantization; {self.profile.name} quantizes to signed int8 only",
            )
        elif dtype == TensorProto.INT32 and node.op_type == "DequantizeLinear":
            uses = [
                (c, i) for c, i in self._consumers(node) if c.op_type in _BIAS_OPS
            ]
            where = f" (bias of {self.name(uses[0][0])})" if uses and uses[0][1] == 2 else ""
            yield Finding(
                "quantized-bias",
                name,
                data,
                f"int32 DequantizeLinear{where}; TensorRT has no int32 Q/DQ: keep the bias float",
            )
        elif dtype not in self.profile.quantized_types:
            allowed = ", ".join(sorted(_TYPE_NAMES[t] for t in self.profile.quantized_types))
            yield Finding(
                "quant-type",
                name,
                data,
                f"{type_name} quantization; {self.profile.name} imports {allowed}",
            )
        elif dtype == TensorProto.INT4 and not self._is_weight(node):
            yield Finding(
                "quant-type",
                name,
                data,
                f"int4 on an activation; {self.profile.name} takes int4 for weights only",
            )
        elif dtype == TensorProto.FLOAT8E4M3FN and self.sm is not None and self.sm < FP8_MIN_SM:
            yield Finding(
                "fp8-sm",
                name,
                data,
                f"FP8 needs compute capability 8.9 or later; this GPU is "
                f"{self.sm // 10}.{self.sm % 10}",
            )

    def _scale(self, node: NodeProto, name: str, data: str) -> Iterator[Finding]:
        scale = node.input[1] if len(node.input) > 1 else ""
        tensor = self.initializers.get(scale)
        if tensor is None:
            yield Finding(
                "scale-not-constant",
                name,
                scale or data,
                "the scale is computed at run time; TensorRT needs a build-time constant",
            )
            return
        values = self._numbers(scale)
        if values.size == 0 or np.any(~(values > 0)):
            yield Finding(
                "scale-positive",
                name,
                scale,
                "a scale coefficient is zero, negative or NaN; TensorRT needs all > 0",
            )
        if values.size <= 1:
            return
        if not self._is_weight(node):
            yield Finding(
                "activation-per-channel",
                name,
                data,
                f"{values.size} scales on an activation; TensorRT quantizes activations per "
                "tensor (one scale)",
            )
            return
        if node.op_type == "DequantizeLinear":
            yield from self._axis(node, name, data)

    def _is_weight(self, node: NodeProto) -> bool:
        source = node.input[0] if node.input else ""
        if source in self.initializers:
            return True
        producer = self.producer.get(source)
        return (
            node.op_type == "DequantizeLinear"
            and producer is not None
            and producer.op_type == "QuantizeLinear"
            and bool(producer.input)
            and producer.input[0] in self.initializers
        )

    def _weight(self, node: NodeProto) -> TensorProto | None:
        source = node.input[0]
        if source in self.initializers:
            return self.initializers[source]
        producer = self.producer.get(source)
        if producer is not None and producer.input:
            return self.initializers.get(producer.input[0])
        return None

    def _axis(self, node: NodeProto, name: str, data: str) -> Iterator[Finding]:
        weight = self._weight(node)
        if weight is None:
            return
        rank = len(weight.dims)
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        axis = axis + rank if axis < 0 else axis
        for consumer, index in self._consumers(node):
            expected = _output_channel_axis(consumer, index, rank)
            if expected is None or axis == expected:
                continue
            yield Finding(
                "weight-axis",
                name,
                weight.name,
                f"per-channel scales on axis {axis} of {consumer.op_type} "
                f"'{self.name(consumer)}' weight {list(weight.dims)}; TensorRT takes them on "
                f"the output-channel axis {expected}",
            )
            return


def _type_name(dtype: int) -> str:
    """ONNX's name of a TensorProto data type, lower case; ``type 999`` for an unknown one."""
    try:
        return str(TensorProto.DataType.Name(dtype)).lower()
    except ValueError:
        return f"type {dtype}"


def _output_channel_axis(consumer: NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of ``consumer``'s weight input ``index``; None when not a weight
    input of an operator TensorRT runs per-channel (no rule to apply)."""
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((int(a.i) for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul" and rank >= 2:
        return rank - 1
    return None


def rules_broken(findings: Sequence[Finding]) -> tuple[str, ...]:
    """The distinct rule ids in ``findings``, in first-seen order (for reports and tests)."""
    seen: dict[str, None] = {}
    for finding in findings:
        seen.setdefault(finding.rule, None)
    return tuple(seen)
