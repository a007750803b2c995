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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .batching import Batcher, QueueFull
from .cache import ResponseCache, cache_key
from .config import ConfigError, RuntimeConfig, load_config
from .log import configure, event, logger
from .metrics import Metrics
from .model import Array, Model, ModelError, load_model
from .protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    bad_request,
    encode_infer_response,
    parse_infer_request,
)
from .sdnotify import notify, watchdog_interval_s

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_LISTEN = 4

# The request's headers (a Headers, whose .get ignores case, or any mapping): only .get is used.
_Headers = Mapping[str, str]

# Models whose runs average under this run on the event loop's thread (see the module docstring).
INLINE_RUN_S = 0.002

_MODEL_PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$"
)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_response(status: int, document: Any) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


def error_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return Response(
        status, json.dumps({"error": message}, separators=(",", ":")).encode(), headers=headers
    )


@dataclass(frozen=True)
class InferJob:
    """A validated infer request whose inference is still to run."""

    request: InferRequest
    names: list[str]  # the requested outputs
    key: bytes  # the response cache's key (b"" without a cache)


class ServiceUnavailable(ProtocolError):
    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


# After this many session.run failures in a row the model "cannot serve": ready turns false
# (and the systemd watchdog stops being fed) until a run succeeds again.
FAILURES_UNTIL_UNHEALTHY = 3


