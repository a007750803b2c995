"""The runtime's HTTP server: Open Inference Protocol v2 over the standard library's HTTP server.

Run as ``python3.11 -m edgepack_runtime.server --config /etc/edgepack/runtime.json`` (in images) or
``python -m packager.runtime.server --config X`` (on the host). Exit codes: 0 after a clean stop
(SIGTERM/SIGINT), 2 bad configuration, 3 model cannot be loaded or warmed up, 4 cannot listen.

One thread per connection (HTTP/1.1 keep-alive); onnxruntime releases the GIL while it computes,
so concurrent requests overlap their inference.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .batching import Batcher, QueueFull
from .cache import ResponseCache, cache_key
from .config import ConfigError, RuntimeConfig, load_config
from .log import configure, event
from .metrics import Metrics
from .model import Array, Model, ModelError, load_model
from .protocol import (
    HEADER_LENGTH,
    ProtocolError,
    bad_request,
    encode_infer_response,
    parse_infer_request,
)
from .sdnotify import notify, watchdog_interval_s

EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_LISTEN = 4

# http.server's headers (an email.message.Message) or any mapping: only .get is used.
_Headers = Message | Mapping[str, str]

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
        path = urlsplit(target).path.rstrip("/") or "/"
        try:
            return self._route(method, path, headers, body)
        except ServiceUnavailable as exc:
            return error_response(503, exc.message, (("Retry-After", str(exc.retry_after_s)),))
        except ProtocolError as exc:
            return error_response(exc.status, exc.message)
        except Exception as exc:
            # A bug or an onnxruntime failure answers 500; the server keeps serving.
            event("request_failed", logging.ERROR, exc_info=True, method=method, path=path)
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def _route(self, method: str, path: str, headers: _Headers, body: bytes) -> Response:
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
            return self.infer(headers, body)
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

    def infer(self, headers: _Headers, body: bytes) -> Response:
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
        results: Sequence[Array] | None = None
        key = b""
        if self.cache is not None:
            key = cache_key(self.model.digest, request.inputs, names)
            results = self.cache.get(key)
            self.metrics.count("cache_hits" if results is not None else "cache_misses")
        if results is None:
            results = self._run(request.inputs, names)
            if self.cache is not None:
                self.cache.put(key, results)
        payload, json_length = encode_infer_response(
            self.model.name, self.model.version, request.id, request.outputs, results
        )
        if json_length is None:
            return Response(200, payload)
        return Response(
            200, payload, "application/octet-stream", ((HEADER_LENGTH, str(json_length)),)
        )

    def _run(self, inputs: Mapping[str, Array], names: Sequence[str]) -> list[Array]:
        if self.batcher is not None:
            try:
                return self.batcher.submit(inputs, names)
            except QueueFull:
                self.metrics.count("rejected")
                raise ServiceUnavailable(
                    f"the queue is full ({self.config.max_queue_size} requests waiting); "
                    "retry later"
                ) from None
        with self._lock:
            if self._running >= self.config.max_queue_size:
                self.metrics.count("rejected")
                raise ServiceUnavailable(
                    f"{self._running} requests are already running (max_queue_size); retry later"
                )
            self._running += 1
        try:
            spec = self.model.signature.inputs[0]
            rows = int(inputs[spec.name].shape[0]) if self.model.signature.batchable else 1
            return self._timed_run(inputs, names, rows)
        finally:
            with self._lock:
                self._running -= 1

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
        with self._lock:
            self._failures = 0
        self.metrics.inference(rows, time.perf_counter() - started)
        return results


def endpoint_label(path: str) -> str:
    """A small, fixed set of label values, whatever paths clients send."""
    path = urlsplit(path).path.rstrip("/")
    if path.endswith("/infer"):
        return "infer"
    if path.endswith("/ready"):
        return "ready"
    if path in ("/v2/health/live", "/metrics", "/v2/health/report", "/v2"):
        return {
            "/v2/health/live": "live",
            "/metrics": "metrics",
            "/v2/health/report": "report",
            "/v2": "server_metadata",
        }[path]
    if path.startswith("/v2/models/"):
        return "model_metadata"
    return "other"


class RuntimeServer(ThreadingHTTPServer):
    """Tracks connections and in-flight requests so that SIGTERM can drain them."""

    daemon_threads = True
    # Draining is bounded by drain_timeout_s in wait_idle, not by joining every thread.
    block_on_close = False
    # The default backlog of 5 drops connections when 32 clients connect at once.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self.draining = False
        self._lock = threading.Condition()
        self._connections: dict[Handler, bool] = {}  # handler -> busy
        self._busy = 0
        super().__init__(address, Handler)

    def connection_opened(self, handler: Handler) -> None:
        with self._lock:
            self._connections[handler] = False

    def connection_closed(self, handler: Handler) -> None:
        with self._lock:
            if self._connections.pop(handler, False):
                self._busy -= 1
                self._lock.notify_all()

    def request_started(self, handler: Handler) -> None:
        with self._lock:
            if not self._connections.get(handler, True):
                self._connections[handler] = True
                self._busy += 1

    def request_finished(self, handler: Handler) -> None:
        with self._lock:
            if self._connections.get(handler, False):
                self._connections[handler] = False
                self._busy -= 1
                self._lock.notify_all()

    def close_idle_connections(self) -> None:
        """Wake threads blocked reading from idle keep-alive connections so that they end."""
        with self._lock:
            idle = [handler for handler, busy in self._connections.items() if not busy]
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._busy


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edgepack-runtime/{__version__}"
    sys_version = ""  # no need to tell the network which Python runs here
    server: RuntimeServer

    def setup(self) -> None:
        super().setup()
        # An idle keep-alive connection holds a thread; the timeout ends it.
        self.connection.settimeout(self.server.app.config.keepalive_timeout_s)
        # Headers and body go out in separate writes; without this Nagle's algorithm and
        # delayed ACKs add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connection_opened(self)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connection_closed(self)

    def parse_request(self) -> bool:
        # Called once the request line has arrived: from here the connection is busy.
        self.server.request_started(self)
        return super().parse_request()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            self.server.request_finished(self)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        body = self._read_body() if method in ("POST", "PUT") else b""
        if body is None:
            return
        app = self.server.app
        response = app.handle(method, self.path, self.headers, body)
        self._send(response)
        label = endpoint_label(self.path)
        app.metrics.request(
            label, response.status, time.perf_counter() - started if label == "infer" else None
        )
        if response.status >= 400:
            event(
                "request_error",
                logging.WARNING if response.status < 500 else logging.ERROR,
                method=method,
                path=self.path,
                status=response.status,
                client=self.client_address[0],
                message=json.loads(response.body).get("error", ""),
            )
        else:
            event(
                "request",
                logging.DEBUG,
                method=method,
                path=self.path,
                status=response.status,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering an error (the connection is then closed)."""
        if self.headers.get("Transfer-Encoding"):
            self._reject(411, "chunked requests are not accepted; send Content-Length")
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._reject(411, "the request needs a Content-Length header")
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self._reject(400, f"Content-Length must be a non-negative integer, got {raw!r}")
            return None
        limit = self.server.app.config.max_request_bytes
        if length > limit:
            self._reject(413, f"the body has {length} bytes; the limit is {limit}")
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _reject(self, status: int, message: str) -> None:
        # The unread body would be parsed as the next request, so this connection must end.
        self.close_connection = True
        self._send(error_response(status, message), close=True)
        self.server.app.metrics.request(endpoint_label(self.path), status, None)
        self._linger()
        event("request_error", logging.WARNING, path=self.path, status=status, message=message)

    def _linger(self, limit_bytes: int = 64 << 20, limit_s: float = 2.0) -> None:
        """Read and drop what the client still sends, so that it can read our error reply
        instead of getting a connection reset while its body is in flight (a lingering close)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + limit_s
            self.connection.settimeout(limit_s)
            while limit_bytes > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(1 << 16)
                if not chunk:
                    break
                limit_bytes -= len(chunk)
        except OSError:
            pass

    def _send(self, response: Response, *, close: bool = False) -> None:
        reason = self.responses.get(response.status, ("",))[0]
        lines = [
            f"{self.protocol_version} {response.status} {reason}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        if close or self.server.draining:
            lines.append("Connection: close")
            self.close_connection = True
        # Head and body in one write: one segment on the wire for small responses.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + response.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs each request as a structured event

    def log_message(self, format: str, *args: Any) -> None:
        event("http", logging.DEBUG, message=format % args, client=self.client_address[0])


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
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
    )
    thread.start()
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
        server.shutdown()
        server.server_close()
        app.close()
        return EXIT_MODEL
    app.ready.set()
    event(
        "ready",
        warmup_ms=round((time.perf_counter() - started) * 1000, 3),
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
    server.draining = True
    server.shutdown()  # the accept loop ends: no new connections
    server.server_close()
    server.close_idle_connections()
    drained = server.wait_idle(config.drain_timeout_s)
    app.close()
    event("stopped", drained=drained, abandoned=server.in_flight)
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
