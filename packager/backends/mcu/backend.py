"""Microcontroller bundles: a TensorFlow Lite Micro project rendered from ``templates/mcu``.

fit() measures what the model needs (the tensor arena, by running the real TFLite Micro
interpreter; flash, from the model plus an estimate of the kernels it links), plan() computes the
files to render as a frozen :class:`McuProject`, and execute() writes them. Nothing here writes
``manifest.json``: the build core does that over the finished staging directory.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from packager import __version__
from packager.backends import base
from packager.backends.mcu.emulate import board_context, default_kernels, proof_note
from packager.bundle.manifest import MANIFEST, TargetInfo
from packager.console import capture_fd
from packager.errors import FitError, InputError, UnsupportedError, UsageError
from packager.fit import FitReport, Resource, human_bytes
from packager.models.info import ModelInfo
from packager.models.tflite import TfliteModel, TfliteTensor, analyze_tflite
from packager.render import render_files
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
# The slot header of templates/mcu/model_update.h (format version 1): 64 bytes, little-endian.
UPDATE_MAGIC = 0x554D5045  # "EPMU"
UPDATE_FORMAT_VERSION = 1
UPDATE_HEADER_SIZE = 64
# The model a bundle ships is version 1, sequence 1 in slot A; the first update goes to slot B.
SHIPPED_MODEL_VERSION = 1
SHIPPED_SEQUENCE = 1
SLOT_A_FILE = "model/model_slot_a.bin"
SLOT_LABELS = ("model in update slot A", "model in update slot B")

_C_TYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "int32": "int32_t",
            "int64": "int64_t", "float32": "float", "bool": "bool"}


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` (> 0) not below ``value``."""
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
    """The TFLM tensor arena of a project, in bytes: as measured, the target's margin (percent)
    and why the core needs it (:data:`ARENA_MARGIN_REASONS`), and the size compiled in."""

    measured_bytes: int
    margin_percent: int
    margin_reason: str
    chosen_bytes: int


@dataclass(frozen=True)
class ResolverOp:
    """One operator of the model's ``MicroMutableOpResolver``: its TFLite builtin (or custom)
    name, the resolver's ``Add...`` method, and its estimated kernel code size in bytes."""

    name: str
    method: str
    label: str  # "FULLY_CONNECTED v4 (x3)"
    kernel_bytes: int


@dataclass(frozen=True)
class McuProject:
    """The frozen payload of an MCU PackagePlan."""

    model_bytes: bytes
    model_file: str  # bundle-relative path of the .tflite copy
    analysis: TfliteModel
    arena: ArenaSize
    ops: tuple[ResolverOp, ...]
    sdk: str
    update_slot_size: int
    update_enabled: bool
    # With updates on: where the slots go; slot A's image is written to SLOT_A_FILE.
    flash: FlashMap | None = None

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {
            "engine": "tflite-micro",
            "sdk": self.sdk,
            "arena_measured_bytes": self.arena.measured_bytes,
            "arena_margin_percent": self.arena.margin_percent,
            "arena_bytes": self.arena.chosen_bytes,
            "ops": [op.label for op in self.ops],
            "model_sha256": self.analysis.sha256,
            "update_slot_bytes": self.update_slot_size if self.update_enabled else 0,
        }
        if self.update_enabled and self.flash is not None:
            summary["update_slots"] = {
                "slot_bytes": self.flash.slot_size,
                "header_area_bytes": self.flash.header_area,
                "slot_a_addr": f"0x{self.flash.slot_a_addr:08x}",
                "slot_b_addr": f"0x{self.flash.slot_b_addr:08x}",
                "firmware_limit_addr": f"0x{self.flash.firmware_limit:08x}",
                # Flash this file at slot_a_addr: the firmware boots the model from it.
                "slot_a_image": SLOT_A_FILE,
                "slot_a_model_version": SHIPPED_MODEL_VERSION,
            }
        return summary


def _spec(target: LoadedTarget) -> McuTarget:
    if not isinstance(target.spec, McuTarget):
        raise UnsupportedError(f"{target.source}: not an MCU target (device_class: mcu)")
    return target.spec


# `--opt KEY=VALUE` this class takes: the update slots and the proof under emulation, each
# on unless turned off.
OPTIONS: dict[str, tuple[str, ...]] = {"update": ("on", "off"), "emulate": ("on", "off")}


