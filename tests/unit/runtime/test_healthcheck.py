"""packager/runtime/healthcheck.py against real loopback listeners: 0 only for a 200 from
/v2/health/ready; 1, never a traceback, for a refused port, a non-200 and a reply that is not
HTTP at all."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from packager.runtime.healthcheck import check, main
from tests.ports import raw_listener


@contextmanager
def _answering(reply: bytes) -> Iterator[int]:
    """A loopback listener that reads a request and writes ``reply`` to each connection."""

    def answer(connection: socket.socket, stop: threading.Event) -> None:
        with suppress(OSError):
            connection.recv(65536)
            connection.sendall(reply)
            connection.shutdown(socket.SHUT_WR)

    with raw_listener(answer) as (port, _):
        yield port


def test_ready_is_a_200_from_the_ready_endpoint() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with _answering(ok) as port:
        assert check(port, 3.0)
        assert main(["--port", str(port), "--timeout", "3"]) == 0


def test_a_non_200_is_not_ready() -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with _answering(busy) as port:
        assert not check(port, 3.0)


def test_a_reply_that_is_not_http_is_not_ready_and_no_traceback() -> None:
    # http.client raises BadStatusLine (an HTTPException, not an OSError) for this line.
    with _answering(b"SSH-2.0-OpenSSH_9.2\r\n") as port:
        assert not check(port, 3.0)
        assert main(["--port", str(port), "--timeout", "3"]) == 1


def test_a_closed_port_is_not_ready() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    assert not check(port, 1.0)


def test_a_malformed_redirect_is_not_ready_and_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """urllib's redirect handler parses the Location before anything else: 'http://[x' raised
    ValueError (Invalid IPv6 URL), a traceback out of the HEALTHCHECK."""
    moved = b"HTTP/1.0 302 Found\r\nLocation: http://[x\r\nContent-Length: 0\r\n\r\n"
    with _answering(moved) as port:
        assert main(["--port", str(port), "--timeout", "3"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_redirect_to_a_ready_server_is_not_followed() -> None:
    """Readiness is the runtime's own 200 on the probed port, not another port's."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with _answering(ok) as elsewhere:
        moved = (f"HTTP/1.0 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{elsewhere}"
                 "/v2/health/ready\r\nContent-Length: 0\r\n\r\n").encode()
        with _answering(moved) as port:
            assert check(elsewhere, 3.0)
            assert not check(port, 3.0)


def test_a_server_dripping_its_answer_is_given_up_on() -> None:
    """A byte every 0.1 s, never a whole status line and headers: each socket read is within
    urllib's per-operation timeout, so the old probe never returned. Liveness, not timing: the
    check must come back at all (the bound is 40x the timeout given)."""

    def drip(connection: socket.socket, stop: threading.Event) -> None:
        with suppress(OSError):
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.1):
                connection.sendall(b"X")

    result: list[bool] = []
    with raw_listener(drip) as (port, _):
        probe = threading.Thread(target=lambda: result.append(check(port, 0.5)), daemon=True)
        probe.start()
        probe.join(timeout=20)
        assert result == [False], "the check did not come back while the server dripped"
