"""The pure half of ``edgepack optimize``: a request and what is known of the source model become a
frozen list of steps. Nothing here reads or writes files; ``packager.optimize.execute`` does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager.calibration import ImagePreprocessing
from packager.errors import UnsupportedError, UsageError
from packager.models.torch_export import InputSpec, TorchKind
from packager.models.trust import TRUST_FLAG, untrusted_error
from packager.optimize.cpu import (
    CpuProfile,
    Int8Settings,
    emulation_cpu,
    int8_settings,
    tensorrt_int8_settings,
)
from packager.optimize.request import (
    CalibrationMethodName,
    OptimizeRequest,
    PruneOptions,
    QuantFormatName,
    Quantize,
)

SourceKind = Literal["onnx", "torch-pickle", "torchscript", "exported-program"]

# Operator domains onnxruntime's CPU provider implements; anything else cannot even be run.
RUNNABLE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# QuantizeLinear/DequantizeLinear gained the per-channel ``axis`` attribute in opset 13.
PER_CHANNEL_QDQ_OPSET = 13
# onnxruntime's quantizer handles opset 11+ graphs; older ones it only patches the header of.
INT8_MIN_OPSET = 11
# --eval-on-target auto: emulate only models up to this size. qemu-user runs onnxruntime's x86
# kernels 10-50x slower than the host (measured: a 60 KB Conv model, 30 samples, 4 s), so tens
# of MiB stay within a minute or two; above, the user asks for it with --eval-on-target on.
AUTO_EMULATED_EVAL_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class SourceInfo:
    """What the executor's inspection found out about the model file before planning."""

    path: Path
    kind: SourceKind
    opset: int | None = None  # default-domain opset of an ONNX source
    foreign_ops: tuple[str, ...] = ()  # "domain::Op" nodes outside RUNNABLE_DOMAINS
    size_bytes: int | None = None  # the model with its external data


@dataclass(frozen=True)
class LoadOnnx:
    """Copy the ONNX source (external data inlined) into the work directory: the baseline."""

    source: Path


@dataclass(frozen=True)
class LoadTorch:
    """Load the PyTorch source, of ``kind``, into memory (nothing written yet). ``trusted``: the
    builder's ``--trust-model-code`` (loading runs code from the file; the loader refuses
    without it, packager.models.trust.check_trusted)."""

    source: Path
    kind: TorchKind
    trusted: bool = False


@dataclass(frozen=True)
class ExportTorch:
    """Export the loaded PyTorch model to ONNX with ``inputs``: the ``baseline`` before pruning,
    or the ``pruned`` one after."""

    kind: TorchKind
    inputs: tuple[InputSpec, ...]
    role: Literal["baseline", "pruned"]


@dataclass(frozen=True)
class Prune:
    """Prune the loaded nn.Module in place (the weights stay dense, zero-filled)."""

    options: PruneOptions


@dataclass(frozen=True)
class ConvertOpset:
    """Convert the model's default-domain opset; ``reason`` goes into the report's notes."""

    from_opset: int
    to_opset: int
    reason: str


@dataclass(frozen=True)
class Preprocess:
    """onnxruntime's quant_pre_process: symbolic shape inference and graph optimization."""


@dataclass(frozen=True)
class QuantizeInt8:
    """Quantize to INT8: static (calibrated on ``calibration``) or dynamic (``calibration`` None).

    ``min_samples``: the fewest calibration samples accepted; ``settings``: the onnxruntime options
    chosen for the CPU named by ``cpu`` (packager.optimize.cpu).
    """

    static: bool
    quant_format: QuantFormatName
    per_channel: bool
    calibration: Path | None
    method: CalibrationMethodName
    preprocessing: ImagePreprocessing
    min_samples: int
    settings: Int8Settings | None = None  # None: onnxruntime's defaults (older plans)
    cpu: str = ""  # the CPU the settings were chosen for (CpuProfile.describe)


@dataclass(frozen=True)
class ConvertFp16:
    """Float weights and activations to float16; inputs and outputs keep their float32 type."""


@dataclass(frozen=True)
class Evaluate:
    """Compare the candidates' outputs with the FP32 model's on ``data``; apply the accuracy gate.

    Thresholds are fractions (0-1); None leaves that one unchecked.
    """

    data: Path
    held_out: bool  # False when only the calibration set was available to compare on
    preprocessing: ImagePreprocessing
    max_accuracy_drop: float | None
    min_top1_agreement: float | None
    emulate: str | None = None  # qemu CPU model the candidate runs on; None: this host
    measured_on: str = ""  # the CPU the figures come from, in words


