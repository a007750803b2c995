"""The App's routing and health state without sockets, and the HTTP/1.1 server in this process on
loopback (the runtime as a real process is in tests/integration)."""

from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.runtime import server as server_module
from packager.runtime.config import RuntimeConfig
from packager.runtime.log import Throttle, clip
from packager.runtime.model import load_model
from packager.runtime.server import (
    FAILURES_UNTIL_UNHEALTHY,
    App,
    HeadError,
    Headers,
    RuntimeServer,
    endpoint_label,
    parse_head,
)
from tests.integration.runtime_helpers import TESTDATA

NETWORK = TESTDATA / "onnx" / "Network.onnx"


def make_app(**config: Any) -> App:
    settings = RuntimeConfig(model_name="iris", model_path=Path(NETWORK), **config)
    app = App(settings, load_model(NETWORK, "iris", "1"))
    app.ready.set()
    return app


def infer_body(rows: int = 1) -> bytes:
    tensor = {"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": [1.0] * 4 * rows}
    return json.dumps({"inputs": [tensor]}).encode()


def test_ready_turns_false_after_repeated_inference_failures_and_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app()
    real_run = app.model.run

    def broken(inputs: Mapping[str, Any], outputs: Sequence[str]) -> list[Any]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(app.model, "run", broken)
    for _ in range(FAILURES_UNTIL_UNHEALTHY):
        assert app.handle("GET", "/v2/health/ready", {}, b"").status == 200
        response = app.handle("POST", "/v2/models/iris/infer", {}, infer_body())
        assert response.status == 500
        # The cause goes to the log; the client learns nothing of the internals.
        assert json.loads(response.body) == {"error": "inference failed; see the runtime's log"}
    assert app.handle("GET", "/v2/health/ready", {}, b"").status == 503
    assert app.handle("GET", "/v2/models/iris/ready", {}, b"").status == 503
    monkeypatch.setattr(app.model, "run", real_run)
    assert app.handle("POST", "/v2/models/iris/infer", {}, infer_body()).status == 200
    assert app.handle("GET", "/v2/health/ready", {}, b"").status == 200
    app.close()


def test_inference_errors_caused_by_the_input_answer_400_and_keep_readiness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app()
    real_run = app.model.run

    def refuses_ones(inputs: Mapping[str, Any], outputs: Sequence[str]) -> list[Any]:
        if float(next(iter(inputs.values())).ravel()[0]) == 1.0:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Gather: index out of range")
        return real_run(inputs, outputs)

    monkeypatch.setattr(app.model, "run", refuses_ones)
    for _ in range(FAILURES_UNTIL_UNHEALTHY * 3):
        response = app.handle("POST", "/v2/models/iris/infer", {}, infer_body())
        assert response.status == 400
        assert b"ONNXRuntimeError" not in response.body and b"Gather" not in response.body
    assert app.handle("GET", "/v2/health/ready", {}, b"").status == 200
    app.close()


def test_not_ready_refuses_inference_with_503() -> None:
    app = make_app()
    app.ready.clear()
    response = app.handle("POST", "/v2/models/iris/infer", {}, infer_body())
    assert response.status == 503
    app.close()


def test_batching_only_for_models_with_a_batch_dimension() -> None:
    assert make_app(max_batch_size=8).batcher is not None
    settings = RuntimeConfig(model_name="m", model_path=Path("x"), max_batch_size=8)
    mnist = load_model(TESTDATA / "onnx" / "mnist.onnx", "m", "1")
    assert App(settings, mnist).batcher is None  # a fixed batch of 1 cannot be merged


def test_batched_app_returns_the_same_scores_as_unbatched() -> None:
    plain, batched = make_app(), make_app(max_batch_size=8, max_queue_delay_us=100)
    one = json.loads(plain.handle("POST", "/v2/models/iris/infer", {}, infer_body(3)).body)
    two = json.loads(batched.handle("POST", "/v2/models/iris/infer", {}, infer_body(3)).body)
    np.testing.assert_allclose(one["outputs"][0]["data"], two["outputs"][0]["data"])
    plain.close()
    batched.close()


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v2/models/m/infer", "infer"),
        ("/v2/models/m/versions/1/infer?x=1", "infer"),
        ("/v2/health/ready", "ready"),
        ("/v2/models/m", "model_metadata"),
        ("/metrics", "metrics"),
        ("/anything/else", "other"),
    ],
)
def test_endpoint_labels_are_a_fixed_set(path: str, label: str) -> None:
    assert endpoint_label(path) == label


