"""What an optimization measured, per variant, written as JSON, Markdown and a PNG chart next to
the optimized model.

Model files are byte-identical for the same inputs; the report is not, because latency is
measured on this host at run time: :func:`without_host_timing` is the part a bundle's manifest
records, so that a bundle stays byte-identical across rebuilds.
"""

from __future__ import annotations

import platform
import statistics
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.calibration import Feed
from packager.digest import CHUNK
from packager.models.onnx_save import model_files
from packager.optimize.evaluate import AccuracyMetrics
from packager.optimize.prune import PruneStats

WARMUP_RUNS = 3
THREADS = 1  # graph.open_session pins onnxruntime to one thread


@dataclass(frozen=True)
class VariantResult:
    """The measured figures of one model variant (OptimizeReport lists FP32 first).

    Sizes in bytes, ``gzip_bytes`` at gzip -9 (:func:`file_sizes`); ``latency_ms``: median on this
    host (:func:`median_latency_ms`).
    """

    name: str  # "fp32", "fp32-pruned", "int8-static QDQ", ...
    file: str | None  # file name inside --out, None for intermediates not kept
    size_bytes: int
    gzip_bytes: int
    latency_ms: float  # median
    metrics: AccuracyMetrics | None = None  # vs the FP32 model; None for the FP32 model itself

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "file": self.file,
            "size_bytes": self.size_bytes,
            "gzip_bytes": self.gzip_bytes,
            "latency_ms_median": round(self.latency_ms, 4),
            "metrics": None if self.metrics is None else self.metrics.to_json(),
        }


@dataclass(frozen=True)
class OptimizeReport:
    """What an optimization did and measured: optimize-report.json (``to_json``), .md and .png."""

    source: str
    source_kind: str
    quantize: str
    settings: tuple[tuple[str, object], ...]
    steps: tuple[str, ...]
    model_file: str
    variants: tuple[VariantResult, ...]
    latency_runs: int
    prune: PruneStats | None = None
    evaluation: tuple[tuple[str, object], ...] = ()
    notes: tuple[str, ...] = field(default=())
    # Notes that quote this host's latency: they change from run to run.
    timing_notes: tuple[str, ...] = field(default=())
    # Which CPU the figures come from: host_cpu, target_cpu, accuracy, latency (execute._report).
    measured_on: tuple[tuple[str, object], ...] = ()

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "source_kind": self.source_kind,
            "quantize": self.quantize,
            "settings": dict(self.settings),
            "steps": list(self.steps),
            "model": self.model_file,
            "variants": [v.to_json() for v in self.variants],
            "prune": None if self.prune is None else self.prune.to_json(),
            "evaluation": dict(self.evaluation) or None,
            "measured_on": dict(self.measured_on) or None,
            "latency": {
                "runs": self.latency_runs,
                "warmup": WARMUP_RUNS,
                "statistic": "median",
                "threads": THREADS,
                "provider": "CPUExecutionProvider",
                "machine": platform.machine(),
            },
            "notes": list(self.notes),
            "timing_notes": list(self.timing_notes),
        }


# What :meth:`OptimizeReport.to_json` holds that is measured as time on the building host.
HOST_TIMING_KEYS = ("latency", "timing_notes")
VARIANT_TIMING_KEYS = ("latency_ms_median",)