class App:
    """Routes requests to the model; knows nothing about sockets (the handler does the I/O)."""

    def __init__(self, config: RuntimeConfig, model: Model) -> None:
        self.config = config
        self.model = model
        self.ready = threading.Event()  # set after warm-up, cleared on shutdown
        self.metrics = Metrics()
        self.cache = ResponseCache(config.cache_bytes) if config.cache_bytes > 0 else None
        self.batcher: Batcher | None = None
        if config.max_batch_size > 1 and model.signature.batchable:
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
        # A bug or an onnxruntime failure answers 500; the server keeps serving.
        event(
            "request_failed",
            logging.ERROR,
            exc_info=exc,
            method=method,
            path=path,
        )
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

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
            return json_response(200, report)
        match = _MODEL_PATH.match(path)
        if match is None:
            raise ProtocolError(404, f"no such endpoint: {method} {path}")
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
            raise ProtocolError(405, f"{path} accepts {allowed}, not {method}")

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self.model.name:
            raise ProtocolError(
                404, f"unknown model {name!r}; this runtime serves {self.model.name!r}"
            )
        if version is not None and version != self.model.version:
            raise ProtocolError(
                404,
                f"unknown version {version!r} of model {name!r}; "
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
            "platform": "onnxruntime_onnx",
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
            try:
                header_length = int(raw_length)
            except ValueError:
                raise bad_request(
                    f"{HEADER_LENGTH} must be an integer, got {raw_length!r}"
                ) from None
        request = parse_infer_request(body, header_length, self.model.signature)
        names = [out.spec.name for out in request.outputs]
        key = b""
        if self.cache is not None:
            key = cache_key(self.model.digest, request.inputs, names)
            results = self.cache.get(key)
            self.metrics.count("cache_hits" if results is not None else "cache_misses")
            if results is not None:
                return self._encode(request, results)
        return InferJob(request, names, key)

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

    def _rows(self, inputs: Mapping[str, Array]) -> int:
        spec = self.model.signature.inputs[0]
        return int(inputs[spec.name].shape[0]) if self.model.signature.batchable else 1

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
            with self._lock:
                self._failures += 1
            self.metrics.count("inference_failures")
            message = " ".join(str(exc).split())
            raise ProtocolError(500, f"inference failed: {message}") from None
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
    return urlsplit(target).path.rstrip("/") or "/"


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
# The request line and headers together; more is refused with 431.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# After an error reply that leaves a body unread: read and drop this much, for this long, so that
# the client reads the reply instead of a connection reset (a lingering close).
LINGER_BYTES = 64 << 20
LINGER_S = 2.0
_METHODS_WITH_BODY = ("POST", "PUT")
_METHODS = ("GET", "POST", "PUT", "DELETE")


class Headers(dict[str, str]):
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

    def __init__(self, status: int, message: str, target: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.target = target  # when the request line was read: counted in the metrics


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
    """The request line and headers (without the blank line); raises HeadError."""
    text = head.decode("latin-1")
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HeadError(400, f"bad request line {lines[0].rstrip()[:100]!r}")
    method, target, version = parts
    major, dot, minor = version[5:].partition(".")
    if version[:5] != "HTTP/" or not dot or not major.isdigit() or not minor.isdigit():
        raise HeadError(400, f"bad HTTP version {version[:20]!r}")
    if major != "1":
        raise HeadError(505, f"HTTP version {version[5:]} is not supported; use HTTP/1.1")
    if len(lines) > MAX_HEADERS + 1:
        raise HeadError(431, f"more than {MAX_HEADERS} headers")
    headers = Headers()
    for index in range(1, len(lines)):
        line = lines[index].rstrip("\r")
        name, colon, value = line.partition(":")
        if not colon or not name or name[-1] in " \t" or name[0] in " \t":
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
        length = int(raw)
    else:
        raise HeadError(400, f"Content-Length must be a non-negative integer, got {raw!r}", target)
    return RequestHead(method, target, headers, keep_alive, length)


def _head_end(buffer: bytearray) -> tuple[int, int] | None:
    """(end of the headers, start of the body) once the blank line has arrived."""
    crlf = buffer.find(b"\n\r\n")
    lf = buffer.find(b"\n\n", 0, crlf if crlf >= 0 else len(buffer))
    if lf >= 0:
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return None


class Connection(asyncio.Protocol):
    """One client connection, driven by the event loop: one request answered at a time (pipelined
    requests wait in the buffer), keep-alive until the client, an error or a drain closes it."""

    def __init__(self, server: RuntimeServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.client = "-"
        self.buffer = bytearray()
        self.head: RequestHead | None = None  # read; its body is awaited
        self.running: tuple[RequestHead, str, InferJob, float] | None = None  # inference out
        self.answering = False
        self.closing = False
        self.eof = False  # the client has shut down its sending side
        self.lingering = 0  # > 0: after an error reply, bytes still read and dropped
        self.write_paused = False
        self.last_active = self.loop.time()

    # -------------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "-"
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)

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
        if self.running is None:
            self._process()
        elif len(self.buffer) > MAX_HEAD_BYTES and self.transport is not None:
            # A client pipelining while its request runs: stop reading until it is answered.
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.running is not None and not self.lingering:
            return True  # answer the request first; _reply closes
        return False  # the transport closes itself

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.running is None:
            self._process()

    # ---------------------------------------------------------------------------- requests

    @property
    def busy(self) -> bool:
        """A request is being read or answered."""
        if self.running is not None or self.answering:
            return True
        return not (self.lingering or self.closing) and (self.head is not None or bool(self.buffer))

    def close_if_idle(self) -> None:
        if not self.busy:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _process(self) -> None:
        """Answer each complete request in the buffer, in order, until one must wait."""
        try:
            while self.running is None and not self.closing and not self.write_paused:
                buffer = self.buffer
                if self.head is None:
                    while buffer and buffer[0] in (13, 10):  # blank lines between requests
                        del buffer[:1]
                    if not buffer:
                        break
                    end = _head_end(buffer)
                    if end is None:
                        if len(buffer) > MAX_HEAD_BYTES:
                            raise HeadError(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                        break
                    head = parse_head(bytes(buffer[: end[0]]))
                    del buffer[: end[1]]
                    self._check_length(head)
                    self.head = head
                    if head.length > len(buffer) and (
                        head.headers.get("expect", "").lower() == "100-continue"
                    ):
                        assert self.transport is not None
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                head = self.head
                if len(buffer) < head.length:
                    break
                if head.length == len(buffer):
                    body = bytes(buffer)
                    buffer.clear()
                else:
                    body = bytes(buffer[: head.length])
                    del buffer[: head.length]
                self.head = None
                self.answering = True  # counted in flight (a /metrics scrape counts itself)
                try:
                    self._answer(head, body)
                finally:
                    self.answering = False
        except HeadError as exc:
            self._reject(exc)
        except Exception as exc:  # a bug: answer 500 and close rather than hang the client
            event("request_failed", logging.ERROR, exc_info=exc, client=self.client)
            self._reject(HeadError(500, f"internal error: {type(exc).__name__}: {exc}"))
        if (
            self.running is None
            and not self.closing
            and self.transport is not None
            and not self.transport.is_reading()
        ):
            self.transport.resume_reading()

    def _check_length(self, head: RequestHead) -> None:
        limit = self.app.config.max_request_bytes
        if head.length > limit:
            raise HeadError(
                413, f"the body has {head.length} bytes; the limit is {limit}", head.target
            )

    def _reject(self, exc: HeadError) -> None:
        """Answer an error and close: what remains of the request cannot be parsed."""
        self.head = None
        self._write(error_response(exc.status, exc.message), close=True)
        if exc.target is not None:
            self.app.metrics.request(endpoint_label(exc.target), exc.status, None)
            event(
                "request_error",
                logging.WARNING,
                path=exc.target,
                status=exc.status,
                message=exc.message,
            )
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
        self.loop.call_later(LINGER_S, self._close)

    def _answer(self, head: RequestHead, body: bytes) -> None:
        started = time.perf_counter()
        app = self.app
        method = head.method
        path = request_path(head.target)
        if method not in _METHODS:
            raise HeadError(501, f"method {method} is not supported", head.target)
        outcome = app.begin(method, path, head.headers, body)
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
        self.running = None
        if error is not None or results is None:
            response = self.app.failure(error or RuntimeError("no results"), head.method, path)
        else:
            response = self.app.conclude(job, results, head.method, path)
        self._reply(head, path, response, started)
        if not self.closing:
            self._process()

    def _reply(self, head: RequestHead, path: str, response: Response, started: float) -> None:
        close = not head.keep_alive or self.eof or self.server.draining
        self._write(response, close=close)
        label = endpoint_label(path)
        app = self.app
        app.metrics.request(
            label, response.status, time.perf_counter() - started if label == "infer" else None
        )
        if response.status >= 400:
            event(
                "request_error",
                logging.WARNING if response.status < 500 else logging.ERROR,
                method=head.method,
                path=head.target,
                status=response.status,
                client=self.client,
                message=json.loads(response.body).get("error", ""),
            )
        elif logger.isEnabledFor(logging.DEBUG):
            event(
                "request",
                logging.DEBUG,
                method=head.method,
                path=head.target,
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


def pool_size(intra_op_threads: int) -> int:
    """Threads for models too slow to run on the loop: one run per core when each run uses one
    core, else two (each run already spreads over the cores; two overlap Python and compute)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, 8)) if intra_op_threads == 1 else 2


class RuntimeServer:
    """The listening socket and the event loop's thread; tracks connections so that SIGTERM can
    drain them."""

    # The default backlog drops connections when many clients connect at once.
    backlog = 256

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self.socket = _listen(*address)  # raises OSError: the caller reports it
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self.loop = asyncio.new_event_loop()
        self.connections: set[Connection] = set()
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
                    lambda: Connection(self), sock=self.socket, backlog=self.backlog
                )
            )
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

    def _schedule_sweep(self) -> None:
        timeout = self.app.config.keepalive_timeout_s
        self.loop.call_later(min(1.0, timeout / 2), self._sweep)

    def _sweep(self) -> None:
        """Close connections idle (or stalled mid-request) for keepalive_timeout_s."""
        timeout = self.app.config.keepalive_timeout_s
        now = self.loop.time()
        for connection in list(self.connections):
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
    try:
        model = load_model(
            config.model_path,
            config.model_name,
            config.model_version,
            intra_op_threads=config.intra_op_threads,
            inter_op_threads=config.inter_op_threads,
            cpu_mem_arena=config.cpu_mem_arena,
            mem_pattern=config.mem_pattern,
            arena_extend_strategy=config.arena_extend_strategy,
        )
    except ModelError as exc:
        event("model_error", logging.ERROR, message=str(exc))
        return EXIT_MODEL
    app = App(config, model)
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
    )
    started = time.perf_counter()
    try:
        model.warm_up()
    except Exception as exc:
        event("warmup_failed", logging.ERROR, message=f"{model.path}: warm-up inference: {exc}")
        server.stop()
        app.close()
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
    event("stopped", drained=drained, abandoned=abandoned)
    return 0


def main(argv: list[str] | None = None) -> int:
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