def test_headers_get_ignores_case() -> None:
    head = parse_head(
        b"POST /v2/models/m/infer HTTP/1.1\r\nInference-Header-Content-Length: 12\r\n"
        b"content-length: 40"
    )
    assert isinstance(head.headers, Headers)
    assert head.headers.get("Inference-Header-Content-Length") == "12"
    assert head.headers.get("CONTENT-LENGTH") == "40"
    assert (head.method, head.target, head.length, head.keep_alive) == (
        "POST",
        "/v2/models/m/infer",
        40,
        True,
    )


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GARBAGE", 400),
        (b"GET /x HTTP/2.0", 505),
        (b"GET /x FTP/1.1", 400),
        (b"GET /x HTTP/1.1\r\nno colon here", 400),
        (b"GET /x HTTP/1.1\r\n folded: value", 400),
        (b"POST /x HTTP/1.1\r\nHost: a", 411),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked", 411),
        (b"POST /x HTTP/1.1\r\nContent-Length: -1", 400),
        (b"POST /x HTTP/1.1\r\nContent-Length: 1_0", 400),
        (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4", 400),
    ],
)
def test_malformed_heads_are_refused(head: bytes, status: int) -> None:
    with pytest.raises(HeadError) as refused:
        parse_head(head)
    assert refused.value.status == status


