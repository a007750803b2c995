"""Microcontroller bundles: a TensorFlow Lite Micro project rendered from ``templates/mcu``.

fit() measures what the model needs (the tensor arena, by running the real TFLite Micro
interpreter; flash, from the model plus an estimate of the kernels it links), plan() computes the
files to render as a frozen :class:`McuProject`, and execute() writes them. Nothing here writes
``manifest.json``: the build core does that over the finished staging directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from packager import __version__
from packager.backends.base import BuildPlan, BuildRequest, ExecuteResult, RenderedFile
from packager.console import capture_fd
from packager.errors import InputError, UnsupportedError
from packager.fit import FitReport, Resource
from packager.models.info import ModelInfo
from packager.models.tflite import TfliteModel, TfliteTensor, analyze_tflite
from packager.resources import templates_dir
from packager.targets import LoadedTarget, McuTarget

KIB = 1024

# --- flash estimate ---------------------------------------------------------------------------
# The TFLM framework (interpreter, allocator, memory planner, flatbuffer access, system libraries
# it pulls in), measured by the TFLM project as interpreter_memory_footprint minus
# baseline_memory_footprint on a Cortex-M3 "bluepill" build: tflite-micro docs/code_size.md.
TFLM_CORE_BYTES = 9_732
TFLM_CORE_SOURCE = "TFLM framework 9,732 B: tflite-micro docs/code_size.md (Cortex-M3 bluepill)"
# .text of the generated model_update.c, measured with Debian's arm-none-eabi-gcc 12.2
# -Os -mthumb: 2,164 B for -mcpu=cortex-m4, 2,184 B for cortex-m7 (the larger is used);
# tests/integration/test_mcu_bundle.py re-measures it.
UPDATE_STUB_BYTES = 2_184
# Per-kernel code: edgepack's estimates of the reference (non-CMSIS-NN) int8 kernels plus their
# flatbuffer option parsers, built -Os for Thumb-2, rounded up to 512 B. TFLM publishes no per-op
# table; these are not measured per op, and CMSIS-NN / ESP-NN kernels are typically larger.
KERNEL_SOURCE = "per-op kernels: edgepack estimates for TFLM reference int8 kernels (-Os, Thumb-2)"
DEFAULT_KERNEL_BYTES = 4_096

# builtin operator (TFLite schema name) -> (MicroMutableOpResolver method, kernel bytes estimate)
TFLM_OPS: dict[str, tuple[str, int]] = {
    "ABS": ("AddAbs", 1_024),
    "ADD": ("AddAdd", 3_072),
    "ADD_N": ("AddAddN", 1_536),
    "ARG_MAX": ("AddArgMax", 1_536),
    "ARG_MIN": ("AddArgMin", 1_536),
    "ASSIGN_VARIABLE": ("AddAssignVariable", 1_024),
    "AVERAGE_POOL_2D": ("AddAveragePool2D", 2_560),
    "BATCH_MATMUL": ("AddBatchMatMul", 4_096),
    "BATCH_TO_SPACE_ND": ("AddBatchToSpaceNd", 2_048),
    "BROADCAST_ARGS": ("AddBroadcastArgs", 1_024),
    "BROADCAST_TO": ("AddBroadcastTo", 1_536),
    "CALL_ONCE": ("AddCallOnce", 1_024),
    "CAST": ("AddCast", 1_536),
    "CEIL": ("AddCeil", 512),
    "CONCATENATION": ("AddConcatenation", 2_048),
    "CONV_2D": ("AddConv2D", 5_120),
    "COS": ("AddCos", 1_024),
    "CUMSUM": ("AddCumSum", 1_536),
    "DEPTH_TO_SPACE": ("AddDepthToSpace", 1_536),
    "DEPTHWISE_CONV_2D": ("AddDepthwiseConv2D", 5_120),
    "DEQUANTIZE": ("AddDequantize", 1_536),
    "DIV": ("AddDiv", 2_048),
    "ELU": ("AddElu", 1_536),
    "EMBEDDING_LOOKUP": ("AddEmbeddingLookup", 1_536),
    "EQUAL": ("AddEqual", 2_048),
    "EXP": ("AddExp", 1_024),
    "EXPAND_DIMS": ("AddExpandDims", 1_024),
    "FILL": ("AddFill", 1_024),
    "FLOOR": ("AddFloor", 512),
    "FLOOR_DIV": ("AddFloorDiv", 1_536),
    "FLOOR_MOD": ("AddFloorMod", 1_536),
    "FULLY_CONNECTED": ("AddFullyConnected", 3_072),
    "GATHER": ("AddGather", 1_536),
    "GATHER_ND": ("AddGatherNd", 1_536),
    "GREATER": ("AddGreater", 2_048),
    "GREATER_EQUAL": ("AddGreaterEqual", 2_048),
    "HARD_SWISH": ("AddHardSwish", 2_048),
    "IF": ("AddIf", 1_536),
    "L2_NORMALIZATION": ("AddL2Normalization", 1_536),
    "L2_POOL_2D": ("AddL2Pool2D", 1_536),
    "LEAKY_RELU": ("AddLeakyRelu", 1_536),
    "LESS": ("AddLess", 2_048),
    "LESS_EQUAL": ("AddLessEqual", 2_048),
    "LOG": ("AddLog", 1_024),
    "LOG_SOFTMAX": ("AddLogSoftmax", 2_048),
    "LOGICAL_AND": ("AddLogicalAnd", 1_024),
    "LOGICAL_NOT": ("AddLogicalNot", 512),
    "LOGICAL_OR": ("AddLogicalOr", 1_024),
    "LOGISTIC": ("AddLogistic", 2_048),
    "MAX_POOL_2D": ("AddMaxPool2D", 2_048),
    "MAXIMUM": ("AddMaximum", 1_536),
    "MEAN": ("AddMean", 3_072),
    "MINIMUM": ("AddMinimum", 1_536),
    "MIRROR_PAD": ("AddMirrorPad", 1_536),
    "MUL": ("AddMul", 2_560),
    "NEG": ("AddNeg", 512),
    "NOT_EQUAL": ("AddNotEqual", 2_048),
    "PACK": ("AddPack", 1_024),
    "PAD": ("AddPad", 1_536),
    "PADV2": ("AddPadV2", 1_536),
    "PRELU": ("AddPrelu", 2_048),
    "QUANTIZE": ("AddQuantize", 2_048),
    "READ_VARIABLE": ("AddReadVariable", 1_024),
    "REDUCE_MAX": ("AddReduceMax", 2_048),
    "REDUCE_MIN": ("AddReduceMin", 2_048),
    "RELU": ("AddRelu", 1_024),
    "RELU6": ("AddRelu6", 1_024),
    "RESHAPE": ("AddReshape", 1_024),
    "RESIZE_BILINEAR": ("AddResizeBilinear", 2_048),
    "RESIZE_NEAREST_NEIGHBOR": ("AddResizeNearestNeighbor", 1_536),
    "REVERSE_V2": ("AddReverseV2", 1_536),
    "ROUND": ("AddRound", 512),
    "RSQRT": ("AddRsqrt", 1_536),
    "SELECT_V2": ("AddSelectV2", 1_536),
    "SHAPE": ("AddShape", 512),
    "SIN": ("AddSin", 1_024),
    "SLICE": ("AddSlice", 1_536),
    "SOFTMAX": ("AddSoftmax", 2_560),
    "SPACE_TO_BATCH_ND": ("AddSpaceToBatchNd", 2_048),
    "SPACE_TO_DEPTH": ("AddSpaceToDepth", 1_536),
    "SPLIT": ("AddSplit", 1_536),
    "SPLIT_V": ("AddSplitV", 1_536),
    "SQRT": ("AddSqrt", 1_024),
    "SQUARE": ("AddSquare", 1_024),
    "SQUARED_DIFFERENCE": ("AddSquaredDifference", 2_048),
    "SQUEEZE": ("AddSqueeze", 1_024),
    "STRIDED_SLICE": ("AddStridedSlice", 2_560),
    "SUB": ("AddSub", 3_072),
    "SUM": ("AddSum", 3_072),
    "SVDF": ("AddSvdf", 4_096),
    "TANH": ("AddTanh", 2_048),
    "TRANSPOSE": ("AddTranspose", 2_048),
    "TRANSPOSE_CONV": ("AddTransposeConv", 4_096),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": ("AddUnidirectionalSequenceLSTM", 12_288),
    "UNPACK": ("AddUnpack", 1_024),
    "VAR_HANDLE": ("AddVarHandle", 1_024),
    "WHILE": ("AddWhile", 1_536),
    "ZEROS_LIKE": ("AddZerosLike", 512),
}
# Custom operators TFLM itself implements.
TFLM_CUSTOM_OPS: dict[str, tuple[str, int]] = {
    "TFLite_Detection_PostProcess": ("AddDetectionPostprocess", 8_192),
}

# --- arena ------------------------------------------------------------------------------------
# Why each architecture gets the margin its target file declares (runtime.arena_margin_percent).
# The measurement runs the reference kernels on the 64-bit host, whose interpreter structs
# (TfLiteEvalTensor, node/registration records) are larger than on 32-bit cores, so it is already
# an upper bound for the structures; the margin covers what the host run cannot see.
ARENA_MARGIN_REASONS: dict[str, str] = {
    "cortex-m0plus": "scratch buffers of optimized kernels, arena start alignment",
    "cortex-m4": "CMSIS-NN scratch buffers (conv, depthwise) that reference kernels do not use",
    "cortex-m7": "CMSIS-NN scratch buffers (conv, depthwise) that reference kernels do not use",
    "cortex-m33": "CMSIS-NN / Helium scratch buffers that reference kernels do not use",
    "xtensa-lx7": "ESP-NN kernels' larger scratch buffers and 16-byte SIMD alignment",
    "riscv32": "vendor kernel scratch buffers, arena start alignment",
}
ARENA_ALIGN = 16
_ARENA_LIMIT = 64 * 1024 * 1024  # beyond any MCU: a model that needs more is not a TFLM model
# Flash erase-sector granularity the update slots are rounded to; the header gets its own sector.
UPDATE_SECTOR = 4 * KIB

_C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t",
            "int64": "int64_t", "float32": "float", "bool": "bool"}


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def chosen_arena(measured: int, margin_percent: int) -> int:
    """The project's arena: measured plus the margin, rounded up to 16 bytes."""
    return round_up(measured + -(-measured * margin_percent // 100), ARENA_ALIGN)


def _tflm_probe(data: bytes, arena: int, inputs: int) -> bool:
    import numpy as np
    from tflite_micro.python.tflite_micro import runtime  # type: ignore[import-untyped]

    try:
        interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena)
        for i in range(inputs):
            details = interpreter.get_input_details(i)
            interpreter.set_input(np.zeros(details["shape"], details["dtype"]), i)
        interpreter.invoke()
    except (RuntimeError, ValueError):
        return False
    return True


def _probe_child(data: bytes, arena: int, inputs: int) -> None:
    import faulthandler

    faulthandler.disable()  # a crash here is an answer (too small), not a report
    os._exit(0 if _tflm_probe(data, arena, inputs) else 1)


def tflm_runs(data: bytes, arena: int, inputs: int) -> bool:
    """Does the TFLM interpreter allocate and invoke the model in ``arena`` bytes?

    Each probe runs in a forked child: some TFLM kernels crash the process (SIGSEGV) instead of
    reporting an error when the arena is too small (seen: UNIDIRECTIONAL_SEQUENCE_LSTM at 2,104 B).
    """
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_probe_child, args=(data, arena, inputs)
    )
    child.start()
    child.join()
    return child.exitcode == 0


