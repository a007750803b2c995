"""The accuracy gate: compare an optimized model's outputs with the FP32 model's, and fail the
command with the measured numbers when they fall short of the user's thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from packager.errors import AccuracyError

Outputs = Sequence[Sequence[NDArray[Any]]]  # per model call, per output


@dataclass(frozen=True)
class AccuracyMetrics:
    """How far a candidate's first output is from the baseline's, row by row (one row a sample)."""

    samples: int
    max_abs_error: float
    mean_abs_error: float
    cosine_similarity: float  # mean over rows
    top1_agreement: float  # fraction of rows whose argmax matches the baseline's
    accuracy: float | None = None  # candidate vs labels
    baseline_accuracy: float | None = None  # FP32 model vs labels
    reference_max_abs_error: float | None = None  # FP32 model vs reference outputs given

    @property
    def accuracy_drop(self) -> float:
        """Labelled: the fall in accuracy; unlabelled: the share of changed top-1 answers."""
        if self.accuracy is not None and self.baseline_accuracy is not None:
            return max(0.0, self.baseline_accuracy - self.accuracy)
        return 1.0 - self.top1_agreement

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "cosine_similarity": self.cosine_similarity,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy_drop": self.accuracy_drop,
            "reference_max_abs_error": self.reference_max_abs_error,
        }


def rows(outputs: Outputs) -> NDArray[np.float64]:
    """The first output of every call as a 2-D array: one row per sample, classes last."""
    parts = []
    for call in outputs:
        first = np.asarray(call[0], dtype=np.float64)
        width = first.shape[-1] if first.ndim else 1
        parts.append(first.reshape(-1, width))
    return np.concatenate(parts, axis=0)


def compare(
    baseline: Outputs,
    candidate: Outputs,
    labels: NDArray[np.int64] | None = None,
    references: NDArray[Any] | None = None,
) -> AccuracyMetrics:
    base = rows(baseline)
    cand = rows(candidate)
    if base.shape != cand.shape:
        raise ValueError(f"output shapes differ: {base.shape} vs {cand.shape}")
    diff = np.abs(base - cand)
    norms = np.linalg.norm(base, axis=1) * np.linalg.norm(cand, axis=1)
    dots = np.sum(base * cand, axis=1)
    # Two all-zero rows are identical; a zero row against a non-zero one shares no direction.
    identical = np.all(diff == 0, axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), identical * 1.0)
    base_top = base.argmax(axis=1)
    cand_top = cand.argmax(axis=1)
    accuracy = baseline_accuracy = None
    if labels is not None and len(labels) == len(base_top):
        accuracy = float(np.mean(cand_top == labels))
        baseline_accuracy = float(np.mean(base_top == labels))
    reference_error = None
    if references is not None:
        ref = np.asarray(references, dtype=np.float64).reshape(base.shape)
        reference_error = float(np.max(np.abs(ref - base)))
    return AccuracyMetrics(
        samples=int(base.shape[0]),
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        cosine_similarity=float(cosine.mean()) if cosine.size else 1.0,
        top1_agreement=float(np.mean(base_top == cand_top)) if base_top.size else 1.0,
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        reference_max_abs_error=reference_error,
    )


def gate_failures(
    metrics: AccuracyMetrics, max_accuracy_drop: float | None, min_top1_agreement: float | None
) -> tuple[str, ...]:
    """Each threshold the metrics miss, as a sentence with both numbers."""
    failures = []
    if max_accuracy_drop is not None and metrics.accuracy_drop > max_accuracy_drop:
        what = "accuracy drop" if metrics.accuracy is not None else "top-1 answers changed"
        failures.append(f"{what} {metrics.accuracy_drop:.2%} > allowed {max_accuracy_drop:.2%}")
    if min_top1_agreement is not None and metrics.top1_agreement < min_top1_agreement:
        failures.append(
            f"top-1 agreement {metrics.top1_agreement:.2%} < required {min_top1_agreement:.2%}"
        )
    return tuple(failures)


def check_gate(
    metrics: AccuracyMetrics,
    max_accuracy_drop: float | None,
    min_top1_agreement: float | None,
    *,
    label: str,
) -> None:
    failures = gate_failures(metrics, max_accuracy_drop, min_top1_agreement)
    if failures:
        raise AccuracyError(
            f"{label} failed the accuracy gate on {metrics.samples} samples: "
            f"{'; '.join(failures)} (max abs error {metrics.max_abs_error:.4g}, "
            f"cosine {metrics.cosine_similarity:.4f}); nothing was written",
            hint="try int8-static per-channel, more calibration data, or fp16",
        )
