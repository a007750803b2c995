"""The accuracy gate: compare an optimized model's outputs with the FP32 model's, every output on
its own, and fail the command with the measured numbers when the worst output falls short of the
user's thresholds.

Top-1 agreement only means something for an output that is a vector of class scores; every other
output (feature maps, boxes, regressions) is judged on its error instead:

- score vector (one float vector of 2+ scores per sample, ``[N, C]``): ``--min-top1-agreement`` is
  the share of samples whose argmax matches the FP32 model's, ``--max-accuracy-drop`` the fall in
  labelled accuracy (or, unlabelled, the share of changed top-1 answers);
- any other output: ``--min-top1-agreement`` applies to its cosine similarity with the FP32
  output and ``--max-accuracy-drop`` to its relative error ``||fp32 - candidate|| / ||fp32||``
  (L2 over all its elements), the figures that say how much of the output survived.
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
class OutputMetrics:
    """How far one output of the candidate is from the baseline's (one row a sample)."""

    name: str
    score_vector: bool  # a [N, C] float score vector: top-1 applies
    rows: int
    max_abs_error: float
    mean_abs_error: float
    relative_error: float  # ||base - cand||_2 / ||base||_2 over all elements; 0 when both are 0
    cosine_similarity: float  # mean over rows
    top1_agreement: float | None  # score vectors only: share of rows whose argmax matches

    @property
    def judged_on(self) -> str:
        return "top-1 agreement" if self.score_vector else "cosine and relative error"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "score_vector": self.score_vector,
            "judged_on": self.judged_on,
            "rows": self.rows,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "relative_error": self.relative_error,
            "cosine_similarity": self.cosine_similarity,
            "top1_agreement": self.top1_agreement,
        }


@dataclass(frozen=True)
class AccuracyMetrics:
    """Per-output metrics plus the worst of each over all outputs.

    ``samples`` counts the rows of the first output. ``accuracy``/``baseline_accuracy`` compare
    the first score-vector output's argmax with the labels, when labels were given.
    """

    samples: int
    max_abs_error: float  # worst over outputs
    mean_abs_error: float  # worst over outputs
    cosine_similarity: float  # lowest over outputs
    top1_agreement: float | None  # lowest over score-vector outputs; None when there are none
    accuracy: float | None = None  # candidate vs labels
    baseline_accuracy: float | None = None  # FP32 model vs labels
    reference_max_abs_error: float | None = None  # FP32 model vs reference outputs given
    outputs: tuple[OutputMetrics, ...] = ()
    labelled_output: str | None = None  # the output the labels were compared with

    @property
    def relative_error(self) -> float:
        return max((o.relative_error for o in self.outputs), default=0.0)

    @property
    def accuracy_drop(self) -> float | None:
        """Labelled: the fall in accuracy; unlabelled: the share of changed top-1 answers of the
        worst score-vector output; None when no output is a score vector."""
        if self.accuracy is not None and self.baseline_accuracy is not None:
            return max(0.0, self.baseline_accuracy - self.accuracy)
        if self.top1_agreement is None:
            return None
        return 1.0 - self.top1_agreement

    def output(self, name: str) -> OutputMetrics:
        return next(o for o in self.outputs if o.name == name)

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "relative_error": self.relative_error,
            "cosine_similarity": self.cosine_similarity,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy_drop": self.accuracy_drop,
            "reference_max_abs_error": self.reference_max_abs_error,
            "labelled_output": self.labelled_output,
            "outputs": [o.to_json() for o in self.outputs],
        }


def is_score_vector(array: NDArray[Any]) -> bool:
    """A float output holding one vector of 2+ scores per sample: ``[C]``, ``[N, C]``, or
    ``[N, 1, ..., 1, C]``."""
    if array.dtype.kind != "f" or array.ndim == 0 or array.shape[-1] < 2:
        return False
    return array.ndim <= 2 or all(d == 1 for d in array.shape[1:-1])


def rows(outputs: Outputs, index: int = 0, *, score_vector: bool = True) -> NDArray[np.float64]:
    """Output ``index`` of every call as a 2-D array, one row per sample: ``[N, C]`` for score
    vectors (classes last), each call's output flattened otherwise."""
    parts = []
    for call in outputs:
        value = np.asarray(call[index], dtype=np.float64)
        if score_vector:
            width = value.shape[-1] if value.ndim else 1
            parts.append(value.reshape(-1, width))
        else:
            parts.append(value.reshape(1, -1))
    return np.concatenate(parts, axis=0)


def compare(
    baseline: Outputs,
    candidate: Outputs,
    labels: NDArray[np.int64] | None = None,
    references: NDArray[Any] | None = None,
    names: Sequence[str] | None = None,
) -> AccuracyMetrics:
    """Metrics for every output the calls return; ``names`` labels them (default output0, ...).
    ``references`` are expected values of the first output (compared with the baseline)."""
    count = len(baseline[0]) if len(baseline) else 0
    labels_ = list(names) if names is not None else [f"output{i}" for i in range(count)]
    per_output: list[OutputMetrics] = []
    accuracy = baseline_accuracy = None
    labelled: str | None = None
    for index in range(count):
        first = np.asarray(baseline[0][index])
        score = is_score_vector(first)
        base = rows(baseline, index, score_vector=score)
        cand = rows(candidate, index, score_vector=score)
        if base.shape != cand.shape:
            raise ValueError(
                f"output {labels_[index]!r} shapes differ: {base.shape} vs {cand.shape}"
            )
        metrics = _output_metrics(labels_[index], score, base, cand)
        per_output.append(metrics)
        if score and labelled is None and labels is not None and len(labels) == base.shape[0]:
            labelled = labels_[index]
            accuracy = float(np.mean(cand.argmax(axis=1) == labels))
            baseline_accuracy = float(np.mean(base.argmax(axis=1) == labels))
    reference_error = None
    if references is not None and count:
        base0 = rows(baseline, 0, score_vector=per_output[0].score_vector)
        ref = np.asarray(references, dtype=np.float64).reshape(base0.shape)
        reference_error = float(np.max(np.abs(ref - base0)))
    agreements = [o.top1_agreement for o in per_output if o.top1_agreement is not None]
    return AccuracyMetrics(
        samples=per_output[0].rows if per_output else 0,
        max_abs_error=max((o.max_abs_error for o in per_output), default=0.0),
        mean_abs_error=max((o.mean_abs_error for o in per_output), default=0.0),
        cosine_similarity=min((o.cosine_similarity for o in per_output), default=1.0),
        top1_agreement=min(agreements) if agreements else None,
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        reference_max_abs_error=reference_error,
        outputs=tuple(per_output),
        labelled_output=labelled,
    )


