"""What the user asked ``edgepack optimize`` for, typed and validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from packager.calibration import MIN_CALIBRATION_SAMPLES, ImagePreprocessing
from packager.models.torch_export import InputSpec
from packager.optimize.cpu import CpuProfile, Int8Profile

Quantize = Literal["fp16", "int8-dynamic", "int8-static"]
QuantFormatName = Literal["QDQ", "QOperator"]
CalibrationMethodName = Literal["MinMax", "Entropy", "Percentile"]
# Whether INT8 accuracy is measured on the target's CPU (emulated) rather than this host's.
EvalOnTarget = Literal["auto", "on", "off"]
EVAL_ON_TARGET_CHOICES: tuple[EvalOnTarget, ...] = ("auto", "on", "off")

QUANTIZE_CHOICES: tuple[Quantize, ...] = ("fp16", "int8-dynamic", "int8-static")
FORMAT_CHOICES: tuple[QuantFormatName, ...] = ("QDQ", "QOperator")
METHOD_CHOICES: tuple[CalibrationMethodName, ...] = ("MinMax", "Entropy", "Percentile")


@dataclass(frozen=True)
class PruneOptions:
    """Fractions of weights to zero, per prunable layer (Conv/Linear-like ``weight``)."""

    l1_unstructured: float = 0.0  # smallest-|w| single weights
    l2_structured: float = 0.0  # output channels with the smallest L2 norm (dim 0)

    @property
    def active(self) -> bool:
        return self.l1_unstructured > 0 or self.l2_structured > 0


@dataclass(frozen=True)
class OptimizeRequest:
    """What ``edgepack optimize`` (or a build) asked for, before it is checked against the model.

    :func:`packager.optimize.plan.plan_optimize` validates it: UsageError (exit 2),
    UnsupportedError (exit 10), InputError (exit 3) for untrusted PyTorch code.
    """

    model: Path
    out: Path
    quantize: Quantize
    quant_format: QuantFormatName = "QDQ"
    per_channel: bool = True
    calibration: Path | None = None
    calibration_method: CalibrationMethodName = "MinMax"
    min_calibration_samples: int = MIN_CALIBRATION_SAMPLES
    preprocessing: ImagePreprocessing = field(default_factory=ImagePreprocessing)
    inputs: tuple[InputSpec, ...] = ()  # PyTorch sources only
    prune: PruneOptions = field(default_factory=PruneOptions)
    eval_dir: Path | None = None
    max_accuracy_drop: float | None = None  # fraction, e.g. 0.01 for one point
    min_top1_agreement: float | None = None  # fraction, e.g. 0.98
    latency_runs: int = 20
    force: bool = False
    # The CPU the model is for (a target's cpu section); None: this host's. INT8 settings follow it.
    cpu: CpuProfile | None = None
    eval_on_target: EvalOnTarget = "auto"
    # Whose int8 kernels INT8 settings are for: "cpu" (follow ``cpu``), or "tensorrt" (explicit
    # Q/DQ TensorRT imports; packager.optimize.cpu.tensorrt_int8_settings).
    int8_profile: Int8Profile = "cpu"
    # --trust-model-code: the builder vouches for a PyTorch source, whose loading runs code from
    # the file (packager.models.torch_export); without it a PyTorch source is refused (exit 3).
    trust_model_code: bool = False
