"""Container HEALTHCHECK: exit 0 iff ``GET /v2/health/ready`` answers 200 on 127.0.0.1.

``python3.11 -m edgepack_runtime.healthcheck [--port P]``; without --port, the port comes from the
config named by $EDGEPACK_RUNTIME_CONFIG, else 8080.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import threading
import urllib.error
import urllib.request

from .config import ConfigError, load_config


def default_port() -> int:
    """The port of the config named by $EDGEPACK_RUNTIME_CONFIG; 8080 when none loads."""
    try:
        return load_config(None).port
    except ConfigError:
        return 8080


def _probe(port: int, timeout_s: float) -> bool:
    # Plain HTTP and nothing more: no proxy (an http_proxy variable in the container's
    # environment must not capture a loopback probe) and no redirect handler. The runtime
    # answers /v2/health/ready itself: a redirect is not ready (an HTTPError), is never followed
    # to another port or host, and its Location is not parsed (a malformed one raises ValueError
    # in urllib's redirect handler).
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/health/ready", timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    # A port that answers garbage (another service, a half-started one) raises
    # http.client.HTTPException (BadStatusLine & co), which is not an OSError; ValueError: a
    # timeout or port no socket takes.
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return False


def check(port: int, timeout_s: float) -> bool:
    """Whether ``GET http://127.0.0.1:<port>/v2/health/ready`` answers 200 (a redirect is not
    followed) within ``timeout_s`` seconds in all (no proxy); False on any URL or socket error, on a
    reply that is not HTTP, and when the time is up. urllib's timeout bounds each socket
    operation only (a server dripping its answer would stretch it without end): the probe runs
    in a daemon thread that is given up on at the deadline."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_probe(port, timeout_s)), daemon=True)
    probe.start()
    probe.join(max(timeout_s, 0.0))
    return bool(answer) and answer[0]


def main(argv: list[str] | None = None) -> int:
    """The HEALTHCHECK command line: 0 when the runtime is ready, 1 when it is not."""
    parser = argparse.ArgumentParser(prog="edgepack_runtime.healthcheck")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else default_port()
    return 0 if check(port, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