def _output_metrics(
    name: str, score: bool, base: NDArray[np.float64], cand: NDArray[np.float64]
) -> OutputMetrics:
    diff = np.abs(base - cand)
    norms = np.linalg.norm(base, axis=1) * np.linalg.norm(cand, axis=1)
    dots = np.sum(base * cand, axis=1)
    # Two all-zero rows are identical; a zero row against a non-zero one shares no direction.
    identical = np.all(diff == 0, axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), identical * 1.0)
    base_norm = float(np.linalg.norm(base))
    diff_norm = float(np.linalg.norm(diff))
    if base_norm > 0:
        relative = diff_norm / base_norm
    else:
        relative = 0.0 if diff_norm == 0 else float("inf")
    top1 = None
    if score and base.size:
        top1 = float(np.mean(base.argmax(axis=1) == cand.argmax(axis=1)))
    return OutputMetrics(
        name=name,
        score_vector=score,
        rows=int(base.shape[0]),
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        relative_error=relative,
        cosine_similarity=float(cosine.mean()) if cosine.size else 1.0,
        top1_agreement=top1 if score else None,
    )


def gate_failures(
    metrics: AccuracyMetrics, max_accuracy_drop: float | None, min_top1_agreement: float | None
) -> tuple[str, ...]:
    """Each threshold an output misses, as a sentence naming the output with both numbers;
    the worst output (largest shortfall) first."""
    return tuple(text for _, text in _failures(metrics, max_accuracy_drop, min_top1_agreement))


def _failures(
    metrics: AccuracyMetrics, max_accuracy_drop: float | None, min_top1_agreement: float | None
) -> list[tuple[OutputMetrics, str]]:
    found: list[tuple[float, OutputMetrics, str]] = []
    for out in metrics.outputs:
        where = f"output '{out.name}'"
        if out.score_vector:
            if max_accuracy_drop is not None and out.top1_agreement is not None:
                if out.name == metrics.labelled_output and metrics.accuracy_drop is not None:
                    drop, what = metrics.accuracy_drop, "accuracy drop"
                else:
                    drop, what = 1.0 - out.top1_agreement, "top-1 answers changed"
                if drop > max_accuracy_drop:
                    found.append(
                        (
                            drop - max_accuracy_drop,
                            out,
                            f"{where}: {what} {drop:.2%} > allowed {max_accuracy_drop:.2%}",
                        )
                    )
            if (
                min_top1_agreement is not None
                and out.top1_agreement is not None
                and out.top1_agreement < min_top1_agreement
            ):
                found.append(
                    (
                        min_top1_agreement - out.top1_agreement,
                        out,
                        f"{where}: top-1 agreement {out.top1_agreement:.2%} < required "
                        f"{min_top1_agreement:.2%}",
                    )
                )
            continue
        kind = f"{where} (not a score vector)"
        if max_accuracy_drop is not None and out.relative_error > max_accuracy_drop:
            found.append(
                (
                    out.relative_error - max_accuracy_drop,
                    out,
                    f"{kind}: relative error {out.relative_error:.2%} > allowed "
                    f"{max_accuracy_drop:.2%}",
                )
            )
        if min_top1_agreement is not None and out.cosine_similarity < min_top1_agreement:
            found.append(
                (
                    min_top1_agreement - out.cosine_similarity,
                    out,
                    f"{kind}: cosine similarity {out.cosine_similarity:.4f} < required "
                    f"{min_top1_agreement:.4f}",
                )
            )
    found.sort(key=lambda item: -item[0])
    return [(out, text) for _, out, text in found]


def worst_output(metrics: AccuracyMetrics) -> OutputMetrics | None:
    """The output furthest from the baseline (lowest cosine similarity, then largest error)."""
    return min(
        metrics.outputs,
        key=lambda o: (o.cosine_similarity, -o.relative_error),
        default=None,
    )


def check_gate(
    metrics: AccuracyMetrics,
    max_accuracy_drop: float | None,
    min_top1_agreement: float | None,
    *,
    label: str,
) -> None:
    """Raise AccuracyError (exit 11) when ``metrics`` misses a threshold (None: not checked).

    The message names every miss, worst first (:func:`gate_failures`), and the model (``label``).
    """
    failures = _failures(metrics, max_accuracy_drop, min_top1_agreement)
    if failures:
        worst = failures[0][0]  # the largest shortfall
        raise AccuracyError(
            f"{label} failed the accuracy gate on {metrics.samples} samples: "
            f"{'; '.join(text for _, text in failures)} (worst output '{worst.name}': max abs "
            f"error {worst.max_abs_error:.4g}, cosine {worst.cosine_similarity:.4f}, relative "
            f"error {worst.relative_error:.2%}); nothing was written",
            hint="try int8-static per-channel, more calibration data, or fp16",
        )