def test_http_1_0_closes_unless_keep_alive_is_asked() -> None:
    assert not parse_head(b"GET /x HTTP/1.0").keep_alive
    assert parse_head(b"GET /x HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert not parse_head(b"GET /x HTTP/1.1\r\nConnection: close").keep_alive


# ---- the HTTP server in this process -----------------------------------------------------------


@pytest.fixture(params=["inline", "pool", "batched"])
def served(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A RuntimeServer on loopback, its inference on the loop, in the thread pool or batched."""
    if request.param == "pool":
        monkeypatch.setattr(server_module, "INLINE_RUN_S", 0.0)  # every model counts as slow
    config: dict[str, Any] = {"keepalive_timeout_s": 1.0, "drain_timeout_s": 5.0}
    if request.param == "batched":
        config.update(max_batch_size=8, max_queue_delay_us=1000)
    app = make_app(**config)
    server = RuntimeServer(("127.0.0.1", 0), app)
    server.start()
    yield server
    server.drain(5)
    app.close()
    server.stop()


def _infer_request(rows: int = 1, *, connection: str = "", version: str = "1.1") -> bytes:
    body = infer_body(rows)
    extra = f"Connection: {connection}\r\n" if connection else ""
    return (
        f"POST /v2/models/iris/infer HTTP/{version}\r\nHost: x\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream into (status, body) by Content-Length."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(
            int(v) for k, _, v in (line.partition(": ") for line in lines) if k == "Content-Length"
        )
        found.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return found


def test_pipelined_requests_are_answered_in_order(served: RuntimeServer) -> None:
    port = served.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            _infer_request(1)
            + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            + _infer_request(3)
            + b"GET /v2/nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
            + _infer_request(2, connection="close")
        )
        replies = _responses(_read_all(sock))
    assert [status for status, _ in replies] == [200, 200, 200, 404, 200]
    shapes = [json.loads(body)["outputs"][0]["shape"] for _, body in replies[0::2]]
    assert shapes == [[1, 3], [3, 3], [2, 3]]
    assert json.loads(replies[1][1]) == {"live": True}


def test_keep_alive_over_many_requests_with_http_client(served: RuntimeServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served.server_address[1], timeout=10)
    for rows in (1, 2, 3) * 5:
        connection.request("POST", "/v2/models/iris/infer", body=infer_body(rows))
        reply = connection.getresponse()
        assert reply.status == 200
        assert reply.getheader("Server", "").startswith("edgepack-runtime/")
        assert reply.getheader("Date")
        assert json.loads(reply.read())["outputs"][0]["shape"] == [rows, 3]
    connection.close()


def test_http_1_0_and_connection_close_end_the_connection(served: RuntimeServer) -> None:
    port = served.server_address[1]
    for request in (_infer_request(version="1.0"), _infer_request(connection="close")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            reply = _read_all(sock)  # returns because the server closes
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: close\r\n" in reply


def test_expect_100_continue_is_answered_before_the_body(served: RuntimeServer) -> None:
    body = infer_body(2)
    with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)  # the reply still comes, then the server closes
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


def test_bad_request_line_and_version_answer_and_close(served: RuntimeServer) -> None:
    port = served.server_address[1]
    for request, status in ((b"NONSENSE\r\n\r\n", 400), (b"GET / HTTP/2.0\r\n\r\n", 505)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            reply = _read_all(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode())
        assert b'{"error":' in reply


def test_idle_keep_alive_connection_is_closed_after_the_timeout(served: RuntimeServer) -> None:
    with socket.create_connection(("127.0.0.1", served.server_address[1]), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        reply = _read_all(sock)  # the live reply, then EOF once keepalive_timeout_s (1 s) passed
        assert reply.endswith(b'{"live":true}')
        assert 0.9 < time.monotonic() - started < 5


def test_drain_waits_for_the_request_in_flight_and_closes_idle_connections(
    served: RuntimeServer,
) -> None:
    port = served.server_address[1]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    request = _infer_request(1)
    busy.sendall(request[:20])  # a request half sent: in flight
    deadline = time.monotonic() + 5
    while served.in_flight < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(served.drain(5)))
    drainer.start()
    assert _read_all(idle) == b""  # closed at once
    time.sleep(0.2)
    assert not drained  # still waiting for the half-sent request
    busy.sendall(request[20:])
    reply = _read_all(busy)
    drainer.join(10)
    assert drained == [True]
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in reply
    idle.close()
    busy.close()


# ---- bounds (issue 9) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GET /x HTTP/1.1\nHost: a", "a bare LF"),
        (b"GET /x HTTP/1.1\r\nHost: a\rb", "a bare CR"),
        (b"GET /x HTTP/1.1\r\nHost: a\x00b", "control byte 0x00"),
        (b"GET /x\x01 HTTP/1.1", "control byte 0x01"),
        (b"G(T /x HTTP/1.1", "bad request line"),
        (b"GET /x HTTP/1.1\r\nX\x7fY: 1", "control byte 0x7f"),
        (b"GET /x HTTP/1.1\r\nX Y: 1", "malformed header line"),
    ],
)
def test_heads_with_bare_line_ends_or_control_bytes_are_refused(head: bytes, message: str) -> None:
    with pytest.raises(HeadError) as refused:
        parse_head(head)
    assert refused.value.status == 400
    assert message in refused.value.message


def test_a_content_length_of_thousands_of_digits_is_413_not_a_crash() -> None:
    with pytest.raises(HeadError) as refused:
        parse_head(b"POST /x HTTP/1.1\r\nContent-Length: " + b"9" * 5000)
    assert refused.value.status == 413
    assert len(refused.value.message) < 100


def test_tabs_and_obs_text_in_header_values_are_allowed() -> None:
    head = parse_head(b"GET /x HTTP/1.1\r\nUser-Agent: a\tb \xe9")
    assert head.headers.get("user-agent") == "a\tb \xe9"


def test_the_body_limit_is_the_largest_valid_request_capped_by_the_target() -> None:
    batched = make_app(max_batch_size=8)  # iris: FP32 [-1, 4]
    assert batched.body_limit == 8 * 4 * 26 + 65536 and batched.limit_from_model
    assert make_app(max_batch_size=8, max_request_bytes=1000).body_limit == 1000
    unbounded = make_app()  # a dynamic batch without max_batch_size: the target's cap
    assert unbounded.body_limit == 64 << 20 and not unbounded.limit_from_model
    for app in (batched, unbounded):
        app.close()


def test_connection_limit_leaves_descriptors_for_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (384, 4096))
    assert server_module.connection_limit(1000) == 384 - 16 * 4 - 32
    assert server_module.connection_limit(100) == 100


def test_throttle_drops_past_the_rate_and_counts_what_it_dropped() -> None:
    throttle = Throttle(per_second=0.001, burst=3)
    assert [throttle.allow() for _ in range(5)] == [0, 0, 0, None, None]
    throttle._tokens = 1.0  # a token refilled
    assert throttle.allow() == 2


def test_log_fields_are_clipped() -> None:
    assert clip("x" * 10) == "x" * 10
    assert clip("x" * 1000, 100) == "x" * 100 + "...[900 more]"


def _serve(**config: Any) -> tuple[RuntimeServer, App]:
    app = make_app(**config)
    server = RuntimeServer(("127.0.0.1", 0), app)
    server.start()
    return server, app


def _stop(server: RuntimeServer, app: App) -> None:
    app.close()
    server.stop()


def test_slow_head_and_trickled_body_get_408() -> None:
    server, app = _serve(header_timeout_s=0.3)
    try:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow_head:
            slow_head.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
            assert _read_all(slow_head).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as trickle:
            # 0.3 s + 20000 bytes at 64 KiB/s to arrive; 10 bytes do.
            trickle.sendall(
                b"POST /v2/models/iris/infer HTTP/1.1\r\nContent-Length: 20000\r\n\r\n" + b" " * 10
            )
            reply = _read_all(trickle)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in reply
    finally:
        _stop(server, app)


def test_over_the_cap_the_oldest_stalled_head_makes_room_else_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "INLINE_RUN_S", 0.0)  # runs go to the pool
    server, app = _serve(max_connections=2)
    gate = threading.Event()
    real_run = app.model.run

    def held(inputs: Mapping[str, Any], outputs: Sequence[str]) -> list[Any]:
        gate.wait(10)
        return real_run(inputs, outputs)

    try:
        port = server.server_address[1]
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # never finished
        time.sleep(0.2)
        monkeypatch.setattr(app.model, "run", held)
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(_infer_request(1))  # running until the gate opens
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as newcomer:
            newcomer.sendall(b"GET /v2/health/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert _read_all(newcomer).startswith(b"HTTP/1.1 200 ")
        assert _read_all(stalled) == b""  # closed for the newcomer
        # Both slots now hold requests in progress: one more is refused, not queued.
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        second.sendall(_infer_request(1))
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as refused:
            reply = _read_all(refused)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in reply
        gate.set()
        for sock in (busy, second):
            sock.shutdown(socket.SHUT_WR)
            assert _read_all(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
        stalled.close()
    finally:
        gate.set()
        _stop(server, app)


def test_clients_that_do_not_read_replies_are_bounded_in_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pipelines requests with large replies and never reads: past MAX_STALLED_WRITERS
    such connections, the oldest is closed (so their buffered replies are bounded together)."""
    monkeypatch.setattr(server_module, "MAX_STALLED_WRITERS", 1)
    server, app = _serve()
    try:
        port = server.server_address[1]
        rows = 20_000  # a ~1 MB JSON reply each
        stream = _infer_request(rows) * 8

        def peers(connections: Any) -> set[int]:
            return {c.transport.get_extra_info("peername")[1] for c in list(connections)}

        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        first.sendall(stream)
        deadline = time.monotonic() + 10
        while not server.stalled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peers(server.stalled) == {first.getsockname()[1]}
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        second.sendall(stream)
        while peers(server.stalled) != {second.getsockname()[1]} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peers(server.stalled) == {second.getsockname()[1]}
        assert first.getsockname()[1] not in peers(server.connections)  # closed by the server
        with pytest.raises(ConnectionResetError):  # aborted, its replies dropped
            while first.recv(1 << 20):
                pass
        first.close()
        second.close()
    finally:
        _stop(server, app)
