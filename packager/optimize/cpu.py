"""The CPU an INT8 model is quantized for and measured on.

onnxruntime's integer kernels differ by instruction set, and so does what a model must look like
to be computed right on them. onnxruntime's quantization guide (onnxruntime.ai, "Quantize ONNX
models": "Data type selection" and FAQ "When to use reduce-range and per-channel quantization?",
docs/performance/model-optimizations/quantization.md) says:

- S8S8 (int8 activations and weights) with QDQ is the default and should be the first choice;
  S8S8 with QOperator is slow on x86-64 and should be avoided there (U8S8 instead);
- on x86-64 with AVX2/AVX-512 but without VNNI, the U8S8 kernels use VPMADDUBSW, whose 16-bit
  sums saturate; ``reduce_range`` (7-bit weights) "is designed for the U8S8 format on AVX2 and
  AVX512 (non-VNNI) machines to mitigate saturation issues. This is not needed on machines
  supporting VNNI"; with per-channel weights "you will generally need to enable reduce-range";
- "There is no such issue on other CPU architectures (x64 with VNNI and ARM)"; ARM with the
  dot-product extension is also where INT8 pays off most.

Measured here (onnxruntime 1.32, Conv->Resize(linear)->Conv, static QDQ per-channel S8S8):
without ``reduce_range`` cosine 0.972 vs FP32 on an AVX2 CPU without VNNI (qemu Haswell-v4),
0.99996 with VNNI and with SSE4.1 only; with ``reduce_range`` 0.9999 on all three. x86 S8S8 runs
on the U8S8 kernels, so it saturates too.

A target's ``cpu.isa`` is the floor its devices guarantee: an x86 target that does not list VNNI
may meet AVX2 parts, so it gets ``reduce_range`` (7-bit weights cost 0.00004 of cosine above).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ActivationType = Literal["QInt8", "QUInt8"]
CpuSource = Literal["target", "host"]
# Whose int8 kernels a model is quantized for: onnxruntime's CPU kernels (by the CPU's ISA), or
# TensorRT's explicit-quantization importer (a target whose runtime engine is "tensorrt").
Int8Profile = Literal["cpu", "tensorrt"]

# Spellings of the VNNI extensions in target files (avx512-vnni, avx-vnni) and /proc/cpuinfo
# (avx512_vnni, avx_vnni, avx_vnni_int8), compared with '-' and '_' removed.
_VNNI = frozenset({"vnni", "avx512vnni", "avxvnni", "avxvnniint8"})
_DOTPROD = frozenset({"dotprod", "asimddp"})  # target files / arm64 /proc/cpuinfo
_AVX2 = frozenset({"avx2", "x8664v3", "x8664v4"})
_X86 = frozenset({"amd64", "x86_64"})
_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}
# The x86 CPU qemu-user emulates for an accuracy check of a target without VNNI: AVX2 without
# VNNI, the kernels that saturate (qemu's TCG implements AVX2 but no AVX-512, so this is the one
# non-VNNI class with 16-bit saturation it can run).
X86_NO_VNNI_QEMU_CPU = "Haswell-v4"
CPUINFO = Path("/proc/cpuinfo")


def _norm(feature: str) -> str:
    return feature.lower().replace("-", "").replace("_", "").replace(".", "")


@dataclass(frozen=True)
class CpuProfile:
    """What planning needs to know of a CPU: architecture (``amd64``, ``arm64``, ``armv7``),
    its instruction-set features (a target's ``cpu.isa``, or the host's /proc/cpuinfo flags) and
    a name for reports (``industrial-pc (x86-64-v2)``, ``AMD EPYC``)."""

    arch: str
    isa: tuple[str, ...]
    name: str
    source: CpuSource

    def _has(self, names: frozenset[str]) -> bool:
        return any(_norm(f) in names for f in self.isa)

    @property
    def x86(self) -> bool:
        return self.arch in _X86

    @property
    def vnni(self) -> bool:
        return self.x86 and self._has(_VNNI)

    @property
    def avx2(self) -> bool:
        return self.x86 and self._has(_AVX2)

    @property
    def dotprod(self) -> bool:
        return not self.x86 and self._has(_DOTPROD)

    def describe(self) -> str:
        """``industrial-pc (x86-64-v2; amd64, no VNNI)``, ``AMD EPYC (host; amd64, VNNI)``."""
        if self.x86:
            feature = "VNNI" if self.vnni else ("AVX2, no VNNI" if self.avx2 else "no VNNI")
        else:
            feature = "dot product" if self.dotprod else "no dot product"
        return f"{self.name} ({self.source}; {self.arch}, {feature})"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "arch": self.arch,
            "vnni": self.vnni if self.x86 else None,
            "avx2": self.avx2 if self.x86 else None,
            "dotprod": self.dotprod if not self.x86 else None,
        }


@dataclass(frozen=True)
class Int8Settings:
    """onnxruntime quantizer settings for one CPU: ``activation_type``/``weight_type`` are
    ``QuantType`` member names, ``reduce_range`` 7-bit weights; ``reason`` says why."""

    activation_type: ActivationType
    weight_type: Literal["QInt8"]
    reduce_range: bool
    reason: str
    # onnxruntime quantize_static ``extra_options`` as sorted (name, value) pairs; () for the
    # CPU profiles (onnxruntime's defaults), set by :func:`tensorrt_int8_settings`.
    extra_options: tuple[tuple[str, bool], ...] = ()
    profile: Int8Profile = "cpu"

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "reduce_range": self.reduce_range,
            "reason": self.reason,
        }
        if self.profile != "cpu":
            document["profile"] = self.profile
            document["extra_options"] = dict(self.extra_options)
        return document


# onnxruntime quantizer options for TensorRT (see tensorrt_int8_settings), name -> value.
TENSORRT_EXTRA_OPTIONS: tuple[tuple[str, bool], ...] = (
    ("ActivationSymmetric", True),  # zero point 0 on activations: TensorRT is symmetric only
    ("AddQDQPairToWeight", True),  # float weight -> Q -> DQ, the form TensorRT 8.x imports
    ("DedicatedQDQPair", True),  # one Q/DQ pair per consumer: no Q/DQ shared across layers
    # onnxruntime 1.20+ (microsoft/onnxruntime#22020) widens a weight's scale when the int32
    # bias scale would be too small; that step fails on [1, N] Gemm biases even with QuantizeBias
    # off (onnxruntime#24815; measured on 1.32 with mnist.onnx). Older versions ignore the key.
    ("QDQDisableWeightAdjustForInt32Bias", True),
    ("QuantizeBias", False),  # float bias: TensorRT has no int32 DequantizeLinear
    ("WeightSymmetric", True),  # zero point 0 on weights
)


def tensorrt_int8_settings() -> Int8Settings:
    """The quantizer settings whose output TensorRT's ONNX parser imports as explicit Q/DQ.

    TensorRT quantizes symmetrically to signed int8, zero point 0, per-tensor activations and
    per-output-channel weights, opset >= 13, no int32 (bias) DequantizeLinear, no QLinear*
    operators (onnx-tensorrt docs/operators.md, QuantizeLinear/DequantizeLinear: "zero point
    must be 0", INT8 only; its QuantDequantLinearHelper: "Activations-quantization does not
    support per-axis quantization"). onnxruntime's defaults break the bias, symmetric and
    weight-form rules (measured, issue 12), so: static QDQ, S8S8, per-channel, and
    :data:`TENSORRT_EXTRA_OPTIONS`. No ``reduce_range``: TensorRT's int8 tensor-core kernels do
    not saturate like x86's VPMADDUBSW, so 7-bit weights would only cost accuracy.
    ``packager.backends.jetson.qdq_lint`` checks the result against each TensorRT version."""
    reason = (
        "TensorRT explicit quantization: symmetric int8 (zero point 0) activations and "
        "weights, per-channel weights on the output-channel axis, float bias, a dedicated "
        "Q/DQ pair per consumer; accuracy measured with onnxruntime's CPU kernels on the same "
        "Q/DQ graph (a stand-in for TensorRT's int8 kernels)"
    )
    return Int8Settings("QInt8", "QInt8", False, reason, TENSORRT_EXTRA_OPTIONS, "tensorrt")


def engine_int8_profile(target: object) -> Int8Profile:
    """The INT8 profile a target's runtime engine needs (``LoadedTarget``: ``runtime.engine``):
    ``tensorrt`` for a TensorRT engine, else ``cpu``."""
    spec = getattr(target, "spec", target)
    engine = getattr(getattr(spec, "runtime", None), "engine", None)
    return "tensorrt" if engine == "tensorrt" else "cpu"


def int8_settings(cpu: CpuProfile, *, static: bool, quant_format: str) -> Int8Settings:
    """The quantizer settings onnxruntime's guide recommends for ``cpu`` (module docstring).

    Dynamic quantization always has uint8 activations (onnxruntime computes their range at run
    time), so it is U8S8 and needs ``reduce_range`` on the same CPUs as static U8S8."""
    if static and (quant_format == "QDQ" or not cpu.x86):
        activations: ActivationType = "QInt8"
        kind = "S8S8"
    else:
        activations, kind = "QUInt8", "U8S8"
    where = f"{kind} {'QDQ' if static and quant_format == 'QDQ' else 'integer operators'}"
    if cpu.x86 and not cpu.vnni:
        reason = (
            f"{cpu.name} is x86-64 without VNNI: onnxruntime's int8 kernels there (VPMADDUBSW "
            "on AVX2/AVX-512) saturate 16-bit sums, so weights use 7 bits (reduce_range), as "
            f"onnxruntime's quantization guide recommends for non-VNNI x86; {where}"
        )
        return Int8Settings(activations, "QInt8", True, reason)
    if cpu.x86:
        reason = f"{cpu.name} has VNNI: no saturation, full 8-bit weights; {where}"
    else:
        extension = "dot-product (SDOT/UDOT) kernels" if cpu.dotprod else "NEON kernels"
        reason = f"{cpu.name} is {cpu.arch} ({extension}): no saturation, 8-bit weights; {where}"
    return Int8Settings(activations, "QInt8", False, reason)


def emulation_cpu(target: CpuProfile, host: CpuProfile) -> str | None:
    """The qemu CPU model an accuracy check of an x86 ``target`` runs on so it sees the kernels
    the device will run, or None when the host already runs them (or qemu cannot emulate them).

    A target without VNNI on a VNNI host: ``Haswell-v4`` (AVX2, no VNNI), the saturating kernels
    such a device may run. A VNNI target needs a VNNI CPU, which qemu's TCG does not emulate:
    None (measured on the host, and the report says which kernels those were)."""
    if not (target.x86 and host.x86):
        return None
    if not target.vnni and host.vnni:
        return X86_NO_VNNI_QEMU_CPU
    return None


def target_cpu(target: object) -> CpuProfile | None:
    """A target's CPU (``LoadedTarget``: ``platform.arch`` and ``cpu.isa``); None for a target
    without a CPU section (microcontrollers)."""
    spec = getattr(target, "spec", target)
    cpu = getattr(spec, "cpu", None)
    platform = getattr(spec, "platform", None)
    if cpu is None or platform is None:
        return None
    name = f"{getattr(spec, 'name', 'target')}/{cpu.model}"
    return CpuProfile(str(platform.arch), tuple(cpu.isa), name, "target")


def host_cpu(cpuinfo: Path = CPUINFO) -> CpuProfile:
    """This machine's CPU from /proc/cpuinfo: its model name and feature flags."""
    import platform

    machine = platform.machine()
    arch = _HOST_ARCH.get(machine, machine)
    name, flags = "", ""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")[: 1 << 20]
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not name and key in ("model name", "cpu model", "hardware"):
            name = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = value.strip()
        if name and flags:
            break
    label = " ".join(name.split())[:80] or f"unknown {machine} CPU"
    return CpuProfile(arch, tuple(flags.split()), label, "host")