@lru_cache(maxsize=16)
def measure_arena(data: bytes, source: str) -> int:
    """The smallest tensor arena (a multiple of 16 B) in which the TensorFlow Lite Micro
    interpreter allocates and invokes the model: a bisection over real interpreter runs."""
    analysis = analyze_tflite(data, source)
    with capture_fd(2) as log:
        hi = round_up(max(4 * KIB, 2 * analysis.activation_bytes), ARENA_ALIGN)
        while not tflm_runs(data, hi, len(analysis.inputs)):
            hi *= 2
            if hi > _ARENA_LIMIT:
                break
        lo = 0  # invariant: lo fails, hi runs
        if hi <= _ARENA_LIMIT:
            while hi - lo > ARENA_ALIGN:
                mid = round_up((lo + hi) // 2, ARENA_ALIGN)
                if mid >= hi:
                    break
                if tflm_runs(data, mid, len(analysis.inputs)):
                    hi = mid
                else:
                    lo = mid
    if hi > _ARENA_LIMIT:
        lines = [ln.strip() for ln in "".join(log).splitlines() if ln.strip()]
        reason = lines[-1] if lines else "no message"
        raise UnsupportedError(
            f"{source}: the TensorFlow Lite Micro interpreter cannot run this model ({reason})",
            hint="check the operators with 'edgepack inspect'",
        )
    return hi


# --- plan data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArenaSize:
    measured_bytes: int
    margin_percent: int
    margin_reason: str
    chosen_bytes: int


@dataclass(frozen=True)
class ResolverOp:
    name: str
    method: str
    label: str  # "FULLY_CONNECTED v4 (x3)"
    kernel_bytes: int


@dataclass(frozen=True)
class McuProject:
    """The frozen payload of an MCU BuildPlan."""

    model_bytes: bytes
    model_file: str  # bundle-relative path of the .tflite copy
    analysis: TfliteModel
    arena: ArenaSize
    ops: tuple[ResolverOp, ...]
    sdk: str
    update_slot_size: int
    update_enabled: bool

    def summary(self) -> dict[str, object]:
        return {
            "engine": "tflite-micro",
            "sdk": self.sdk,
            "arena_measured_bytes": self.arena.measured_bytes,
            "arena_margin_percent": self.arena.margin_percent,
            "arena_bytes": self.arena.chosen_bytes,
            "ops": [op.label for op in self.ops],
            "model_sha256": self.analysis.sha256,
            "update_slot_bytes": self.update_slot_size if self.update_enabled else 0,
        }


def _spec(target: LoadedTarget) -> McuTarget:
    if not isinstance(target.spec, McuTarget):
        raise UnsupportedError(f"{target.source}: not an MCU target (device_class: mcu)")
    return target.spec


def _options(request: BuildRequest) -> dict[str, str]:
    known = {"update"}
    options = dict(request.options)
    for key in options:
        if key not in known:
            raise UnsupportedError(
                f"--opt {key}: unknown option for MCU targets", hint="known: update=on|off"
            )
    if options.get("update", "on") not in ("on", "off"):
        raise UnsupportedError("--opt update: must be 'on' or 'off'")
    return options


def load_tflite(request: BuildRequest, model: ModelInfo) -> tuple[bytes, TfliteModel]:
    """The TFLite bytes to deploy: the inspected .tflite as is, or a Keras/SavedModel model
    converted to a fully int8 model with the calibration data (TensorFlow is imported only on
    that path)."""
    path = model.path
    if model.format != "tflite":
        from packager.models.keras import convert_to_int8_tflite

        data = convert_to_int8_tflite(request.model, request.calibration)
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read the model ({exc.strerror})") from exc
    return data, analyze_tflite(data, str(path))


def check_int8(analysis: TfliteModel, source: str, target: LoadedTarget) -> None:
    floats = analysis.float_tensors
    if _spec(target).runtime.int8_only and floats:
        names = ", ".join(f"'{t.name}'" for t in floats[:3])
        more = f" and {len(floats) - 3} more" if len(floats) > 3 else ""
        raise UnsupportedError(
            f"{source}: float tensors ({names}{more}) but {target.name} runs int8-only TFLite "
            f"Micro kernels",
            hint="give the Keras/SavedModel model with --calibration DIR to get a fully int8 "
            "model, or quantize it with full-integer post-training quantization",
        )


def resolver_ops(analysis: TfliteModel, source: str) -> tuple[ResolverOp, ...]:
    """One resolver entry per distinct operator; unsupported builtins or custom ops are named."""
    unknown: list[str] = []
    ops: dict[str, ResolverOp] = {}
    for op in analysis.ops:
        table = TFLM_CUSTOM_OPS if op.custom else TFLM_OPS
        entry = table.get(op.name)
        if entry is None:
            unknown.append(op.label)
            continue
        previous = ops.get(op.name)
        label = f"{op.name} v{op.version} (x{op.count})"
        if previous is not None:
            label = f"{previous.label}, v{op.version} (x{op.count})"
        ops[op.name] = ResolverOp(op.name, entry[0], label, entry[1])
    if unknown:
        raise UnsupportedError(
            f"{source}: operators TensorFlow Lite Micro does not provide: {', '.join(unknown)}",
            hint="replace them in the model, or register your own kernels for custom ops",
        )
    return tuple(sorted(ops.values(), key=lambda o: o.name))


def update_slot_size(model_bytes: int) -> int:
    # 25 % headroom so later model versions of similar size fit the same flash map.
    return round_up(model_bytes + model_bytes // 4, UPDATE_SECTOR) + UPDATE_SECTOR


def mcu_fit(
    analysis: TfliteModel,
    ops: tuple[ResolverOp, ...],
    arena: ArenaSize,
    target: LoadedTarget,
    *,
    update: bool,
) -> FitReport:
    spec = _spec(target)
    mem = spec.memory
    flash_parts: list[tuple[str, int]] = [
        ("model", analysis.size_bytes),
        ("TFLM framework (estimate)", TFLM_CORE_BYTES),
    ]
    flash_parts += [(f"kernel {op.name} (estimate)", op.kernel_bytes) for op in ops]
    if update:
        slot = update_slot_size(analysis.size_bytes)
        flash_parts += [("update slots (2 x slot)", 2 * slot), ("update stub", UPDATE_STUB_BYTES)]
    flash = Resource(
        name="flash",
        needed_bytes=sum(v for _, v in flash_parts),
        available_bytes=max((mem.flash_kb - mem.flash_reserved_kb) * KIB, 0),
        needed_parts=tuple(flash_parts),
        available_note=f"{mem.flash_kb} KB flash - {mem.flash_reserved_kb} KB reserved",
        estimate_source=f"{TFLM_CORE_SOURCE}; {KERNEL_SOURCE}",
    )
    ram_parts = (
        (f"tensor arena ({arena.measured_bytes} B measured + {arena.margin_percent} %)",
         arena.chosen_bytes),
        ("stack/IO allowance (memory.ram_reserved_kb)", mem.ram_reserved_kb * KIB),
    )
    ram = Resource(
        name="ram",
        needed_bytes=sum(v for _, v in ram_parts),
        available_bytes=mem.ram_kb * KIB,
        needed_parts=ram_parts,
        available_note=f"{mem.ram_kb} KB RAM",
        estimate_source="arena measured with the TensorFlow Lite Micro interpreter (tflite-micro)",
    )
    return FitReport(target=target.name, resources=(ram, flash))


def _c_string(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "\\\"" else "?" for c in text)


def _tensor_context(t: TfliteTensor) -> dict[str, Any]:
    scale = t.quant.scales[0] if t.quant else 0.0
    zero = t.quant.zero_points[0] if t.quant and t.quant.zero_points else 0
    return {
        "name": _c_string(t.name),
        "dtype": t.dtype,
        "c_type": _C_TYPES.get(t.dtype, "uint8_t"),
        "dims": list(t.shape),
        "elements": t.elements,
        "scale": f"{scale!r}f",
        "zero_point": zero,
    }


def hex_lines(data: bytes, per_line: int = 12) -> tuple[str, ...]:
    return tuple(
        ", ".join(f"0x{b:02x}" for b in data[i : i + per_line]) + ","
        for i in range(0, len(data), per_line)
    )


def _c_identifier(name: str) -> str:
    ident = "".join(c if c.isalnum() else "_" for c in name)
    return ident if ident[:1].isalpha() else f"m_{ident}"


def template_context(plan_name: str, project: McuProject, target: LoadedTarget,
                     report: FitReport) -> dict[str, Any]:
    """The single template context of the MCU backend."""
    from packager.tools.gcc_arm import cpu_flags

    spec = _spec(target)
    a = project.analysis
    return {
        "edgepack_version": __version__,
        "target_name": target.name,
        "target_description": spec.description,
        "board": spec.runtime.board,
        "sdk": spec.runtime.sdk,
        "core": spec.mcu.core,
        "fpu": spec.mcu.fpu,
        "cpu_flags": list(cpu_flags(spec.mcu.core, spec.mcu.fpu)),
        "c_name": _c_identifier(plan_name),
        "name": plan_name,
        "model": {
            "file_name": Path(project.model_file).name,
            "bundle_path": project.model_file,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
            "hex_lines": hex_lines(project.model_bytes),
        },
        "arena": {
            "measured_bytes": project.arena.measured_bytes,
            "margin_percent": project.arena.margin_percent,
            "margin_reason": project.arena.margin_reason,
            "chosen_bytes": project.arena.chosen_bytes,
        },
        "inputs": [_tensor_context(t) for t in a.inputs],
        "outputs": [_tensor_context(t) for t in a.outputs],
        "ops": [{"name": op.name, "method": op.method, "label": op.label} for op in project.ops],
        "update": {
            "enabled": project.update_enabled,
            "slot_size": project.update_slot_size,
            "header_area": UPDATE_SECTOR,
        },
        "main_stack_bytes": max(4 * KIB, spec.memory.ram_reserved_kb * KIB // 4),
        "fit": [
            {
                "name": r.name,
                "needed": r.needed_bytes,
                "available": r.available_bytes,
                "parts": [{"label": k, "bytes": v} for k, v in r.needed_parts],
                "note": r.available_note,
                "source": r.estimate_source,
            }
            for r in report.resources
        ],
    }


# Rendered for every MCU target; then the SDK's glue.
_COMMON_FILES: tuple[tuple[str, str], ...] = (
    ("README.md", "mcu/README.md.jinja"),
    ("src/model_data.h", "mcu/model_data.h.jinja"),
    ("src/model_data.cc", "mcu/model_data.cc.jinja"),
    ("src/model_settings.h", "mcu/model_settings.h.jinja"),
    ("src/op_resolver.h", "mcu/op_resolver.h.jinja"),
    ("src/edgepack_inference.h", "mcu/inference.h.jinja"),
    ("src/edgepack_inference.cc", "mcu/inference.cc.jinja"),
    ("src/main.cc", "mcu/main.cc.jinja"),
    ("cmake/CMakeLists.txt", "mcu/CMakeLists.txt.jinja"),
)
_UPDATE_FILES: tuple[tuple[str, str], ...] = (
    ("src/model_update.h", "mcu/model_update.h.jinja"),
    ("src/model_update.c", "mcu/model_update.c.jinja"),
)
_SDK_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "cmake": (),
    "zephyr": (
        ("zephyr/CMakeLists.txt", "mcu/zephyr_CMakeLists.txt.jinja"),
        ("zephyr/prj.conf", "mcu/zephyr_prj.conf.jinja"),
    ),
    "esp-idf": (
        ("esp-idf/CMakeLists.txt", "mcu/esp_idf_CMakeLists.txt.jinja"),
        ("esp-idf/main/CMakeLists.txt", "mcu/esp_idf_main_CMakeLists.txt.jinja"),
        ("esp-idf/main/idf_component.yml", "mcu/esp_idf_component.yml.jinja"),
    ),
    "arduino": (),
}


def rendered_files(sdk: str, *, update: bool) -> tuple[RenderedFile, ...]:
    files = _COMMON_FILES + (_UPDATE_FILES if update else ()) + _SDK_FILES.get(sdk, ())
    return tuple(RenderedFile(path=p, template=t) for p, t in files)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=False,
    )


class McuBackend:
    """TensorFlow Lite Micro projects for microcontroller targets."""

    device_class: ClassVar[str] = "mcu"

    def _measure(
        self, request: BuildRequest, model: ModelInfo, target: LoadedTarget
    ) -> tuple[bytes, TfliteModel, tuple[ResolverOp, ...], ArenaSize]:
        source = str(model.path)
        data, analysis = load_tflite(request, model)
        check_int8(analysis, source, target)
        ops = resolver_ops(analysis, source)
        spec = _spec(target)
        measured = measure_arena(data, source)
        margin = spec.runtime.arena_margin_percent
        arena = ArenaSize(
            measured_bytes=measured,
            margin_percent=margin,
            margin_reason=ARENA_MARGIN_REASONS.get(spec.mcu.core, "kernel scratch buffers"),
            chosen_bytes=chosen_arena(measured, margin),
        )
        return data, analysis, ops, arena

    def fit(self, request: BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        update = _options(request).get("update", "on") == "on"
        _, analysis, ops, arena = self._measure(request, model, target)
        return mcu_fit(analysis, ops, arena, target, update=update)

    def plan(
        self, request: BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> BuildPlan:
        update = _options(request).get("update", "on") == "on"
        data, analysis, ops, arena = self._measure(request, model, target)
        name = request.name or _c_identifier(request.model.name.split(".")[0]).lower()
        project = McuProject(
            model_bytes=data,
            model_file=f"model/{name}.tflite",
            analysis=analysis,
            arena=arena,
            ops=ops,
            sdk=_spec(target).runtime.sdk,
            update_slot_size=update_slot_size(analysis.size_bytes),
            update_enabled=update,
        )
        context = template_context(name, project, target, fit)
        return BuildPlan(
            backend="mcu",
            bundle_name=name,
            version=request.version,
            target=target,
            model=model,
            fit=fit,
            rendered=rendered_files(project.sdk, update=update),
            payload=project,
            context=tuple(sorted(context.items())),
        )

    def execute(self, plan: BuildPlan, staging: Path, cache_dir: Path) -> ExecuteResult:
        project = plan.payload
        assert isinstance(project, McuProject)
        env = _environment()
        context = plan.context_dict()
        written: list[str] = []
        for item in plan.rendered:
            text = env.get_template(item.template).render(context)
            path = staging / item.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            path.chmod(item.mode)
            written.append(item.path)
        model_path = staging / project.model_file
        model_path.parent.mkdir(parents=True, exist_ok=True)
        model_path.write_bytes(project.model_bytes)
        written.append(project.model_file)
        summary = project.summary()
        return ExecuteResult(
            files=tuple(sorted(written)),
            manifest_extra=(("mcu", summary),),
            json_extra=(("mcu", summary),),
        )
