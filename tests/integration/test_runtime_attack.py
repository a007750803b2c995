"""The runtime as a real process on loopback under hostile clients (issue 9).

One test per attack, each bounded in connections, bytes and time. Throughout each attack:
  - the server's resident memory stays below idle RSS + 2 x the largest valid request + 32 MiB
    (VmHWM, reset before the attack through /proc/PID/clear_refs, and VmRSS sampled), where idle
    RSS is measured after a valid request of the largest size;
  - ``GET /v2/health/ready`` from a fresh client answers 200 within 2 s (a liveness bound for
    the probe's client, not a timing assertion on the server).

The model: FP32 [N, 65536] -> Identity, served with max_batch_size 4, so that its largest valid
request (4 x 65536 x 26 + 65536 bytes, the runtime's own derivation) is a few MiB: large enough
for a half-sent body or a deep JSON document to reach the code under attack, small enough that
the bound catches a server that buffers what it should refuse.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.runtime_helpers import RuntimeProcess, start_runtime

pytestmark = pytest.mark.integration

COLUMNS = 65536
MAX_BATCH = 4
# packager.runtime.protocol.largest_request_bytes for this model (26 bytes per JSON element plus
# 64 KiB for the rest of the document), written out: the test states the bound it holds.
LARGEST_REQUEST = MAX_BATCH * COLUMNS * 26 + 64 * 1024
RSS_SLACK = 32 << 20
PROBE_TIMEOUT_S = 2.0
INFER = "/v2/models/wide/infer"


def wide_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, COLUMNS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, COLUMNS])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def gather_model(path: Path) -> Path:
    """out = table[idx] over a 10-element table: an index out of range fails inside
    onnxruntime, a fault of the request's values, not of the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(10, dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def binary_request(rows: int, outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, str]:
    """(body, Inference-Header-Content-Length) for ``rows`` rows as a binary tensor."""
    blob = np.full((rows, COLUMNS), 0.5, dtype="<f4").tobytes()
    document: dict[str, Any] = {
        "inputs": [
            {
                "name": "x",
                "shape": [rows, COLUMNS],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    if outputs is not None:
        document["outputs"] = outputs
    header = json.dumps(document).encode()
    return header + blob, str(len(header))


def post(
    runtime: RuntimeProcess,
    body: bytes,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=timeout_s)
    try:
        connection.request("POST", INFER, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Watch:
    """Samples the server's RSS and probes its readiness from fresh clients, in two threads."""

    def __init__(self, runtime: RuntimeProcess) -> None:
        self.runtime = runtime
        self.pid = runtime.process.pid
        self.idle_kib = status_kib(self.pid, "VmRSS")
        try:  # 5: reset the peak RSS (VmHWM) to the current RSS
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.peak_kib = self.idle_kib
        self.peak_fds = 0
        self.probes: list[str] = []  # "200", or what went wrong
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with suppress(OSError, AssertionError):
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
                self.peak_fds = max(
                    self.peak_fds, len(list(Path(f"/proc/{self.pid}/fd").iterdir()))
                )

    def _probe(self) -> None:
        while not self._stop.wait(0.1):
            connection = http.client.HTTPConnection(
                "127.0.0.1", self.runtime.port, timeout=PROBE_TIMEOUT_S
            )
            try:
                connection.request("GET", "/v2/health/ready")
                reply = connection.getresponse()
                reply.read()
                self.probes.append(str(reply.status))
            except (OSError, http.client.HTTPException) as exc:
                self.probes.append(f"{type(exc).__name__}: {exc}")
            finally:
                connection.close()

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.3)  # a last probe and sample after the attack
        self._stop.set()
        for thread in self._threads:
            thread.join(PROBE_TIMEOUT_S + 5)
        if self.runtime.process.poll() is None and self.hwm_reset:
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmHWM"))

    def check(self) -> None:
        assert self.runtime.process.poll() is None, "the runtime died"
        bound_kib = self.idle_kib + (2 * LARGEST_REQUEST + RSS_SLACK) // 1024
        print(
            f"RSS idle {self.idle_kib / 1024:.1f} MiB, peak {self.peak_kib / 1024:.1f} MiB "
            f"(+{(self.peak_kib - self.idle_kib) / 1024:.1f}), bound {bound_kib / 1024:.1f} MiB; "
            f"{len(self.probes)} probes; at most {self.peak_fds} descriptors open"
        )
        assert self.peak_kib <= bound_kib, (self.idle_kib, self.peak_kib, bound_kib)
        failed = [probe for probe in self.probes if probe != "200"]
        assert self.probes and not failed, failed[:5]


@pytest.fixture
def wide(tmp_path: Path) -> Iterator[RuntimeProcess]:
    with serve_wide(tmp_path) as runtime:
        yield runtime


@contextmanager
def serve_wide(tmp_path: Path, **config: Any) -> Iterator[RuntimeProcess]:
    model = wide_model(tmp_path / "wide.onnx")
    runtime = start_runtime(tmp_path / "rt", model, "wide", max_batch_size=MAX_BATCH, **config)
    try:
        # Idle means after serving the largest valid request (onnxruntime's arena has grown).
        body, length = binary_request(MAX_BATCH)
        assert post(runtime, body, {"Inference-Header-Content-Length": length})[0] == 200
        yield runtime
    finally:
        runtime.stop()


def push(sock: socket.socket, data: bytes | memoryview, deadline: float) -> int:
    """Send from a non-blocking socket until all is sent, the peer stops reading (nothing moves
    for 0.5 s) or the deadline passes; returns the bytes sent."""
    view = memoryview(data)
    sent = 0
    stalled_since = time.monotonic()
    while sent < len(view) and time.monotonic() < deadline:
        try:
            count = sock.send(view[sent : sent + (1 << 20)])
        except BlockingIOError:
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
            continue
        except OSError:
            break  # closed or reset by the server: it refused
        sent += count
        stalled_since = time.monotonic()
    return sent


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def open_socket(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex(("127.0.0.1", port))
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    return sock


def read_reply(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """What the server answered (up to its close), from a socket used non-blocking so far."""
    sock.setblocking(True)
    sock.settimeout(timeout_s)
    reply = b""
    with suppress(OSError):
        while chunk := sock.recv(65536):
            reply += chunk
            if len(reply) > 1 << 20:
                break
    return reply


# ----------------------------------------------------------------------------------- attacks

# The runtime's connection cap: max_connections' default, which fits in NOFILE descriptors
# with the runtime's spare ones (4 accept batches of 16 and 32 more: server.connection_limit).
CAP = 256
NOFILE = 384  # under 2 x CAP: a server without a cap runs out of descriptors


def test_slow_headers_from_twice_the_connection_cap(tmp_path: Path) -> None:
    """2 x the connection cap (more than the process's descriptors) dribble request heads,
    reconnecting when closed."""
    with serve_wide(tmp_path, nofile=NOFILE) as runtime:
        with sockets() as open_, Watch(runtime) as watch:
            head = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: "
            made = 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                while len(open_) < 2 * CAP and made < 8 * CAP:
                    sock = open_socket(runtime.port)
                    made += 1
                    if sock is not None:
                        open_.append(sock)
                        with suppress(OSError):
                            sock.send(head)
                for sock in list(open_):
                    try:
                        sock.send(b"a")
                    except OSError:  # evicted or refused: the attacker comes back
                        open_.remove(sock)
                        sock.close()
                time.sleep(0.2)
        watch.check()
        assert made > 2 * CAP  # the server closed some (the oldest heads) for newcomers
        assert watch.peak_fds < NOFILE


def test_half_sent_bodies(wide: RuntimeProcess) -> None:
    """Bodies announced at the largest valid size (and at 64 MiB), half sent, then held."""
    start = b'{"inputs":[{"name":"x","shape":[4,65536],"datatype":"FP32","data":['
    half = start + b"0.1234567," * (LARGEST_REQUEST // 2 // 10)
    requests = []
    for index in range(28):
        announced = LARGEST_REQUEST if index < 24 else 64 << 20
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n"
        requests.append(head.encode() + (half if index < 24 else b" " * (8 << 20)))
    _push_each_on_its_own_connection(wide, requests, within_s=10, hold_s=2)  # held half-sent


def _push_each_on_its_own_connection(
    runtime: RuntimeProcess, payloads: list[bytes], *, within_s: float, hold_s: float = 0.0
) -> None:
    """Each payload pushed on a new connection (all within ``within_s``), the connections held
    open ``hold_s`` more, no reply ever read; then the runtime's watch must hold."""
    with sockets() as open_, Watch(runtime) as watch:
        deadline = time.monotonic() + within_s
        for payload in payloads:
            sock = open_socket(runtime.port)
            assert sock is not None
            open_.append(sock)
            time.sleep(0.01)  # connected
            push(sock, payload, deadline)
        time.sleep(hold_s)
    watch.check()


def test_pipelining_without_reading(wide: RuntimeProcess) -> None:
    """Requests pipelined as fast as the server takes them; no reply is ever read."""
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = request * ((64 << 20) // len(request))
    _push_each_on_its_own_connection(wide, [stream, stream], within_s=6)


def test_duplicate_output_names(wide: RuntimeProcess) -> None:
    body, length = binary_request(1, outputs=[{"name": "y"}] * 1000)
    with Watch(wide) as watch:
        status, reply = post(wide, body, {"Inference-Header-Content-Length": length}, 15)
    watch.check()
    assert status == 400
    assert json.loads(reply) == {"error": "output 'y' is requested twice"}


def test_batch_above_max_batch_size(wide: RuntimeProcess) -> None:
    with Watch(wide) as watch:
        body, length = binary_request(MAX_BATCH + 1)
        small = post(wide, body, {"Inference-Header-Content-Length": length})
        # A batch that only the target's 64 MiB cap would have let through.
        body, length = binary_request(255)
        large = post(wide, body, {"Inference-Header-Content-Length": length})
        del body
    watch.check()
    assert small[0] == 400
    assert "more than this runtime's max_batch_size (4)" in json.loads(small[1])["error"]
    assert large[0] == 413
    assert f"the limit is {LARGEST_REQUEST}" in json.loads(large[1])["error"]


def test_64_mib_body(wide: RuntimeProcess) -> None:
    """A 64 MiB JSON document of numbers (the old default limit, accepted and parsed)."""
    start = b'{"inputs":[{"name":"x","shape":[4,65536],"datatype":"FP32","data":['
    end = b"0.5]}]}"
    size = 64 << 20
    fill = b"0.1234567,"
    count = (size - len(start) - len(end)) // len(fill)
    body = start + fill * count + end
    body += b" " * (size - len(body))
    with Watch(wide) as watch:
        sock = open_socket(wide.port)
        assert sock is not None
        try:
            time.sleep(0.01)
            head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
            push(sock, head.encode() + body, time.monotonic() + 10)
            del body
            reply = read_reply(sock)
        finally:
            sock.close()
    watch.check()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_100k_deep_json(wide: RuntimeProcess) -> None:
    body = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert len(body) < LARGEST_REQUEST  # it reaches the JSON parser
    with Watch(wide) as watch:
        status, reply = post(wide, body)
    watch.check()
    assert status == 400
    assert json.loads(reply) == {"error": "malformed JSON request: nested too deeply"}


def test_client_caused_inference_errors_never_change_readiness(tmp_path: Path) -> None:
    """Indices out of range fail inside onnxruntime: 400 each time, readiness stays 200."""
    model = gather_model(tmp_path / "gather.onnx")
    runtime = start_runtime(tmp_path / "rt", model, "gather")
    try:
        bad = json.dumps(
            {"inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [100]}]}
        ).encode()
        for _ in range(10):
            connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
            connection.request("POST", "/v2/models/gather/infer", body=bad)
            reply = connection.getresponse()
            document = json.loads(reply.read())
            connection.close()
            assert reply.status == 400
            assert "ONNXRuntimeError" not in document["error"]
            assert "Gather" not in document["error"]
            connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
            connection.request("GET", "/v2/health/ready")
            assert connection.getresponse().status == 200
            connection.close()
    finally:
        assert runtime.stop() == 0


def test_error_log_lines_are_bounded(wide: RuntimeProcess) -> None:
    """200 requests for a 30 KB URL: each logged line is short and the errors are rate-limited
    (the suppressed ones are counted), so a client cannot fill the journal."""
    before = wide.log_path.stat().st_size
    target = "/v2/" + "a" * 30_000
    connection = http.client.HTTPConnection("127.0.0.1", wide.port, timeout=10)
    for _ in range(200):
        connection.request("GET", target)
        reply = connection.getresponse()
        assert reply.status == 404
        assert len(reply.read()) < 600
    connection.close()
    with wide.log_path.open("rb") as log:
        log.seek(before)
        lines = log.read().splitlines()
    assert lines and max(len(line) for line in lines) < 1024
    assert sum(len(line) for line in lines) < 200 * 1024  # the URL alone would be 6 MB
