"""The runtime's HTTP server: Open Inference Protocol v2 over a lean asyncio HTTP/1.1 server.

Run as ``python3.11 -m edgepack_runtime.server --config /etc/edgepack/runtime.json`` (in images) or
``python -m packager.runtime.server --config X`` (on the host). Exit codes: 0 after a clean stop
(SIGTERM/SIGINT), 2 bad configuration, 3 model cannot be loaded or warmed up, 4 cannot listen.

One event-loop thread reads, parses and answers every connection (HTTP/1.1 keep-alive and
pipelining, Content-Length bodies only). Where inference runs depends on the model:
  - with dynamic batching, the batch worker thread runs it and hands results back to the loop;
  - a model whose runs take under ``INLINE_RUN_S`` (on average) runs on the loop thread itself:
    handing a sub-millisecond run to another thread costs more than the run (GIL handoffs);
  - a slower model runs in a small thread pool (onnxruntime releases the GIL while it computes),
    so that the loop keeps answering health checks and other requests meanwhile.
The standard library's ``http.server`` (a thread per connection, ``email`` header parsing) spent
most of a small request's time in Python around the model; see benchmarks/runtime.py.

Network clients are not trusted; what one client can hold is bounded (nginx and Triton bound the
same things): a body is at most the model's largest valid request (protocol.largest_request_bytes,
capped by max_request_bytes) and is read only once a server-wide body budget holds it; a request
head must arrive within header_timeout_s and a body at a minimum rate; reading stops while the
client does not read its replies; connections are capped (below the descriptor limit), the most
stalled one making room for a newcomer, else 503; large bodies are parsed on a worker thread;
errors caused by a request's values answer 400 and never turn readiness off; error logs are
short and rate-limited. See tests/integration/test_runtime_attack.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import __version__
from .batching import Batcher, QueueFull
from .cache import ResponseCache, cache_key
from .config import ConfigError, RuntimeConfig, load_config
from .log import Throttle, clip, configure, event, logger
from .metrics import Metrics
from .model import Array, ModelError, ServedModel
from .protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    bad_request,
    encode_infer_response,
    largest_elements,
    largest_request_bytes,
    parse_infer_request,
    show,
    show_name,
)
from .sdnotify import notify, watchdog_interval_s
from .tensorrt_runner import EngineStatus, load_served_model

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_LISTEN = 4

# Type aliases for annotations only (CPython 3.8, JetPack 5, cannot subscript collections.abc,
# dict or tuple at run time). The request's headers (a Headers, whose .get ignores case, or any
# mapping): only .get is used.
if TYPE_CHECKING:
    _Headers = Mapping[str, str]
    _StrDict = dict[str, str]
else:
    _StrDict = dict

# Models whose runs average under this run on the event loop's thread (see the module docstring).
INLINE_RUN_S = 0.002

_MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)


@dataclass(frozen=True)
class Response:
    """An HTTP response for the handler to write: status, body bytes and extra headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_response(status: int, document: Any) -> Response:
    """``document`` as compact JSON."""
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


# An error message is one short line: what a client sent is quoted in part, never whole.
MAX_ERROR_CHARS = 512


def error_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """``{"error": message}``, the message clipped to MAX_ERROR_CHARS (512)."""
    document = {"error": clip(message, MAX_ERROR_CHARS)}
    return Response(status, json.dumps(document, separators=(",", ":")).encode(), headers=headers)


@dataclass(frozen=True)
class InferJob:
    """A validated infer request whose inference is still to run."""

    request: InferRequest
    names: list[str]  # the requested outputs
    key: bytes  # the response cache's key (b"" without a cache)


