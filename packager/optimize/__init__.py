"""Model optimization: prune (PyTorch), quantize (INT8 dynamic/static, FP16), evaluate against the
FP32 model (the accuracy gate) and report size, latency and accuracy per variant.
"""

from __future__ import annotations

from pathlib import Path

from packager.optimize.cpu import Int8Profile
from packager.optimize.execute import OptimizeResult, optimize
from packager.optimize.plan import OptimizePlan, plan_optimize
from packager.optimize.request import OptimizeRequest, Quantize

__all__ = [
    "OptimizePlan",
    "OptimizeRequest",
    "OptimizeResult",
    "optimize",
    "optimize_for_build",
    "plan_optimize",
]


def optimize_for_build(
    model: Path,
    quantize: str,
    calibration: Path | None,
    eval_dir: Path | None,
    work_dir: Path,
    target: object = None,
    *,
    int8_profile: Int8Profile | None = None,
    max_accuracy_drop: float | None = None,
    min_top1_agreement: float | None = None,
) -> tuple[Path, dict[str, object]]:
    """Run the optimize pipeline for ``edgepack build``: the optimized ONNX path inside
    ``work_dir`` and the report for the bundle manifest. ``target`` (a ``LoadedTarget``) gives
    the CPU whose ISA chooses the INT8 settings and, where cheap, where accuracy is measured.

    ``int8_profile`` ("cpu" | "tensorrt"): whose int8 kernels INT8 is for; None: the target's
    runtime engine decides (``tensorrt`` -> TensorRT-ready explicit Q/DQ,
    :func:`packager.optimize.cpu.tensorrt_int8_settings`). ``max_accuracy_drop`` /
    ``min_top1_agreement`` (fractions): the accuracy gate on ``eval_dir``; AccuracyError."""
    from packager.optimize.cpu import engine_int8_profile, target_cpu
    from packager.optimize.request import QUANTIZE_CHOICES

    if quantize not in QUANTIZE_CHOICES:
        from packager.errors import UsageError

        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    chosen: Quantize = quantize
    request = OptimizeRequest(
        model=model,
        out=work_dir / "optimized",
        quantize=chosen,
        calibration=calibration,
        eval_dir=eval_dir,
        force=True,
        cpu=target_cpu(target) if target is not None else None,
        int8_profile=int8_profile or engine_int8_profile(target),
        max_accuracy_drop=max_accuracy_drop,
        min_top1_agreement=min_top1_agreement,
    )
    result = optimize(request)
    return result.model, result.report.to_json()