def _options(request: base.BuildRequest) -> dict[str, str]:
    """``--opt`` values (:data:`OPTIONS`); UsageError (exit 2) for any other key or value."""
    return base.checked_options(request, OPTIONS, "MCU")


def load_tflite(model: ModelInfo) -> bytes:
    """The TFLite bytes to deploy: the inspected .tflite as is. Other formats were converted by
    the build's :class:`ConvertStep` (:meth:`McuBackend.source_steps`) before they got here."""
    path = model.path
    if model.format != "tflite":
        raise UnsupportedError(
            f"{path}: an MCU bundle deploys a TFLite model, not {model.format}",
            hint="build it with 'edgepack build', which converts ONNX, Keras/SavedModel and "
            "PyTorch models to int8 TFLite first",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the model ({exc.strerror})") from exc


@dataclass(frozen=True)
class Measurement:
    """What fit and plan both need of a model, measured once (:func:`measure`)."""

    data: bytes
    analysis: TfliteModel
    ops: tuple[ResolverOp, ...]
    arena: ArenaSize


@lru_cache(maxsize=8)
def measure(data: bytes, source: str, core: str, margin_percent: int) -> Measurement:
    """The model's analysis, resolver and tensor arena (measured with the TFLM interpreter,
    :func:`measure_arena`) for a target of ``core`` with ``margin_percent``: cached, so a
    build's fit and plan share one measurement."""
    analysis = analyze_tflite(data, source)
    check_static_shapes(analysis, source)
    ops = resolver_ops(analysis, source)
    measured = measure_arena(data, source)
    arena = ArenaSize(
        measured_bytes=measured,
        margin_percent=margin_percent,
        margin_reason=ARENA_MARGIN_REASONS.get(core, "kernel scratch buffers"),
        chosen_bytes=chosen_arena(measured, margin_percent),
    )
    return Measurement(data=data, analysis=analysis, ops=ops, arena=arena)


def check_static_shapes(analysis: TfliteModel, source: str) -> None:
    """Refuse a model whose inputs or outputs declare a dynamic dim past the batch axis
    (``shape_signature`` -1 at axis >= 1): UnsupportedError (exit 10) naming the tensor and axis.

    TensorFlow Lite Micro allocates and runs the stored dims only (tflite-micro
    micro_allocator.cc reads ``shape``, never ``shape_signature``), where a dynamic dim is stored
    as 1: a dynamic batch runs as the batch of 1 a microcontroller serves, but a dynamic sequence
    length or image size would silently run at 1, which is not the model its builder meant."""
    for role, tensors in (("input", analysis.inputs), ("output", analysis.outputs)):
        for tensor in tensors:
            axes = [axis for axis in tensor.dynamic_axes if axis >= 1]
            if axes:
                raise UnsupportedError(
                    f"{source}: {role} {tensor.name!r} has a dynamic dim at axis {axes[0]} "
                    f"(shape_signature {list(tensor.signature)}); TensorFlow Lite Micro runs the "
                    f"stored shape {list(tensor.shape)}, so that dim would silently be 1",
                    hint="convert the model with a fixed shape for that axis (e.g. a Keras Input "
                    "with every dim but the batch given)",
                )


def check_int8(analysis: TfliteModel, source: str, target: LoadedTarget) -> None:
    """Refuse a model that is not fully int8 for a target of int8-only kernels
    (``runtime.int8_only``): UnsupportedError (exit 10) naming its float tensors and operators."""
    floats = analysis.float_tensors
    if _spec(target).runtime.int8_only and floats:
        names = ", ".join(f"'{t.name}'" for t in floats[:3])
        more = f" and {len(floats) - 3} more" if len(floats) > 3 else ""
        ops = f"float operators {', '.join(analysis.float_op_names)} on " if (
            analysis.float_op_names
        ) else ""
        raise UnsupportedError(
            f"{source}: {ops}float tensors ({names}{more}) but {target.name} runs int8-only "
            f"TFLite Micro kernels",
            hint="give the ONNX/Keras/SavedModel/PyTorch model with --calibration DIR to get a "
            "fully int8 model, or quantize it with full-integer post-training quantization",
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
    """Bytes of one model-update slot: the model plus 25 % headroom, rounded up to the 4 KiB erase
    sector, plus one sector for the slot header."""
    # 25 % headroom so later model versions of similar size fit the same flash map.
    return round_up(model_bytes + model_bytes // 4, UPDATE_SECTOR) + UPDATE_SECTOR


@dataclass(frozen=True)
class FlashMap:
    """Where the two model-update slots sit in the target's flash (CPU addresses, bytes).

    The slots take the top of the application flash: from ``memory.flash_base`` the firmware
    grows upwards, ``memory.flash_reserved_kb`` stays free at the very top, and slot B ends just
    below it (rounded down to the 4 KiB erase sector), slot A just below slot B. The firmware
    runs the model from the active slot, so the model is stored once per slot and nowhere else.
    """

    slot_size: int
    header_area: int
    slot_a_addr: int
    slot_b_addr: int
    firmware_limit: int  # first byte the firmware itself must stay below (== slot_a_addr)


def flash_map(spec: McuTarget, model_bytes: int) -> FlashMap:
    """The target's :class:`FlashMap` for a model of ``model_bytes`` bytes (see there)."""
    mem = spec.memory
    slot = update_slot_size(model_bytes)
    top = mem.flash_base + max(mem.flash_kb - mem.flash_reserved_kb, 0) * KIB
    top -= top % UPDATE_SECTOR
    # A model too large for the flash (built anyway with --force) still gets addresses inside
    # the flash; the fit report has already said it does not fit.
    slot_a = max(top - 2 * slot, mem.flash_base)
    return FlashMap(
        slot_size=slot,
        header_area=UPDATE_SECTOR,
        slot_a_addr=slot_a,
        slot_b_addr=slot_a + slot,
        firmware_limit=slot_a,
    )


def slot_header(
    model: bytes, *, model_version: int = SHIPPED_MODEL_VERSION, sequence: int = SHIPPED_SEQUENCE
) -> bytes:
    """The 64-byte slot header ``ep_update_finish`` commits (model_update.c header_encode):
    magic, format version, header size, model version, sequence, length, CRC32 (zlib), SHA-256,
    4 reserved zero bytes, and the CRC32 of the 60 bytes before it."""
    head = struct.pack(
        "<IHHIIII32s4x",
        UPDATE_MAGIC,
        UPDATE_FORMAT_VERSION,
        UPDATE_HEADER_SIZE,
        model_version,
        sequence,
        len(model),
        zlib.crc32(model),
        hashlib.sha256(model).digest(),
    )
    return head + struct.pack("<I", zlib.crc32(head))


def slot_image(model: bytes, slot_size: int, header_area: int) -> bytes:
    """Slot A as flashed at the factory: the model at the slot start, erased flash (0xFF) up
    to the header area at the slot's end, then the committed header (0xFF after it).

    Raises ValueError when the model does not fit the slot's data area."""
    capacity = slot_size - header_area
    if not 0 < len(model) <= capacity or header_area < UPDATE_HEADER_SIZE:
        raise ValueError(f"a {len(model)} B model does not fit a slot of {capacity} data bytes")
    header = slot_header(model)
    return (
        model
        + b"\xff" * (capacity - len(model))
        + header
        + b"\xff" * (header_area - len(header))
    )


def mcu_fit(
    analysis: TfliteModel,
    ops: tuple[ResolverOp, ...],
    arena: ArenaSize,
    target: LoadedTarget,
    *,
    update: bool,
) -> FitReport:
    """RAM and flash of the project, in bytes: RAM = the chosen arena + ``memory.ram_reserved_kb``;
    flash = the model (with ``update``: two update slots and the update stub instead) + the TFLM
    framework + each kernel, estimates whose sources the report names."""
    spec = _spec(target)
    mem = spec.memory
    flash_parts: list[tuple[str, int]] = [
        ("model", analysis.size_bytes),
        ("TFLM framework (estimate)", TFLM_CORE_BYTES),
    ]
    flash_parts += [(f"kernel {op.name} (estimate)", op.kernel_bytes) for op in ops]
    if update:
        # The firmware runs the model from the active slot: the model is stored once per slot
        # (slot A ships it, slot B takes the next update) and not compiled into the firmware.
        slot = update_slot_size(analysis.size_bytes)
        flash_parts[0:1] = [(SLOT_LABELS[0], slot), (SLOT_LABELS[1], slot)]
        flash_parts.append(("update stub", UPDATE_STUB_BYTES))
    flash = Resource(
        name="flash",
        needed_bytes=sum(v for _, v in flash_parts),
        available_bytes=max((mem.flash_kb - mem.flash_reserved_kb) * KIB, 0),
        needed_parts=tuple(flash_parts),
        available_note=f"{mem.flash_kb} KB flash - {mem.flash_reserved_kb} KB reserved",
        estimate_source=f"{TFLM_CORE_SOURCE}; {KERNEL_SOURCE}"
        + (f"; each update slot: model + 25 % headroom rounded up to {UPDATE_SECTOR} B + a "
           f"{UPDATE_SECTOR} B header sector" if update else ""),
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


def refuse_update_slots(report: FitReport, without: FitReport, model_label: str) -> None:
    """Raise FitError naming the update slots when flash is what does not fit with updates on
    (RAM problems are left to :func:`packager.fit.enforce`); ``without`` is the same model's
    report with updates off, whose flash figure the message gives."""
    ram, flash = report.resources
    if not ram.fits or flash.fits:
        return
    slots = sum(v for k, v in flash.needed_parts if k in SLOT_LABELS)
    single = without.resources[1]
    parts = " + ".join(f"{label} {human_bytes(v)}" for label, v in flash.needed_parts if v)
    outcome = "fits" if single.fits else "still does not fit"
    raise FitError(
        f"{model_label} does not fit {report.target}: flash needs "
        f"{human_bytes(flash.needed_bytes)} ({parts}), the target has "
        f"{human_bytes(flash.available_bytes)} ({flash.available_note}); the two model-update "
        f"slots take {human_bytes(slots)} of it. Without updates flash needs "
        f"{human_bytes(single.needed_bytes)} ({outcome})",
        hint="build with --opt update=off (one copy of the model, compiled into the firmware; "
        "no over-the-air model updates)" + ("" if single.fits else ", and use a smaller model"),
    )


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
    """``data`` as lines of a C array initializer, ``per_line`` bytes each: ``0x1c, 0x00, ...,``."""
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
        "kernels": default_kernels(spec.mcu.core),
        "c_name": _c_identifier(plan_name),
        "name": plan_name,
        "model": {
            "file_name": Path(project.model_file).name,
            "bundle_path": project.model_file,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
            # With updates on, the model lives in the slots and not in the firmware.
            "hex_lines": () if project.update_enabled else hex_lines(project.model_bytes),
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
            "slot_a_addr": f"0x{project.flash.slot_a_addr:08x}" if project.flash else "",
            "slot_b_addr": f"0x{project.flash.slot_b_addr:08x}" if project.flash else "",
            "slot_a_file": SLOT_A_FILE,
            "model_version": SHIPPED_MODEL_VERSION,
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


def emulate_files(board: str | None) -> tuple[tuple[str, str], ...]:
    """The emulator harness (``edgepack run``) of a core QEMU emulates: startup and linker
    script of its board, and a main that runs N inferences (packager.backends.mcu.emulate)."""
    if board is None:
        return ()
    return (
        ("emulate/main.cc", "mcu/emulate_main.cc.jinja"),
        (f"emulate/startup_{board}.c", "mcu/emulate_startup.c.jinja"),
        (f"emulate/{board}.ld", "mcu/emulate_board.ld.jinja"),
    )


def rendered_files(
    sdk: str, *, update: bool, board: str | None = None
) -> tuple[base.RenderedFile, ...]:
    """The project's files: the common sources, the update slots' code with ``update``, the glue of
    ``sdk`` (none for ``cmake``/``arduino``) and the emulator harness of ``board``."""
    files = (_COMMON_FILES + (_UPDATE_FILES if update else ()) + _SDK_FILES.get(sdk, ())
             + emulate_files(board))
    return tuple(base.RenderedFile(path=p, template=t) for p, t in files)


class McuBackend:
    """TensorFlow Lite Micro projects for microcontroller targets."""

    device_class: ClassVar[str] = "mcu"

    def check_request(self, request: base.BuildRequest) -> None:
        """The options (``--opt update|emulate``), and no OTA flags: the OTA agent installs
        container images; an MCU updates its model through its flash slots."""
        _options(request)
        if request.ota_repo is not None or request.ota_root is not None:
            flag = "--ota-repo" if request.ota_repo is not None else "--ota-root"
            raise UsageError(
                f"{flag}: MCU bundles are not installed by the OTA agent",
                hint="leave out --ota-repo/--ota-root; the firmware takes model updates "
                "through its update slots (--opt update=on)",
            )

    def source_steps(
        self, request: base.BuildRequest, source: base.SourceModel, target: LoadedTarget
    ) -> tuple[base.SourceStep, ...]:
        """A TFLite model as it is; ONNX, Keras/SavedModel and PyTorch converted to a fully
        int8 TFLite model (calibrated on --calibration) first."""
        _spec(target)
        steps: tuple[base.SourceStep, ...] = ()
        if source.format != "tflite":
            steps = (base.ConvertStep(route=source.format),)
        # MCU targets prefer no optimizer precision of their own: --quantize only.
        optimize = base.preferred_quantize(request, source, "fp32")
        return steps if optimize is None else (*steps, optimize)

    def _measure(self, model: ModelInfo, target: LoadedTarget) -> Measurement:
        source = str(model.path)
        spec = _spec(target)
        found = measure(load_tflite(model), source, spec.mcu.core,
                        spec.runtime.arena_margin_percent)
        check_int8(found.analysis, source, target)
        return found

    def fit(self, request: base.BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        update = _options(request).get("update", "on") == "on"
        m = self._measure(model, target)
        report = mcu_fit(m.analysis, m.ops, m.arena, target, update=update)
        if update and not request.force:
            refuse_update_slots(report, mcu_fit(m.analysis, m.ops, m.arena, target, update=False),
                                request.model.name)
        return report

    def plan(
        self, request: base.BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> base.PackagePlan:
        update = _options(request).get("update", "on") == "on"
        m = self._measure(model, target)
        name = base.bundle_name(request)
        spec = _spec(target)
        project = McuProject(
            model_bytes=m.data,
            model_file=f"model/{name}.tflite",
            analysis=m.analysis,
            arena=m.arena,
            ops=m.ops,
            sdk=spec.runtime.sdk,
            update_slot_size=update_slot_size(m.analysis.size_bytes),
            update_enabled=update,
            flash=flash_map(spec, m.analysis.size_bytes) if update else None,
        )
        context = template_context(name, project, target, fit)
        emulate = board_context(spec.mcu.core, spec.memory.flash_kb, spec.memory.ram_kb,
                                int(context["main_stack_bytes"]))
        context["emulate"] = emulate
        context["proof"] = _options(request).get("emulate", "on")
        return base.PackagePlan.for_request(
            self.device_class, request, name, (target, model, fit),
            rendered=rendered_files(project.sdk, update=update,
                                    board=emulate.get("board") if emulate else None),
            payload=project,
            context=tuple(sorted(context.items())),
        )

    def execute(self, plan: base.PackagePlan, staging: Path, cache_dir: Path) -> base.ExecuteResult:
        project = plan.payload
        assert isinstance(project, McuProject)
        written = list(render_files(plan.rendered, plan.context_dict(), staging))
        model_path = staging / project.model_file
        model_path.parent.mkdir(parents=True, exist_ok=True)
        model_path.write_bytes(project.model_bytes)
        written.append(project.model_file)
        if project.update_enabled and project.flash is not None:
            # Slot A as the factory flashes it (at flash.slot_a_addr): the firmware boots the
            # model from here, so this file is part of what gets flashed, not a copy.
            image = slot_image(project.model_bytes, project.flash.slot_size,
                               project.flash.header_area)
            (staging / SLOT_A_FILE).write_bytes(image)
            written.append(SLOT_A_FILE)
        summary = project.summary()
        if plan.context_dict().get("proof", "on") == "on":
            summary["proof"] = prove_firmware(plan, staging, set(written), project)
        else:
            summary["proof"] = {"emulated": False, "note": "skipped: --opt emulate=off"}
        written.append(write_sbom(plan, staging))
        return base.ExecuteResult(
            files=tuple(sorted(written)),
            device=summary,
            json_extra=(("mcu", summary),),
            summary=summary_lines(summary),
        )

    def evaluate_on_target(
        self, plan: base.PackagePlan, result: base.ExecuteResult, job: base.OnTargetEval
    ) -> dict[str, Any]:
        return job.report  # the firmware proof (execute) is this class's on-target measurement

    def target_meta(self, target: LoadedTarget) -> TargetInfo:
        spec = _spec(target)
        return TargetInfo(name=spec.name, device_class=spec.device_class)

    def target_notes(self, target: LoadedTarget) -> tuple[base.TargetNote, ...]:
        provable, note = proof_note(_spec(target).mcu.core)
        what = "proof before flash" if provable else "not proven"
        return (base.TargetNote(key="proof", value={"emulated": provable, "note": note},
                           line=f"{what}: {note}"),)

    def try_bundle(self, request: base.TryRequest, manifest: base.Manifest) -> base.TryResult:
        """Build the bundle's firmware and run it on the emulated board of its core."""
        from packager.backends.mcu.emulate import emulate_bundle, load_inputs
        from packager.console import console

        inputs = load_inputs(request.bundle, list(request.inputs)) if request.inputs else None
        console.status(f"building and emulating {request.bundle} "
                       f"({request.kernels or 'default'} kernels)")
        doc = emulate_bundle(request.bundle, inputs, tree=request.toolchain_tree,
                             kernels=request.kernels, manifest=manifest).to_json()
        lines = [f"inference {n}: outputs {outs}, {doc['instructions'][n]:,} instructions"
                 for n, outs in enumerate(doc["outputs"])]
        linked = doc["linked"]
        lines.append(
            f"{doc['board']}: arena {doc['arena_used_bytes']:,} of {doc['arena_bytes']:,} B used; "
            f"linked flash {linked['flash_bytes']:,} B, RAM {linked['ram_bytes']:,} B (static); "
            f"latency ~{doc['latency_estimate_ms']} ms ({doc['latency_estimate_basis']}); "
            f"instructions +-{doc['instructions_resolution']} ({doc['instructions_source']})")
        return base.TryResult(document=doc, lines=tuple(lines))

    def verify_bundle(self, root: Path, manifest: base.Manifest) -> tuple[str, ...]:
        """The ``device`` section must be an MCU's (VerifyError, exit 8, otherwise)."""
        from packager.backends.mcu.manifest import McuSection

        manifest.device_as(McuSection, str(root / MANIFEST))
        return ()

    def release_compatibility(self, root: Path, manifest: base.Manifest) -> dict[str, str]:
        """Never asked in practice (check_publishable refuses every MCU bundle first)."""
        return {}

    def check_publishable(self, root: Path, manifest: base.Manifest) -> None:
        raise UnsupportedError(
            f"{root / MANIFEST}: target.device_class is {manifest.target.device_class!r}; OTA "
            "installs linux-container bundles only",
            hint="an MCU takes model updates through its firmware's update slots",
        )


def summary_lines(summary: dict[str, Any]) -> tuple[str, ...]:
    """``edgepack build``'s lines on the firmware proof before flash and where slot A goes."""
    lines = []
    proof = summary.get("proof")
    if isinstance(proof, dict):
        if not proof.get("emulated"):
            line = f"not proven: {proof.get('note', 'no emulation')}"
        else:
            linked = proof.get("linked", {})
            line = (f"firmware run on {proof.get('board')} ({proof.get('kernels')} kernels), "
                    f"outputs equal the interpreter's; linked flash "
                    f"{linked.get('flash_bytes', 0):,} B, RAM {linked.get('ram_bytes', 0):,} B")
        lines.append(f"proof:    {line}")
    slots = summary.get("update_slots")
    if isinstance(slots, dict):
        lines.append(f"slot A:   flash {slots['slot_a_image']} at {slots['slot_a_addr']}")
    return tuple(lines)


def write_sbom(plan: base.PackagePlan, staging: Path) -> str:
    """``sbom.cdx.json`` for an MCU bundle: its model, TFLite Micro and generated sources
    (packager.bundle.sbom), over every file written so far."""
    from packager.backends.mcu.sbom import build_mcu_sbom
    from packager.bundle.sbom import SBOM_FILE
    from packager.digest import sha256_path

    files = {
        p.relative_to(staging).as_posix(): sha256_path(p)[0]
        for p in sorted(staging.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
    model_file = next((f for f in files if f.endswith(".tflite")), "")
    text = build_mcu_sbom(
        name=plan.bundle_name,
        version=plan.version,
        files=files,
        model_file=model_file,
        sdk=_spec(plan.target).runtime.sdk,
        epoch=base.created_epoch(),
    )
    (staging / SBOM_FILE).write_text(text, encoding="utf-8")
    return SBOM_FILE


def prove_firmware(plan: base.PackagePlan, staging: Path, written: set[str],
                   project: McuProject) -> dict[str, Any]:
    """Proof before flash (issue 14): compile and link the rendered project's firmware, run one
    input on the emulated board of the target's core, compare with the TFLM interpreter, and
    refuse (FitError) a firmware whose *linked* flash/RAM does not fit, naming the estimate too.

    Runs where the toolchain, qemu-system-arm and a TFLM tree ($EDGEPACK_TFLM_TREE) are present;
    otherwise returns a note saying what is missing. Deterministic: the input is seeded and
    instruction counts under ``-icount`` repeat exactly."""
    import numpy as np

    from packager.backends.mcu import emulate as mcu_emulate
    from packager.tools import gcc_arm, qemu

    spec = _spec(plan.target)
    provable, note = mcu_emulate.proof_note(spec.mcu.core)
    if not provable:
        return {"emulated": False, "note": note}
    missing = [t.apt_package for t in (gcc_arm.GXX, gcc_arm.SIZE, qemu.QEMU_SYSTEM_ARM,
                                       qemu.BWRAP)
               if not t.available()]
    if missing or not os.environ.get("EDGEPACK_TFLM_TREE"):
        what = f"apt-get install {' '.join(missing)}" if missing else "EDGEPACK_TFLM_TREE unset"
        return {"emulated": False, "note": f"skipped: {what}"}
    a = project.analysis
    rng = np.random.default_rng(0)
    x = [rng.integers(np.iinfo(t.dtype).min, np.iinfo(t.dtype).max + 1, size=t.shape,
                      dtype=t.dtype) if np.dtype(t.dtype).kind in "iu"
         else rng.standard_normal(t.shape).astype(t.dtype) for t in a.inputs]
    run = mcu_emulate.emulate_project(
        staging, written, spec, [x],
        before_run=lambda flash, ram: _check_linked(plan, flash, ram, project))
    want = _interpreter_outputs(project.model_bytes, project.arena.chosen_bytes, x,
                                len(a.outputs))
    same = all(np.array_equal(g.reshape(-1), w.reshape(-1))
               for g, w in zip(run.outputs[0], want, strict=True))
    if not same:
        raise FitError(f"{plan.target.name}: the emulated firmware's outputs differ from the "
                       "TensorFlow Lite Micro interpreter's on the proof input",
                       hint="report it; build with --opt emulate=off to skip the proof")
    doc = run.to_json()
    return {"emulated": True, "board": doc["board"], "kernels": doc["kernels"],
            "outputs_equal_interpreter": True, "linked": doc["linked"],
            "instructions": doc["instructions"][0],
            "latency_estimate_ms": doc["latency_estimate_ms"],
            "latency_estimate_basis": doc["latency_estimate_basis"],
            "arena_used_bytes": doc["arena_used_bytes"]}


def _interpreter_outputs(model: bytes, arena: int, inputs: list[Any],
                         outputs: int) -> list[Any]:
    import numpy as np
    from tflite_micro.python.tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena)
    for i, x in enumerate(inputs):
        interpreter.set_input(x, i)
    interpreter.invoke()
    return [np.array(interpreter.get_output(i)) for i in range(outputs)]


def _check_linked(
    plan: base.PackagePlan, flash_fw: int, ram_static: int, project: McuProject
) -> None:
    """The fit check on linked sizes: firmware (text + data) plus the update slots against the
    usable flash; static RAM (data + bss, the arena included) plus the stack/IO allowance."""
    spec = _spec(plan.target)
    mem = spec.memory
    estimate = {r.name: r.needed_bytes for r in plan.fit.resources}
    slots = 2 * project.flash.slot_size if project.update_enabled and project.flash else 0
    flash_need = flash_fw + slots
    flash_have = max((mem.flash_kb - mem.flash_reserved_kb) * KIB, 0)
    ram_need = ram_static + mem.ram_reserved_kb * KIB
    ram_have = mem.ram_kb * KIB
    with_slots = f" + update slots {slots:,} B" if slots else ""
    if flash_need > flash_have:
        raise FitError(
            f"{plan.target.name}: the linked firmware does not fit flash: {flash_need:,} B "
            f"(firmware {flash_fw:,} B from arm-none-eabi-size{with_slots})"
            f" > {flash_have:,} B usable; the estimate was {estimate.get('flash', 0):,} B",
            hint="a smaller model, --opt update=off, or a target with more flash")
    if ram_need > ram_have:
        raise FitError(
            f"{plan.target.name}: the linked firmware does not fit RAM: {ram_need:,} B (static "
            f"{ram_static:,} B + {mem.ram_reserved_kb} KB stack/IO) > {ram_have:,} B; the "
            f"estimate was {estimate.get('ram', 0):,} B",
            hint="a smaller model or a target with more RAM")