class ServiceUnavailable(ProtocolError):
    """A 503 answered with ``Retry-After: <retry_after_s>`` (seconds): max_queue_size reached."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


# After this many session.run failures in a row the model "cannot serve": ready turns false
# (and the systemd watchdog stops being fed) until a run succeeds again. Only failures that are
# not the request's own count: see App._input_at_fault.
FAILURES_UNTIL_UNHEALTHY = 3


class App:
    """Routes requests to the model; knows nothing about sockets (the handler does the I/O)."""

    def __init__(
        self, config: RuntimeConfig, model: ServedModel, engine: EngineStatus | None = None
    ) -> None:
        self.config = config
        self.model = model
        # What serves (TensorRT engine or onnxruntime fallback) when runtime.json has an engine.
        self.engine = engine
        signature = model.signature
        # A request's rows are bounded by max_batch_size (when set) on a dynamic first dimension;
        # the body limit is the largest valid request, capped by the target's max_request_bytes.
        self.max_rows = config.max_batch_size if config.max_batch_size >= 1 else None
        self.max_elements = largest_elements(signature, self.max_rows)
        largest = largest_request_bytes(signature, self.max_rows)
        self.limit_from_model = largest is not None and largest < config.max_request_bytes
        self.body_limit = (
            largest if largest is not None and self.limit_from_model else (config.max_request_bytes)
        )
        self.ready = threading.Event()  # set after warm-up, cleared on shutdown
        self.metrics = Metrics()
        self.cache = ResponseCache(config.cache_bytes) if config.cache_bytes > 0 else None
        # Whether a request's first axis is rows of a batch (see _batch_axis_declared).
        self.batch_axis = signature.batchable and self._batch_axis_declared()
        self.batcher: Batcher | None = None
        if config.max_batch_size > 1 and signature.batchable and not self._batch_refused():
            self.batcher = Batcher(
                self._timed_run,
                config.max_batch_size,
                config.max_queue_delay_us / 1_000_000,
                config.max_queue_size,
            )
        self._lock = threading.Lock()
        self._running = 0  # unbatched requests inside session.run
        self._failures = 0  # consecutive session.run failures
        self._run_average_s = 0.0  # moving average of session.run durations
        self.metrics.ready = self.healthy
        self.metrics.queue_depth = self.queue_depth
        if self.cache is not None:
            cache = self.cache
            self.metrics.cache_bytes = lambda: cache.used
        if engine is not None:
            self.metrics.engine_labels = engine.labels()

    def _batch_axis_declared(self) -> bool:
        """The first axis is a batch axis: named so on every input and output of the model
        (model.BATCH_DIM_NAMES) or declared by runtime.json's batch_axis."""
        return self.config.batch_axis == 0 or not self.model.signature.unnamed_batch_axis()

    def _batch_refused(self) -> bool:
        """True (and logged, once: the App is made once per process) when runtime.json asks for
        batching but the model's first axis is not a declared batch axis. Concatenating along
        any other axis (a time-major RNN's time) gives every request but the first a wrong answer,
        so requests run one by one instead. runtime.json comes from the bundle: this is the
        runtime's own check of what the build already refuses."""
        if self._batch_axis_declared():
            return False
        tensor = self.model.signature.unnamed_batch_axis()[0]
        event(
            "batching_refused",
            logging.WARNING,
            message=f"max_batch_size {self.config.max_batch_size} ignored: the first dimension "
            f"of {clip(repr(tensor.name), 80)} ({clip(repr(tensor.first_dim), 80)}) is not a "
            "declared batch axis; requests run "
            "one by one (name it 'batch' or 'N' in the model, or set batch_axis 0 if it is one)",
        )
        return True

    def healthy(self) -> bool:
        """Warmed up, not stopping, the model answering, and the batch worker alive."""
        with self._lock:
            failing = self._failures >= FAILURES_UNTIL_UNHEALTHY
        batcher_ok = self.batcher is None or self.batcher.alive
        return self.ready.is_set() and not failing and batcher_ok

    def queue_depth(self) -> int:
        if self.batcher is not None:
            return self.batcher.depth()
        with self._lock:
            return self._running

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def handle(self, method: str, target: str, headers: _Headers, body: bytes) -> Response:
        """Answer one request entirely in the calling thread."""
        path = request_path(target)
        outcome = self.begin(method, path, headers, body)
        if isinstance(outcome, Response):
            return outcome
        try:
            results = self._run(outcome.request.inputs, outcome.names)
        except Exception as exc:
            return self.failure(exc, method, path)
        return self.conclude(outcome, results, method, path)

    def begin(self, method: str, path: str, headers: _Headers, body: bytes) -> Response | InferJob:
        """The response, or the inference still to run for it (then ``conclude`` answers)."""
        try:
            return self._route(method, path, headers, body)
        except Exception as exc:
            return self.failure(exc, method, path)

    def conclude(self, job: InferJob, results: Sequence[Array], method: str, path: str) -> Response:
        try:
            if self.cache is not None:
                self.cache.put(job.key, results)
            return self._encode(job.request, results)
        except Exception as exc:
            return self.failure(exc, method, path)

    def failure(self, exc: BaseException, method: str, path: str) -> Response:
        if isinstance(exc, ServiceUnavailable):
            return error_response(503, exc.message, (("Retry-After", str(exc.retry_after_s)),))
        if isinstance(exc, ProtocolError):
            return error_response(exc.status, exc.message)
        # A bug answers 500 (its details go to the log, not to the client); the server keeps
        # serving.
        event(
            "request_failed",
            logging.ERROR,
            exc_info=exc,
            method=clip(method, 16),
            path=clip(path, 120),
        )
        return error_response(500, "internal error; see the runtime's log")

    def _route(self, method: str, path: str, headers: _Headers, body: bytes) -> Response | InferJob:
        if path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            self._require(method, "GET", path)
            if path == "/v2/health/live":
                return json_response(200, {"live": True})
            if path == "/v2/health/ready":
                ready = self.healthy()
                return json_response(200 if ready else 503, {"ready": ready})
            return json_response(200, self.server_metadata())
        if path == "/metrics":
            self._require(method, "GET", path)
            return Response(
                200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/v2/health/report":
            self._require(method, "GET", path)
            report = self.metrics.report()
            report["model"] = {
                "name": self.model.name,
                "version": self.model.version,
                "sha256": self.model.digest,
                "batching": self.batcher is not None,
                "cache": self.cache is not None,
            }
            if self.engine is not None:
                report["engine"] = self.engine.line()
                report["engine_detail"] = self.engine.detail()
            return json_response(200, report)
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise ProtocolError(404, f"no such endpoint: {clip(method, 16)} {clip(path, 100)}")
        self._check_model(match["name"], match["version"])
        action = match["action"]
        if action == "/infer":
            self._require(method, "POST", path)
            return self.prepare(headers, body)
        self._require(method, "GET", path)
        if action == "/ready":
            ready = self.healthy()
            return json_response(200 if ready else 503, {"name": self.model.name, "ready": ready})
        return json_response(200, self.model_metadata())

    @staticmethod
    def _require(method: str, allowed: str, path: str) -> None:
        if method != allowed:
            raise ProtocolError(405, f"{clip(path, 100)} accepts {allowed}, not {clip(method, 16)}")

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self.model.name:
            raise ProtocolError(
                404, f"unknown model {show_name(name)}; this runtime serves {self.model.name!r}"
            )
        if version is not None and version != self.model.version:
            raise ProtocolError(
                404,
                f"unknown version {show_name(version)} of model {name!r}; "
                f"this runtime serves version {self.model.version!r}",
            )

    def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "edgepack-runtime",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }

    def model_metadata(self) -> dict[str, Any]:
        signature = self.model.signature
        return {
            "name": self.model.name,
            "versions": [self.model.version],
            "platform": self.model.platform,
            "inputs": [spec.to_json() for spec in signature.inputs],
            "outputs": [spec.to_json() for spec in signature.outputs],
        }

    def prepare(self, headers: _Headers, body: bytes) -> Response | InferJob:
        """Validate an infer request; a cache hit is answered at once."""
        if not self.ready.is_set():
            raise ProtocolError(503, "the model is not ready yet (warming up or shutting down)")
        header_length: int | None = None
        raw_length = headers.get(HEADER_LENGTH)
        if raw_length is not None:
            if not (raw_length.isdigit() and raw_length.isascii() and len(raw_length) <= 18):
                raise bad_request(f"{HEADER_LENGTH} must be an integer, got {show(raw_length)}")
            header_length = int(raw_length)
        request = parse_infer_request(
            body,
            header_length,
            self.model.signature,
            max_rows=self.max_rows,
            max_elements=self.max_elements,
        )
        names = [out.spec.name for out in request.outputs]
        key = b""
        if self.cache is not None:
            key = cache_key(self.model.digest, request.inputs, names)
            results = self.cache.get(key)
            self.metrics.count("cache_hits" if results is not None else "cache_misses")
            if results is not None:
                return self._encode(request, results)
        return InferJob(request, names, key)

    def work(self, method: str, path: str, headers: _Headers, body: bytes) -> Response | InferJob:
        """``begin`` and, without a batcher, the run and ``conclude`` too: all of a request that
        can be done in a worker thread (the server's path for large bodies)."""
        outcome = self.begin(method, path, headers, body)
        if isinstance(outcome, Response) or self.batcher is not None:
            return outcome
        try:
            self.admit()
            results = self.run_admitted(outcome)
        except Exception as exc:
            return self.failure(exc, method, path)
        return self.conclude(outcome, results, method, path)

    def infer(self, headers: _Headers, body: bytes) -> Response:
        """Validate, run (here, in this thread) and encode one infer request."""
        outcome = self.prepare(headers, body)
        if isinstance(outcome, Response):
            return outcome
        results = self._run(outcome.request.inputs, outcome.names)
        if self.cache is not None:
            self.cache.put(outcome.key, results)
        return self._encode(outcome.request, results)

    def _encode(self, request: InferRequest, results: Sequence[Array]) -> Response:
        payload, json_length = encode_infer_response(
            self.model.name, self.model.version, request.id, request.outputs, results
        )
        if json_length is None:
            return Response(200, payload)
        return Response(
            200, payload, "application/octet-stream", ((HEADER_LENGTH, str(json_length)),)
        )

    # Where a job runs is the server's choice: here and now (``run_inline``), in a thread pool
    # (``admit`` on the loop, then ``run_admitted`` in the pool) or in the batcher (``enqueue``).

    @property
    def inline(self) -> bool:
        """True while the model's runs are quick enough to run on the event loop's thread."""
        return self._run_average_s < INLINE_RUN_S

    def estimate_run(self, seconds: float) -> None:
        """Start the average that ``inline`` uses from one run's duration (a warm-up's)."""
        with self._lock:
            self._run_average_s = seconds

    def run_inline(self, job: InferJob) -> list[Array]:
        return self._run(job.request.inputs, job.names)

    def admit(self) -> None:
        """Count one unbatched request in (raises 503 when max_queue_size are already in)."""
        with self._lock:
            if self._running >= self.config.max_queue_size:
                self.metrics.count("rejected")
                raise ServiceUnavailable(
                    f"{self._running} requests are already running (max_queue_size); retry later"
                )
            self._running += 1

    def release(self) -> None:
        with self._lock:
            self._running -= 1

    def run_admitted(self, job: InferJob) -> list[Array]:
        try:
            return self._timed_run(job.request.inputs, job.names, self._rows(job.request.inputs))
        finally:
            self.release()

    def enqueue(
        self, job: InferJob, done: Callable[[list[Array] | None, BaseException | None], None]
    ) -> None:
        """Hand a job to the batcher; ``done`` is called on its worker thread."""
        assert self.batcher is not None
        try:
            self.batcher.enqueue(job.request.inputs, job.names, done)
        except QueueFull:
            raise self._queue_full() from None

    def _queue_full(self) -> ServiceUnavailable:
        self.metrics.count("rejected")
        return ServiceUnavailable(
            f"the queue is full ({self.config.max_queue_size} requests waiting); retry later"
        )

    def _input_at_fault(self, exc: Exception) -> bool:
        """Whether a failed run is the request's fault: onnxruntime says so (InvalidArgument), or
        the warm-up input, which ran at start, still runs. Only other failures count towards
        FAILURES_UNTIL_UNHEALTHY, so no client can turn readiness off."""
        if type(exc).__name__ == "InvalidArgument":
            return True
        try:
            self.model.warm_up()
        except Exception:
            return False
        return True

    def _rows(self, inputs: Mapping[str, Array]) -> int:
        spec = self.model.signature.inputs[0]
        return int(inputs[spec.name].shape[0]) if self.batch_axis else 1

    def _run(self, inputs: Mapping[str, Array], names: Sequence[str]) -> list[Array]:
        if self.batcher is not None:
            try:
                return self.batcher.submit(inputs, names)
            except QueueFull:
                raise self._queue_full() from None
        self.admit()
        try:
            return self._timed_run(inputs, names, self._rows(inputs))
        finally:
            self.release()

    def _timed_run(
        self, inputs: Mapping[str, Array], names: Sequence[str], rows: int
    ) -> list[Array]:
        started = time.perf_counter()
        try:
            results = self.model.run(inputs, names)
        except Exception as exc:
            self.metrics.count("inference_failures")
            detail = clip(" ".join(str(exc).split()), 300)
            if self._input_at_fault(exc):
                # The request's own values (an index out of range, ...): the model is fine.
                raise ProtocolError(
                    400, "the model cannot run on these input values (onnxruntime refused them)"
                ) from None
            with self._lock:
                self._failures += 1
            event("inference_failed", logging.ERROR, message=detail)
            raise ProtocolError(500, "inference failed; see the runtime's log") from None
        elapsed = time.perf_counter() - started
        with self._lock:
            self._failures = 0
            self._run_average_s += (elapsed - self._run_average_s) * 0.1
        self.metrics.inference(rows, elapsed)
        return results