@dataclass(frozen=True)
class Report:
    """Measure each variant's median latency over ``latency_runs`` runs; write the report."""

    latency_runs: int


Step = (
    LoadOnnx
    | LoadTorch
    | ExportTorch
    | Prune
    | ConvertOpset
    | Preprocess
    | QuantizeInt8
    | ConvertFp16
    | Evaluate
    | Report
)


@dataclass(frozen=True)
class OptimizePlan:
    """The steps of one optimization, in order, and the file names they write into --out."""

    request: OptimizeRequest
    source: SourceInfo
    steps: tuple[Step, ...]
    model_name: str  # file name of the optimized model inside --out
    baseline_name: str | None  # file name of the FP32 ONNX export kept for PyTorch sources
    cpu: CpuProfile | None = None  # the CPU the model is optimized for
    host: CpuProfile | None = None  # the CPU this runs on

    def describe(self) -> tuple[str, ...]:
        return tuple(describe_step(step) for step in self.steps)


def required_opset(quantize: Quantize, quant_format: QuantFormatName, per_channel: bool) -> int:
    """The lowest default-domain opset the chosen precision and format can be written in."""
    if quantize == "fp16":
        return 0
    if quantize == "int8-static" and quant_format == "QDQ" and per_channel:
        return PER_CHANNEL_QDQ_OPSET
    return INT8_MIN_OPSET


def plan_optimize(
    request: OptimizeRequest, source: SourceInfo, host: CpuProfile | None = None
) -> OptimizePlan:
    """Validate ``request`` against ``source`` and list the steps that produce the result.

    INT8 settings follow ``request.cpu`` (the target's CPU), else ``host`` (this machine's), as
    :func:`packager.optimize.cpu.int8_settings` chooses them; with neither, onnxruntime's
    defaults. Accuracy is measured on the target's kernels (:func:`evaluation_cpu`)."""
    _validate(request, source)
    cpu = request.cpu or host
    steps: list[Step] = []
    if source.kind == "onnx":
        steps.append(LoadOnnx(source.path))
        needed = required_opset(request.quantize, request.quant_format, request.per_channel)
        if request.int8_profile == "tensorrt" and request.quantize != "fp16":
            # TensorRT imports Q/DQ from opset 13 on (onnx-tensorrt's QuantizeLinear needs axis).
            needed = max(needed, PER_CHANNEL_QDQ_OPSET)
        if source.opset is not None and source.opset < needed:
            steps.append(ConvertOpset(source.opset, needed, _opset_reason(request, needed)))
    else:
        steps.append(LoadTorch(source.path, source.kind, request.trust_model_code))
        steps.append(ExportTorch(source.kind, request.inputs, "baseline"))
        if request.prune.active:
            steps.append(Prune(request.prune))
            steps.append(ExportTorch(source.kind, request.inputs, "pruned"))
    if request.quantize == "fp16":
        steps.append(ConvertFp16())
    else:
        steps.append(Preprocess())
        static = request.quantize == "int8-static"
        steps.append(
            QuantizeInt8(
                static=static,
                quant_format=request.quant_format,
                per_channel=request.per_channel,
                calibration=request.calibration if static else None,
                method=request.calibration_method,
                preprocessing=request.preprocessing,
                min_samples=request.min_calibration_samples,
                settings=(
                    tensorrt_int8_settings()
                    if request.int8_profile == "tensorrt"
                    else int8_settings(cpu, static=static, quant_format=request.quant_format)
                    if cpu is not None
                    else None
                ),
                cpu=(
                    "TensorRT (explicit Q/DQ)"
                    if request.int8_profile == "tensorrt"
                    else cpu.describe()
                    if cpu is not None
                    else ""
                ),
            )
        )
    data = request.eval_dir or request.calibration
    if data is not None:
        emulate = evaluation_cpu(request, source, host)
        steps.append(
            Evaluate(
                data=data,
                held_out=request.eval_dir is not None,
                preprocessing=request.preprocessing,
                max_accuracy_drop=request.max_accuracy_drop,
                min_top1_agreement=request.min_top1_agreement,
                emulate=emulate,
                measured_on=(
                    f"{host.describe() if host else 'this host'}, onnxruntime's CPU kernels on "
                    "the same Q/DQ graph: a stand-in for TensorRT's int8 kernels, which only "
                    "the device runs"
                    if request.int8_profile == "tensorrt" and request.quantize != "fp16"
                    else measured_on(request.cpu, host, emulate)
                ),
            )
        )
    steps.append(Report(request.latency_runs))
    stem = source.path.name.split(".")[0] or "model"
    return OptimizePlan(
        request=request,
        source=source,
        steps=tuple(steps),
        model_name=f"{stem}.{request.quantize}.onnx",
        baseline_name=None if source.kind == "onnx" else f"{stem}.fp32.onnx",
        cpu=cpu,
        host=host,
    )


