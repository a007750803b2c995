"""Loopback ports for servers tests start (runtimes, registries, published container ports)."""

from __future__ import annotations

import socket


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