def request_path(target: str) -> str:
    """The request target's path without query, fragment or trailing slashes."""
    if target[:1] == "/" and "?" not in target and "#" not in target:
        return target.rstrip("/") or "/"  # the common case, without urlsplit's work
    try:
        path = urlsplit(target).path
    except ValueError:  # "//[x?": an unparsable authority
        path = target.split("#", 1)[0].split("?", 1)[0]
    return path.rstrip("/") or "/"


_LABELS = {
    "/v2/health/live": "live",
    "/metrics": "metrics",
    "/v2/health/report": "report",
    "/v2": "server_metadata",
}


def endpoint_label(path: str) -> str:
    """A small, fixed set of label values, whatever paths clients send."""
    path = request_path(path)
    if path.endswith("/infer"):
        return "infer"
    if path.endswith("/ready"):
        return "ready"
    label = _LABELS.get(path)
    if label is not None:
        return label
    if path.startswith("/v2/models/"):
        return "model_metadata"
    return "other"


# ------------------------------------------------------------------------------------ HTTP/1.1

SERVER_HEADER = f"edgepack-runtime/{__version__}"
# The request line and headers together; more is refused with 431 (nginx's default buffers for
# a request head total 32 KiB too: large_client_header_buffers 4 8k).
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100
# After an error reply that leaves a body unread: read and drop this much, for this long, so that
# the client reads the reply instead of a connection reset (a lingering close).
LINGER_BYTES = 64 << 20
LINGER_S = 2.0
# A body gets header_timeout_s plus its size at this rate to arrive; slower is a trickle (408).
MIN_BODY_BYTES_PER_S = 64 * 1024
# Bodies this large or larger are parsed (and, unbatched, run and encoded) on a worker thread so
# that the event loop keeps answering health checks meanwhile; smaller ones are quicker in place.
OFFLOAD_BYTES = 64 * 1024
# All connections together may hold this many body bytes (reserved, whole, when a head announces
# a body; the rest wait for their turn): the model's largest valid request, at least this much.
MIN_BODY_BUDGET = 8 << 20
# asyncio accepts up to this many connections per wake-up (its ``backlog`` argument), and a
# connection over the cap is closed only a few loop iterations after its accept: the descriptor
# limit must leave room for several batches (ACCEPT_BATCHES_IN_FLIGHT) besides the connections.
ACCEPT_BATCH = 16
ACCEPT_BATCHES_IN_FLIGHT = 4
# Descriptors kept free besides those: the listening socket, the loop's self-pipe and epoll,
# stdio, the log, onnxruntime's files.
RESERVED_FDS = 32
# At most this many connections may hold replies their clients do not read (each up to the
# transport's 64 KiB high-water mark plus one reply); past it the oldest is closed.
MAX_STALLED_WRITERS = 16
# Error events are logged at most this often (a client decides how often errors happen).
ERROR_LOGS_PER_S = 20
_METHODS_WITH_BODY = ("POST", "PUT")
_METHODS = ("GET", "POST", "PUT", "DELETE")
# Control bytes no request head may hold besides its CRLFs (RFC 9112; HTAB is allowed).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (method, header name)
_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII


class Headers(_StrDict):
    """Request headers under lower-case names; ``get`` ignores the case of the name asked for."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


class RequestHead:
    """A request line and its headers (a plain class: one is made per request)."""

    __slots__ = ("headers", "keep_alive", "length", "method", "target")

    def __init__(
        self, method: str, target: str, headers: Headers, keep_alive: bool, length: int
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.length = length  # of the body


class HeadError(Exception):
    """The request line or headers cannot be served: answer ``status`` and close."""

    def __init__(
        self,
        status: int,
        message: str,
        target: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.target = target  # when the request line was read: counted in the metrics
        self.headers = headers


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}
_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    date: str = _date_cache[1]
    return date


def parse_head(head: bytes) -> RequestHead:
    """The request line and headers (without the blank line); raises HeadError (4xx)."""
    # Lines end with CRLF: a bare LF or CR would split lines differently elsewhere (smuggling).
    crlf = head.count(b"\r\n")
    bad = _CONTROL_BYTES.search(head)
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf or bad is not None:
        if head.count(b"\n") != crlf:
            what = "a bare LF"
        elif head.count(b"\r") != crlf:
            what = "a bare CR"
        else:
            assert bad is not None
            what = f"control byte 0x{bad.group()[0]:02x}"
        raise HeadError(400, f"{what} in the request head: lines end with CRLF, no control bytes")
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HeadError(400, f"bad request line {clip(lines[0], 100)!r}")
    method, target, version = parts
    major, dot, minor = version[5:].partition(".")
    if version[:5] != "HTTP/" or not dot or not major.isdigit() or not minor.isdigit():
        raise HeadError(400, f"bad HTTP version {version[:20]!r}")
    if major != "1":
        raise HeadError(505, f"HTTP version {version[5:20]} is not supported; use HTTP/1.1")
    if len(lines) > MAX_HEADERS + 1:
        raise HeadError(431, f"more than {MAX_HEADERS} headers")
    headers = Headers()
    for index in range(1, len(lines)):
        line = lines[index]
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HeadError(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise HeadError(400, "conflicting Content-Length headers")
            continue  # the first occurrence counts, as in the standard library
        headers[key] = value
    connection = dict.get(headers, "connection")
    tokens = {t.strip() for t in connection.lower().split(",")} if connection else set()
    if "close" in tokens:
        keep_alive = False
    elif "keep-alive" in tokens:
        keep_alive = True
    else:
        keep_alive = minor != "0"  # HTTP/1.1 keeps connections open by default, 1.0 does not
    if "transfer-encoding" in headers:
        raise HeadError(411, "chunked requests are not accepted; send Content-Length", target)
    raw = dict.get(headers, "content-length")
    if raw is None:
        if method in _METHODS_WITH_BODY:
            raise HeadError(411, "the request needs a Content-Length header", target)
        length = 0
    elif raw.isdigit() and raw.isascii():
        if len(raw) > 18:  # beyond any limit (and int() refuses over 4300 digits)
            raise HeadError(413, f"Content-Length has {len(raw)} digits: too large", target)
        length = int(raw)
    else:
        raise HeadError(
            400, f"Content-Length must be a non-negative integer, got {clip(raw, 40)!r}", target
        )
    return RequestHead(method, target, headers, keep_alive, length)


def _head_end(buffer: bytearray) -> tuple[int, int] | None:
    """(end of the headers, start of the body) once the blank line has arrived (a bare-LF one
    too, so that parse_head can refuse it rather than wait)."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n", 0, crlf if crlf >= 0 else len(buffer))
    if lf >= 0:
        return lf + 1, lf + 2  # the head keeps its bare LF, which parse_head refuses
    if crlf >= 0:
        return crlf, crlf + 4
    return None