def evaluation_cpu(
    request: OptimizeRequest, source: SourceInfo, host: CpuProfile | None
) -> str | None:
    """The qemu CPU model the optimized model is evaluated on, None for this host.

    INT8 only, and only where the host would compute other figures than the target
    (:func:`packager.optimize.cpu.emulation_cpu`): ``--eval-on-target on`` always then, ``auto``
    for models up to :data:`AUTO_EMULATED_EVAL_MAX_BYTES`, ``off`` never."""
    if request.quantize == "fp16" or request.eval_on_target == "off":
        return None
    if request.int8_profile == "tensorrt":  # TensorRT's kernels run on the GPU, not a CPU
        return None
    if request.cpu is None or host is None:
        return None
    if request.cpu.arch != host.arch and request.eval_on_target == "on":
        raise UsageError(
            f"--eval-on-target on: {request.cpu.name} is {request.cpu.arch}; its CPU is measured "
            "by running the model in the target's image under qemu, which 'edgepack build "
            "--target ... --eval DIR' does (by default for INT8 models up to "
            f"{AUTO_EMULATED_EVAL_MAX_BYTES >> 20} MiB)"
        )
    emulate = emulation_cpu(request.cpu, host)
    if emulate is None or request.eval_on_target == "on":
        return emulate
    size = source.size_bytes
    return emulate if size is not None and size <= AUTO_EMULATED_EVAL_MAX_BYTES else None


def measured_on(target: CpuProfile | None, host: CpuProfile | None, emulate: str | None) -> str:
    """Where the accuracy figures come from, in words, for the report."""
    here = host.describe() if host is not None else "this host"
    if emulate is not None:
        assert target is not None
        return (
            f"emulated {emulate} CPU (qemu-user; AVX2, no VNNI) on {here}: the int8 kernels "
            f"of {target.describe()}"
        )
    if target is None or host is None:
        return f"{here}, natively"
    if target.arch != host.arch:
        return (
            f"{here}, natively: not the target's ISA ({target.describe()}); onnxruntime's "
            "kernels there may round differently"
        )
    same = target.vnni == host.vnni if target.x86 else target.dotprod == host.dotprod
    match = "the same int8 kernel class as" if same else "not the int8 kernels of"
    return f"{here}, natively: {match} {target.describe()}"


def describe_step(step: Step) -> str:
    """One step as a line of the report's step list."""
    match step:
        case LoadOnnx(source):
            return f"load ONNX {source.name} (external weights inlined)"
        case LoadTorch(source, kind, trusted):
            vouched = f" (its code trusted: {TRUST_FLAG})" if trusted else ""
            return f"load PyTorch {kind} {source.name}{vouched}"
        case ExportTorch(_, _, role):
            return f"export the {role} model to ONNX (torch.onnx dynamo exporter)"
        case Prune(options):
            return (
                f"prune: L1 unstructured {options.l1_unstructured:.0%}, "
                f"L2 structured channels {options.l2_structured:.0%} (made permanent)"
            )
        case ConvertOpset(old, new, reason):
            return f"convert opset {old} -> {new} ({reason})"
        case Preprocess():
            return "pre-process: shape inference and graph optimization"
        case QuantizeInt8(static=True, quant_format=fmt, per_channel=pc, method=method) as q:
            granularity = "per-channel" if pc else "per-tensor"
            return f"quantize static INT8 {fmt}, {granularity}, {method} calibration" + _for(q)
        case QuantizeInt8(per_channel=pc) as q:
            granularity = "per-channel" if pc else "per-tensor"
            return f"quantize dynamic INT8, {granularity} weights" + _for(q)
        case ConvertFp16():
            return "convert to FP16 (float32 inputs and outputs kept)"
        case Evaluate(data, held_out, _, drop, agreement):
            gate = []
            if drop is not None:
                gate.append(f"max accuracy drop {drop:.2%}")
            if agreement is not None:
                gate.append(f"min top-1 agreement {agreement:.2%}")
            where = "held-out set" if held_out else "calibration set (not held out)"
            suffix = f"; gate: {', '.join(gate)}" if gate else ""
            on = f" on an emulated {step.emulate} CPU" if step.emulate else ""
            return f"evaluate against the FP32 model{on} on {data.name} ({where}){suffix}"
        case Report(runs):
            return f"report: size, median latency of {runs} runs, accuracy per variant"
    raise AssertionError(f"unknown step {step!r}")  # pragma: no cover