def without_host_timing(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (an :meth:`OptimizeReport.to_json`) without the figures timed on this host
    (median latencies, the latency block, notes quoting them): what a manifest records, since the
    same inputs must give a byte-identical bundle. Sizes, settings and accuracy stay."""
    kept = {k: v for k, v in document.items() if k not in HOST_TIMING_KEYS}
    variants = document.get("variants")
    if isinstance(variants, list):
        kept["variants"] = [
            {k: v for k, v in variant.items() if k not in VARIANT_TIMING_KEYS}
            if isinstance(variant, dict)
            else variant
            for variant in variants
        ]
    return kept


def file_sizes(path: Path) -> tuple[int, int]:
    """(bytes, gzip -9 bytes) of the model and its external data files together; zero runs of
    pruned weights show up only in the second. Read in chunks: a large model is never held."""
    size = packed = 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    for file in model_files(path):
        with file.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                packed += len(compressor.compress(chunk))
    packed += len(compressor.flush())
    return size, packed


def median_latency_ms(session: Any, feed: Feed, runs: int) -> float:
    """Median wall time of ``runs`` calls of ``session`` on ``feed``, in milliseconds.

    :data:`WARMUP_RUNS` untimed calls go first.
    """
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def render_markdown(report: OptimizeReport) -> str:
    """optimize-report.md: variants (speed-up over FP32), per-output figures, gate, steps, notes."""
    base = report.variants[0]
    lines = [
        f"# Optimization report: {report.source}",
        "",
        f"Optimized model: `{report.model_file}` ({report.quantize}).",
        "",
        "## Variants",
        "",
        "| variant | size | gzip | median latency | speed-up | top-1 agreement | "
        "max abs error | cosine | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report.variants:
        m = v.metrics
        speedup = base.latency_ms / v.latency_ms if v.latency_ms > 0 else float("nan")
        lines.append(
            f"| {v.name} | {v.size_bytes:,} B ({v.size_bytes / base.size_bytes:.0%}) "
            f"| {v.gzip_bytes:,} B | {v.latency_ms:.3f} ms | {speedup:.2f}x "
            f"| {_pct(m.top1_agreement) if m else '-'} "
            f"| {f'{m.max_abs_error:.4g}' if m else '-'} "
            f"| {f'{m.cosine_similarity:.5f}' if m else '-'} "
            f"| {_pct(m.accuracy) if m and m.accuracy is not None else '-'} |"
        )
    lines += [
        "",
        f"Latency: onnxruntime CPU on this host ({platform.machine()}), {THREADS} thread, "
        f"median of {report.latency_runs} runs after {WARMUP_RUNS} warm-up runs.",
    ]
    shown = [(k, v) for k, v in report.measured_on if isinstance(v, str) or v is None]
    if shown:
        lines += ["", "## Measured on", ""]
        lines += [f"- {key}: {value if value is not None else '-'}" for key, value in shown]
    if report.prune is not None:
        p = report.prune
        lines += [
            "",
            "## Pruning",
            "",
            f"Measured sparsity {p.sparsity:.1%} ({p.zero_weights:,} of {p.weights:,} weights in "
            f"{p.layers} layers); {p.zeroed_channels} output channels entirely zero.",
        ]
    lines += _output_lines(report)
    if report.evaluation:
        lines += ["", "## Accuracy gate", ""]
        lines += [f"- {key}: {value}" for key, value in report.evaluation]
    lines += ["", "## Steps", ""] + [f"{i}. {s}" for i, s in enumerate(report.steps, 1)]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _output_lines(report: OptimizeReport) -> list[str]:
    """One row per (variant, output): every output is measured, and each says what judged it."""
    measured = [v for v in report.variants if v.metrics is not None and v.metrics.outputs]
    if not measured:
        return []
    lines = [
        "",
        "## Outputs",
        "",
        "Top-1 agreement applies only to outputs that are score vectors ([N, C] floats); other "
        "outputs are judged on cosine similarity (against --min-top1-agreement) and relative "
        "error ||fp32 - variant|| / ||fp32|| (against --max-accuracy-drop).",
        "",
        "| variant | output | score vector | judged on | top-1 agreement | cosine | "
        "relative error | max abs error | mean abs error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in measured:
        assert v.metrics is not None
        for o in v.metrics.outputs:
            lines.append(
                f"| {v.name} | {o.name} | {'yes' if o.score_vector else 'no'} | {o.judged_on} "
                f"| {_pct(o.top1_agreement)} | {o.cosine_similarity:.5f} "
                f"| {o.relative_error:.2%} | {o.max_abs_error:.4g} | {o.mean_abs_error:.4g} |"
            )
    return lines


def render_chart(report: OptimizeReport, dest: Path) -> None:
    """Size, latency and top-1 agreement per variant, as three bar charts in one PNG."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [v.name for v in report.variants]
    figure = Figure(figsize=(4.0 * 3, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    panels = (
        ("size (KiB)", [v.size_bytes / 1024 for v in report.variants]),
        ("median latency (ms)", [v.latency_ms for v in report.variants]),
        (
            "worst output vs fp32 (%):\ntop-1 agreement, else cosine",
            [100.0 * _agreement(v.metrics) for v in report.variants],
        ),
    )
    for index, (title, values) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, index)
        bars = axes.bar(range(len(names)), values, color="#4c72b0")
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.bar_label(bars, fmt="%.3g", fontsize=7)
    figure.suptitle(f"{report.source}: {report.quantize}", fontsize=11)
    figure.tight_layout()
    # No "Software" tag, so the bytes do not change with the matplotlib version.
    figure.savefig(dest, format="png", metadata={"Software": None})


def _agreement(metrics: AccuracyMetrics | None) -> float:
    """The chart's figure: the lowest top-1 agreement or, lower still, the lowest cosine of an
    output that is not a score vector (1.0 for the FP32 model itself)."""
    if metrics is None:
        return 1.0
    figures = [
        o.top1_agreement if o.top1_agreement is not None else o.cosine_similarity
        for o in metrics.outputs
    ]
    if not figures:
        return metrics.top1_agreement if metrics.top1_agreement is not None else 1.0
    return min(figures)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