def _take(buffer: bytearray, length: int) -> bytes:
    """The first ``length`` bytes of ``buffer``, removed from it, copied once."""
    if length == len(buffer):
        body = bytes(buffer)
        buffer.clear()
        return body
    view = memoryview(buffer)
    try:
        part = view[:length]
        body = bytes(part)
        part.release()
    finally:
        view.release()
    del buffer[:length]
    return body


# (the request, its path, its inference when one is out (None while a worker parses it), start);
# for annotations only (CPython 3.8 cannot subscript tuple at run time).
if TYPE_CHECKING:
    _Running = tuple[RequestHead, str, InferJob | None, float]


class Connection(asyncio.Protocol):
    """One client connection, driven by the event loop: one request answered at a time (pipelined
    requests wait in the buffer), keep-alive until the client, an error or a drain closes it.

    Bounds: reading stops while a reply waits for the client to read (the transport's write
    high-water mark) and when the buffer holds more than the current request needs; a head has
    ``header_timeout_s`` to arrive, a body that plus its size at ``MIN_BODY_BYTES_PER_S``; a body
    is read only once the server's body budget holds it (``RuntimeServer.reserve``).
    """

    def __init__(self, server: RuntimeServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.client = "-"
        self.buffer = bytearray()
        self.head: RequestHead | None = None  # read; its body is awaited
        self.running: _Running | None = None  # parsing or inference out
        self.answering = False
        self.closing = False
        self.eof = False  # the client has shut down its sending side
        self.lingering = 0  # > 0: after an error reply, bytes still read and dropped
        self.write_paused = False
        self.last_active = self.loop.time()
        self.started = self.last_active  # when the current request's first byte was processed
        self.deadline: float | None = None  # the current head or body must be in by then
        self.reserved = 0  # body bytes held in the server's budget
        self.waiting = False  # for the server's body budget
        self.served = 0  # requests answered

    # -------------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "-"
        server = self.server
        if len(server.connections) >= server.max_connections:
            victim = server.pick_victim()
            if victim is None:
                self.closing = True
                retry = (("Retry-After", "1"),)
                self._write(error_response(503, "too many connections; retry", retry), close=True)
                transport.close()
                return
            victim.evict()
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._release()
        self.server.connections.discard(self)
        self.server.stalled.pop(self, None)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self.lingering:
            self.lingering -= min(len(data), self.lingering)
            if not self.lingering:
                self._close()
            return
        if self.closing:
            return
        self.buffer += data
        if self.running is None and not self.waiting:
            self._process()
        self._flow()

    def eof_received(self) -> bool:
        self.eof = True
        if self.running is not None and not self.lingering:
            return True  # answer the request first; _reply closes
        return False  # the transport closes itself

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests too.
        self.write_paused = True
        self._flow()
        stalled = self.server.stalled
        stalled[self] = None
        if len(stalled) > MAX_STALLED_WRITERS:
            # Each holds up to the high-water mark plus one reply: bound them all together.
            oldest = next(iter(stalled))
            oldest.evict()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.server.stalled.pop(self, None)
        if self.running is None and not self.waiting:
            self._process()
        self._flow()

    # ---------------------------------------------------------------------------- requests

    @property
    def busy(self) -> bool:
        """A request is being read or answered."""
        if self.running is not None or self.answering:
            return True
        return not (self.lingering or self.closing) and (self.head is not None or bool(self.buffer))

    def eviction_key(self) -> tuple[int, float] | None:
        """Which connection goes first when a newcomer finds every slot taken (lowest first), or
        None while a request is answered: already closing, then the client not reading its
        replies, idle keep-alive, a head still arriving (oldest first; a new connection counts
        from its start, so it is the last of these), a body waiting for the budget, one
        arriving."""
        if self.running is not None or self.answering:
            return None
        if self.closing or self.lingering:
            return (0, self.last_active)
        if self.write_paused:
            return (1, self.last_active)
        if self.head is None and not self.buffer and self.served:
            return (2, self.last_active)
        if self.head is None:
            return (3, self.started)
        return (4 if self.waiting else 5, self.started)

    def evict(self) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.stalled.pop(self, None)
        self._release()
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _release(self) -> None:
        """Give this connection's body bytes back to the server's budget."""
        self.waiting = False
        if self.reserved:
            reserved, self.reserved = self.reserved, 0
            self.server.release(reserved)

    def _flow(self) -> None:
        """Read while the current request needs bytes and the client reads its replies."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        need = MAX_HEAD_BYTES + (self.head.length if self.head is not None else 0)
        wanted = bool(self.lingering) or (
            not self.write_paused and not self.waiting and len(self.buffer) < need
        )
        if wanted != transport.is_reading():
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def granted(self) -> None:
        """The server's budget now holds this connection's body: read it."""
        self.waiting = False
        if self.closing or self.head is None:
            self._release()  # closed meanwhile
            return
        self._start_body(self.head)
        self._process()
        self._flow()

    def expire(self) -> None:
        """The head or body missed its deadline (or the budget did not free up in time)."""
        if self.waiting:
            error = HeadError(
                503,
                "the server is busy reading other requests; retry",
                None,
                (("Retry-After", "1"),),
            )
        elif self.head is None:
            error = HeadError(408, "the request head did not arrive in time")
        else:
            error = HeadError(408, "the request body did not arrive in time")
        self._reject(error)

    def _start_body(self, head: RequestHead) -> None:
        config = self.app.config
        self.deadline = (
            self.loop.time() + config.header_timeout_s + head.length / MIN_BODY_BYTES_PER_S
        )
        if head.length > len(self.buffer) and (
            head.headers.get("expect", "").lower() == "100-continue"
        ):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _process(self) -> None:
        """Answer each complete request in the buffer, in order, until one must wait."""
        try:
            while (
                self.running is None
                and not self.closing
                and not self.write_paused
                and not self.waiting
            ):
                buffer = self.buffer
                if self.head is None:
                    while buffer and buffer[0] in (13, 10):  # blank lines between requests
                        del buffer[:1]
                    if not buffer:
                        break
                    if self.deadline is None:
                        self.started = self.loop.time()
                        self.deadline = self.started + self.app.config.header_timeout_s
                    end = _head_end(buffer)
                    if end is None:
                        if len(buffer) > MAX_HEAD_BYTES:
                            raise HeadError(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                        break
                    if end[0] > MAX_HEAD_BYTES:
                        raise HeadError(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                    head = parse_head(bytes(buffer[: end[0]]))
                    del buffer[: end[1]]
                    self._check_length(head)
                    self.head = head
                    if head.length:
                        if not self.server.reserve(self, head.length):
                            self.waiting = True
                            self.deadline = self.loop.time() + self.app.config.header_timeout_s
                            break
                        self._start_body(head)
                head = self.head
                if len(buffer) < head.length:
                    break
                body = _take(buffer, head.length) if head.length else b""
                self.head = None
                self.deadline = None
                self.served += 1
                self.answering = True  # counted in flight (a /metrics scrape counts itself)
                try:
                    self._answer(head, body)
                finally:
                    self.answering = False
        except HeadError as exc:
            self._reject(exc)
        except Exception as exc:  # a bug: answer 500 and close rather than hang the client
            event("request_failed", logging.ERROR, exc_info=exc, client=self.client)
            self._reject(HeadError(500, "internal error; see the runtime's log"))

    def _check_length(self, head: RequestHead) -> None:
        app = self.app
        limit = app.body_limit
        if head.length > limit:
            source = (
                "the model's largest valid request"
                if app.limit_from_model
                else ("max_request_bytes")
            )
            raise HeadError(
                413,
                f"the body has {head.length} bytes; the limit is {limit} ({source})",
                head.target,
            )

    def _log_error(self, status: int, method: str, path: str, message: str) -> None:
        dropped = self.server.error_log.allow()
        if dropped is None:
            return
        extra: dict[str, Any] = {"suppressed": dropped} if dropped else {}
        event(
            "request_error",
            logging.WARNING if status < 500 else logging.ERROR,
            method=clip(method, 16),
            path=clip(path, 120),
            status=status,
            client=self.client,
            message=clip(message, 200),
            **extra,
        )

    def _reject(self, exc: HeadError) -> None:
        """Answer an error and close: what remains of the request cannot be parsed."""
        self.head = None
        self.deadline = None
        self._release()
        self._write(error_response(exc.status, exc.message, exc.headers), close=True)
        if exc.target is not None:
            self.app.metrics.request(endpoint_label(exc.target), exc.status, None)
            self._log_error(exc.status, "-", request_path(exc.target), exc.message)
        else:
            event("http", logging.DEBUG, message=exc.message, client=self.client)
        # Read and drop what the client still sends, then close (bounded in bytes and time).
        self.buffer.clear()
        self.closing = True
        if self.eof or self.transport is None:
            self._close()
            return
        self.lingering = LINGER_BYTES
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            self._close()
            return
        self._flow()
        self.loop.call_later(LINGER_S, self._close)

    def _answer(self, head: RequestHead, body: bytes) -> None:
        started = time.perf_counter()
        app = self.app
        method = head.method
        path = request_path(head.target)
        if method not in _METHODS:
            raise HeadError(501, f"method {clip(method, 16)} is not supported", head.target)
        if len(body) >= OFFLOAD_BYTES:
            # Parsing a large body takes long enough to stall every other connection.
            self.running = (head, path, None, started)
            try:
                future = self.server.pool.submit(app.work, method, path, head.headers, body)
            except RuntimeError as exc:  # the pool is shut down: the process is stopping
                self.running = None
                self._reply(head, path, app.failure(exc, method, path), started)
                return
            future.add_done_callback(self._worked)
            return
        self._dispatch(head, path, app.begin(method, path, head.headers, body), started)

    def _dispatch(
        self, head: RequestHead, path: str, outcome: Response | InferJob, started: float
    ) -> None:
        app = self.app
        method = head.method
        if isinstance(outcome, Response):
            self._reply(head, path, outcome, started)
            return
        # The batcher's and the pool's results come back through call_soon_threadsafe, so
        # ``running`` can be set after the hand-over: _done always runs after this returns.
        if app.batcher is not None:
            try:
                app.enqueue(outcome, self._done_elsewhere)
            except Exception as exc:
                self._reply(head, path, app.failure(exc, method, path), started)
                return
            self.running = (head, path, outcome, started)
            return
        if app.inline:
            try:
                results = app.run_inline(outcome)
            except Exception as exc:
                response = app.failure(exc, method, path)
            else:
                response = app.conclude(outcome, results, method, path)
            self._reply(head, path, response, started)
            return
        try:
            app.admit()
        except Exception as exc:
            self._reply(head, path, app.failure(exc, method, path), started)
            return
        try:
            future = self.server.pool.submit(app.run_admitted, outcome)
        except RuntimeError as exc:  # the pool is shut down: the process is stopping
            app.release()
            self._reply(head, path, app.failure(exc, method, path), started)
            return
        self.running = (head, path, outcome, started)
        future.add_done_callback(self._future_done)

    def _worked(self, future: Future[Response | InferJob]) -> None:
        """A worker parsed (and perhaps answered) a large request: continue on the loop."""
        error = future.exception()
        outcome: Response | InferJob | BaseException = (
            error if error is not None else future.result()
        )
        try:
            self.loop.call_soon_threadsafe(self._continue, outcome)
        except RuntimeError:
            pass  # the loop is closed: the process is exiting

    def _continue(self, outcome: Response | InferJob | BaseException) -> None:
        assert self.running is not None
        head, path, _, started = self.running
        self.running = None
        if isinstance(outcome, BaseException):
            outcome = self.app.failure(outcome, head.method, path)
        self._dispatch(head, path, outcome, started)
        if self.running is None and not self.closing:
            self._process()
            self._flow()

    def _future_done(self, future: Future[list[Array]]) -> None:
        error = future.exception()
        self._done_elsewhere(None if error is not None else future.result(), error)

    def _done_elsewhere(self, results: list[Array] | None, error: BaseException | None) -> None:
        """Called on a worker thread: hand the outcome to the loop's thread."""
        try:
            self.loop.call_soon_threadsafe(self._done, results, error)
        except RuntimeError:
            pass  # the loop is closed: the process is exiting

    def _done(self, results: list[Array] | None, error: BaseException | None) -> None:
        assert self.running is not None
        head, path, job, started = self.running
        assert job is not None
        self.running = None
        if error is not None or results is None:
            response = self.app.failure(error or RuntimeError("no results"), head.method, path)
        else:
            response = self.app.conclude(job, results, head.method, path)
        self._reply(head, path, response, started)
        if not self.closing:
            self._process()
            self._flow()

    def _reply(self, head: RequestHead, path: str, response: Response, started: float) -> None:
        self._release()
        close = not head.keep_alive or self.eof or self.server.draining
        self._write(response, close=close)
        label = endpoint_label(path)
        app = self.app
        app.metrics.request(
            label, response.status, time.perf_counter() - started if label == "infer" else None
        )
        if response.status >= 400:
            try:
                message = str(json.loads(response.body).get("error", ""))
            except ValueError:
                message = ""
            self._log_error(response.status, head.method, path, message)
        elif logger.isEnabledFor(logging.DEBUG):
            event(
                "request",
                logging.DEBUG,
                method=head.method,
                path=path,
                status=response.status,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
        if close:
            self._close()

    def _write(self, response: Response, *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.last_active = self.loop.time()
        status = response.status
        line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} {_reason(status)}\r\n"
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        head = (
            f"{line}Server: {SERVER_HEADER}\r\nDate: {http_date()}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
            f"{extra}{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
        ).encode("latin-1")
        if len(response.body) < 1 << 16:
            transport.write(head + response.body)  # one segment for small responses
        else:
            transport.write(head)
            transport.write(response.body)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(RuntimeServer.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def connection_limit(configured: int) -> int:
    """``configured``, lowered so that the connections, the accepts in flight and RESERVED_FDS
    fit in the process's descriptor limit (RLIMIT_NOFILE): past it, accept() fails and nobody,
    health checks included, gets in (asyncio then stops accepting for a second)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    spare = ACCEPT_BATCH * ACCEPT_BATCHES_IN_FLIGHT + RESERVED_FDS
    return max(1, min(configured, soft - spare))


def pool_size(intra_op_threads: int) -> int:
    """Threads for models too slow to run on the loop: one run per core when each run uses one
    core, else two (each run already spreads over the cores; two overlap Python and compute)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, 8)) if intra_op_threads == 1 else 2


class RuntimeServer:
    """The listening socket and the event loop's thread; tracks connections so that SIGTERM can
    drain them."""

    # The default backlog drops connections when many clients connect at once.
    backlog = 128

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self.socket = _listen(*address)  # raises OSError: the caller reports it
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self.loop = asyncio.new_event_loop()
        self.connections: set[Connection] = set()
        self.max_connections = connection_limit(app.config.max_connections)
        self.body_budget = max(app.body_limit, MIN_BODY_BUDGET)
        self.reserved = 0  # body bytes reserved by connections
        self.waiters: deque[Connection] = deque()  # for the body budget, first come first served
        # Connections whose client stopped reading replies (write buffer over its high-water
        # mark), oldest first.
        self.stalled: dict[Connection, None] = {}
        self.error_log = Throttle(ERROR_LOGS_PER_S, burst=ERROR_LOGS_PER_S * 2)
        self.draining = False
        self.pool = ThreadPoolExecutor(
            pool_size(app.config.intra_op_threads), thread_name_prefix="infer"
        )
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                self.loop.create_server(
                    lambda: Connection(self), sock=self.socket, backlog=ACCEPT_BATCH
                )
            )
            # create_server listened with its backlog argument (the accept batch): restore
            # the kernel's queue of pending connections.
            self.socket.listen(self.backlog)
            self._schedule_sweep()
            self._started.set()
            self.loop.run_forever()
        finally:
            self._started.set()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.abort()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def reserve(self, connection: Connection, length: int) -> bool:
        """Hold ``length`` body bytes for ``connection``, or queue it (False) until ``release``
        makes room. Whole bodies only, first come first served: no two half-read bodies can wait
        for each other, and each fits (body_budget >= the body limit)."""
        if not self.waiters and self.reserved + length <= self.body_budget:
            self.reserved += length
            connection.reserved = length
            return True
        self.waiters.append(connection)
        return False

    def release(self, length: int) -> None:
        self.reserved -= length
        while self.waiters:
            waiter = self.waiters[0]
            head = waiter.head
            if waiter.closing or not waiter.waiting or head is None:
                self.waiters.popleft()
                continue
            if self.reserved + head.length > self.body_budget:
                break
            self.waiters.popleft()
            self.reserved += head.length
            waiter.reserved = head.length
            self.loop.call_soon(waiter.granted)

    def pick_victim(self) -> Connection | None:
        """The connection to close for a newcomer (see Connection.eviction_key), if any."""
        best: Connection | None = None
        best_key: tuple[int, float] | None = None
        for connection in self.connections:
            key = connection.eviction_key()
            if key is not None and (best_key is None or key < best_key):
                best, best_key = connection, key
        return best

    def _schedule_sweep(self) -> None:
        config = self.app.config
        interval = min(1.0, config.keepalive_timeout_s / 2, config.header_timeout_s / 4)
        self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Answer 408 to heads and bodies past their deadline; close connections idle for
        keepalive_timeout_s."""
        timeout = self.app.config.keepalive_timeout_s
        now = self.loop.time()
        for connection in list(self.connections):
            deadline = connection.deadline
            if (
                deadline is not None
                and now > deadline
                and connection.running is None
                and not connection.closing
            ):
                connection.expire()
                continue
            if connection.running is None and now - connection.last_active > timeout:
                transport = connection.transport
                if transport is not None and transport.is_closing():
                    if now - connection.last_active > timeout + LINGER_S:
                        transport.abort()  # a client that does not read its reply
                else:
                    connection._close()
        self._schedule_sweep()

    @property
    def in_flight(self) -> int:
        return sum(1 for connection in list(self.connections) if connection.busy)

    def drain(self, timeout_s: float) -> bool:
        """Stop accepting, close idle connections, wait for requests in flight (bounded)."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return self.in_flight == 0
        future = asyncio.run_coroutine_threadsafe(self._drain(timeout_s), self.loop)
        try:
            return future.result(timeout_s + 5)
        except Exception:
            return False

    async def _drain(self, timeout_s: float) -> bool:
        self.draining = True
        if self._server is not None:
            self._server.close()  # the listening socket closes: no new connections
        deadline = self.loop.time() + timeout_s
        while True:
            for connection in list(self.connections):
                connection.close_if_idle()
            if not self.in_flight:
                return True
            if self.loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        """End the loop (abandoning what is still open) and the thread pool."""
        if self._thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass
            self._thread.join(5)
        else:
            self.socket.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def serve(config: RuntimeConfig) -> int:
    """Load and warm up the model, serve until SIGTERM or SIGINT, then drain.

    Returns the exit code: 0 after a stop, EXIT_MODEL (3) when the model cannot load or warm up,
    EXIT_LISTEN (4) when the address cannot be bound.
    """
    try:
        # The TensorRT engine when runtime.json names one and it loads, else onnxruntime.
        model, engine = load_served_model(config)
    except ModelError as exc:
        event("model_error", logging.ERROR, message=str(exc))
        return EXIT_MODEL
    app = App(config, model, engine)
    try:
        server = RuntimeServer((config.host, config.port), app)
    except OSError as exc:
        event(
            "listen_error",
            logging.ERROR,
            message=f"cannot listen on {config.host}:{config.port}: {exc.strerror} "
            "(is another process using the port? set 'port' in the config)",
        )
        app.close()
        model.close()
        return EXIT_LISTEN

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        event("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    event(
        "listening",
        host=config.host,
        port=server.server_address[1],
        model=model.name,
        version=model.version,
        sha256=model.digest,
        engine=engine.line() if engine is not None else None,
    )
    started = time.perf_counter()
    try:
        model.warm_up()
    except Exception as exc:
        event("warmup_failed", logging.ERROR, message=f"{model.path}: warm-up inference: {exc}")
        server.stop()
        app.close()
        model.close()
        return EXIT_MODEL
    warmup_s = time.perf_counter() - started
    # A second run, as a client's would be, tells whether runs are quick enough for the loop.
    run_started = time.perf_counter()
    try:
        model.warm_up()
    except Exception:
        pass  # the first run worked; a failing model shows in the requests' answers
    app.estimate_run(time.perf_counter() - run_started)
    app.ready.set()
    event(
        "ready",
        warmup_ms=round(warmup_s * 1000, 3),
        batching=app.batcher is not None,
        cache_bytes=config.cache_bytes,
        max_request_bytes=app.body_limit,
        max_connections=server.max_connections,
    )
    notify("READY=1")
    app.metrics.in_flight = lambda: server.in_flight

    # systemd restarts the unit when the pings stop: only ping while the model can serve.
    watchdog_s = watchdog_interval_s()
    while not stop.wait(min(watchdog_s or 1.0, 1.0)):
        if watchdog_s is not None and app.healthy():
            notify("WATCHDOG=1")

    notify("STOPPING=1")
    app.ready.clear()
    drained = server.drain(config.drain_timeout_s)
    app.close()
    abandoned = server.in_flight
    server.stop()
    model.close()  # device memory back before the process goes (a TensorRT engine's)
    event("stopped", drained=drained, abandoned=abandoned)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The runtime's command line: :func:`serve`'s exit code, or EXIT_CONFIG (2) for a bad
    config."""
    parser = argparse.ArgumentParser(
        prog="edgepack_runtime.server", description="Serve an ONNX model over KServe v2 HTTP."
    )
    parser.add_argument(
        "--config", help="the runtime's JSON config (default: $EDGEPACK_RUNTIME_CONFIG)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        configure("info")
        event("config_error", logging.ERROR, message=str(exc))
        return EXIT_CONFIG
    configure(config.log_level)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
