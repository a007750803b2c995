"""Loopback ports for servers tests start (runtimes, registries, published container ports)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


def free_port() -> int:
    """A loopback port the kernel says is free now (another process may take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_in(ports: range, *, reuse: bool = False) -> int:
    """The first loopback port of ``ports`` nothing listens on (a suite's own range, so that
    parallel suites do not collide on published container ports). With ``reuse``, probed with
    SO_REUSEADDR, as a server that binds so (http.server's, the runtime's) would bind: a port
    an earlier test's connections left in TIME_WAIT counts as free (without it a small range
    runs out)."""
    for port in ports:
        with socket.socket() as probe:
            if reuse:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port in {ports.start}-{ports.stop - 1}")


@contextmanager
def raw_listener(
    handle: Callable[[socket.socket, threading.Event], None],
) -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP listener on 127.0.0.1 (an ephemeral port) for servers no HTTP library would be
    (silent, dripping, answering garbage): ``handle(connection, stop)`` runs in a thread of its
    own for each connection accepted (returning leaves the connection open). Yields the port and
    the connections accepted; on exit sets ``stop``, stops accepting, shuts every connection
    down (which wakes a handler blocked in recv) and joins the threads, each for at most 10 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # the accept loop looks at ``stop`` this often
    accepted: list[socket.socket] = []
    handlers: list[threading.Thread] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(connection)
            handler = threading.Thread(target=handle, args=(connection, stop), daemon=True)
            handlers.append(handler)
            handler.start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), accepted
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()
        for connection in accepted:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        for handler in handlers:
            handler.join(timeout=10)
