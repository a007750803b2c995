"""Counters and histograms rendered in the Prometheus text exposition format (version 0.0.4).

Hand-written because the image's dependencies are onnxruntime and numpy only; the format is small
and ``tests/unit/runtime/test_metrics.py`` checks it with a real Prometheus parser.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Histogram:
    """A Prometheus histogram: ``buckets`` are ascending upper bounds (seconds, or batch rows);
    ``counts`` per bucket, not cumulative (render sums them); values above the last bound count
    in +Inf only."""

    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        # Callers hold Metrics.lock. The first bucket whose bound is >= value (none: +Inf only).
        index = bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        cumulative = 0
        sep = "," if labels else ""
        # An explicit check, not zip(strict=True): the runtime runs on CPython 3.8 (JetPack 5).
        if len(self.buckets) != len(self.counts):
            raise ValueError(
                f"histogram has {len(self.buckets)} bucket bounds but {len(self.counts)} counts"
            )
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {self.total:.9g}")
        lines.append(f"{name}_count{suffix} {self.count}")
        return lines


def label_value(value: str) -> str:
    """A label value escaped as the text format requires (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def process_rss_bytes() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``); 0 when unreadable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_cpu_seconds() -> float:
    """User + system CPU seconds this process has used (``os.times``; children not counted)."""
    times = os.times()
    return times.user + times.system


class Metrics:
    """Everything /metrics and the health report show; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.request_latency = Histogram(LATENCY_BUCKETS_S)  # whole infer requests
        self.inference_latency = Histogram(LATENCY_BUCKETS_S)  # session.run alone
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.inference_failures = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.rejected = 0  # 503: queue full
        # Set by the server: live values read at render time.
        self.queue_depth: Callable[[], int] = lambda: 0
        self.in_flight: Callable[[], int] = lambda: 0
        self.ready: Callable[[], bool] = lambda: False
        self.cache_bytes: Callable[[], int] = lambda: 0
        # The edgepack_engine_info gauge's labels (what serves and why), when there is an engine.
        self.engine_labels: Mapping[str, str] | None = None

    def request(self, endpoint: str, status: int, seconds: float | None) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None:
                self.request_latency.observe(seconds)

    def inference(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.batch_size.observe(rows)
            self.inference_latency.observe(seconds)

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, text: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples])

        with self.lock:
            requests = sorted(self.requests.items())
            metric(
                "edgepack_requests_total",
                "counter",
                "HTTP requests by endpoint and status code.",
                [
                    f'edgepack_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in requests
                ],
            )
            errors = sum(n for (_, c), n in requests if c >= 400)
            metric(
                "edgepack_errors_total",
                "counter",
                "Requests answered with 4xx or 5xx.",
                [f"edgepack_errors_total {errors}"],
            )
            metric(
                "edgepack_request_duration_seconds",
                "histogram",
                "Infer request latency, body read to response ready.",
                self.request_latency.render("edgepack_request_duration_seconds"),
            )
            metric(
                "edgepack_inference_duration_seconds",
                "histogram",
                "onnxruntime session.run latency per (batched) run.",
                self.inference_latency.render("edgepack_inference_duration_seconds"),
            )
            metric(
                "edgepack_batch_size",
                "histogram",
                "Rows per onnxruntime run.",
                self.batch_size.render("edgepack_batch_size"),
            )
            metric(
                "edgepack_inference_failures_total",
                "counter",
                "session.run calls that raised.",
                [f"edgepack_inference_failures_total {self.inference_failures}"],
            )
            metric(
                "edgepack_queue_rejections_total",
                "counter",
                "Requests refused with 503.",
                [f"edgepack_queue_rejections_total {self.rejected}"],
            )
            metric(
                "edgepack_cache_hits_total",
                "counter",
                "Response cache hits.",
                [f"edgepack_cache_hits_total {self.cache_hits}"],
            )
            metric(
                "edgepack_cache_misses_total",
                "counter",
                "Response cache misses.",
                [f"edgepack_cache_misses_total {self.cache_misses}"],
            )
        metric(
            "edgepack_cache_bytes",
            "gauge",
            "Bytes held by the response cache.",
            [f"edgepack_cache_bytes {self.cache_bytes()}"],
        )
        metric(
            "edgepack_queue_depth",
            "gauge",
            "Infer requests waiting for the model.",
            [f"edgepack_queue_depth {self.queue_depth()}"],
        )
        metric(
            "edgepack_in_flight_requests",
            "gauge",
            "HTTP requests being handled.",
            [f"edgepack_in_flight_requests {self.in_flight()}"],
        )
        metric(
            "edgepack_model_ready",
            "gauge",
            "1 when the model can serve.",
            [f"edgepack_model_ready {int(self.ready())}"],
        )
        if self.engine_labels is not None:
            labels = ",".join(f'{k}="{label_value(v)}"' for k, v in self.engine_labels.items())
            metric(
                "edgepack_engine_info",
                "gauge",
                "What serves the model: the TensorRT engine or the onnxruntime CPU fallback.",
                [f"edgepack_engine_info{{{labels}}} 1"],
            )
        metric(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time.",
            [f"process_cpu_seconds_total {process_cpu_seconds():.3f}"],
        )
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident set size.",
            [f"process_resident_memory_bytes {process_rss_bytes()}"],
        )
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time, seconds since the epoch.",
            [f"process_start_time_seconds {self.started:.3f}"],
        )
        return "\n".join(out) + "\n"

    def report(self) -> dict[str, object]:
        """The JSON health summary for field technicians."""
        with self.lock:
            total = sum(self.requests.values())
            errors = sum(n for (_, c), n in self.requests.items() if c >= 400)
            infer = self.request_latency
            runs = self.batch_size
            document: dict[str, object] = {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": total,
                "errors": errors,
                "infer_requests": infer.count,
                "infer_mean_ms": round(infer.total / infer.count * 1000, 3)
                if infer.count
                else None,
                "runs": runs.count,
                "mean_batch_size": round(runs.total / runs.count, 2) if runs.count else None,
                "inference_failures": self.inference_failures,
                "queue_rejections": self.rejected,
                "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            }
        document["ready"] = self.ready()
        document["queue_depth"] = self.queue_depth()
        document["in_flight"] = self.in_flight()
        document["rss_bytes"] = process_rss_bytes()
        document["cpu_seconds"] = round(process_cpu_seconds(), 3)
        return document