def _for(step: QuantizeInt8) -> str:
    if step.settings is None:
        return ""
    s = step.settings
    types = f"{s.activation_type[1:].lower()} activations"
    bits = "7-bit weights (reduce_range)" if s.reduce_range else "8-bit weights"
    return f", {types}, {bits} for {step.cpu}"


def _opset_reason(request: OptimizeRequest, needed: int) -> str:
    if needed == PER_CHANNEL_QDQ_OPSET:
        return "per-channel QDQ needs QuantizeLinear with an axis"
    return "onnxruntime's INT8 quantizer needs opset 11 or later"


def _validate(request: OptimizeRequest, source: SourceInfo) -> None:
    if source.foreign_ops:
        raise UnsupportedError(
            f"{source.path}: operator {source.foreign_ops[0]} is not an ONNX or onnxruntime "
            f"operator, so the model cannot be run to {request.quantize}-convert or evaluate it",
            hint="replace the custom operator or export it as standard ONNX ops",
        )
    if request.int8_profile == "tensorrt" and request.quantize != "fp16":
        if request.quantize != "int8-static" or request.quant_format != "QDQ":
            form = "QOperator" if request.quant_format == "QOperator" else request.quantize
            raise UnsupportedError(
                f"{source.path}: TensorRT takes INT8 only as static Q/DQ (explicit "
                f"quantization), not {form}: onnxruntime writes integer operators "
                "(DynamicQuantizeLinear, MatMulInteger, QLinear*) its ONNX parser rejects",
                hint="use --quantize int8-static --calibration DIR, or fp16",
            )
    if request.quantize == "int8-static" and request.calibration is None:
        raise UsageError(
            "--quantize int8-static needs --calibration DIR (.npy/.npz tensors or images)"
        )
    if request.calibration is not None and request.quantize != "int8-static":
        raise UsageError(
            f"--calibration is only used by --quantize int8-static, not {request.quantize}"
        )
    gate = request.max_accuracy_drop is not None or request.min_top1_agreement is not None
    if gate and request.eval_dir is None:
        raise UsageError(
            "--max-accuracy-drop/--min-top1-agreement need --eval DIR with held-out inputs"
        )
    for flag, value in (
        ("--max-accuracy-drop", request.max_accuracy_drop),
        ("--min-top1-agreement", request.min_top1_agreement),
        ("--prune l1", request.prune.l1_unstructured),
        ("--prune l2", request.prune.l2_structured),
    ):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag}: {value} is not a fraction between 0 and 1")
    if request.prune.l1_unstructured >= 1.0 or request.prune.l2_structured >= 1.0:
        raise UsageError("--prune: an amount of 1.0 would zero every weight; use less than 1")
    if request.latency_runs < 1:
        raise UsageError("--latency-runs must be at least 1")
    if source.kind == "onnx":
        if request.prune.active:
            raise UnsupportedError(
                f"{source.path}: pruning needs the PyTorch model (ONNX weights cannot be "
                "fine-tuned or pruned here)",
                hint="pass the .pt file with --input-shape, or drop --prune",
            )
        if request.inputs:
            raise UsageError("--input-shape is for PyTorch models; an ONNX model declares its own")
        return
    if request.prune.active and source.kind != "torch-pickle":
        raise UnsupportedError(
            f"{source.path}: pruning needs the nn.Module, and a {source.kind} file has none",
            hint="save the module with torch.save(model), or drop --prune",
        )
    if source.kind != "exported-program" and not request.inputs:
        raise UsageError(
            f"{source.path}: a {source.kind} model needs --input-shape NAME=D1,D2,... per input"
        )
    if not request.trust_model_code:
        raise untrusted_error(source.path, source.kind)
