"""Container HEALTHCHECK: exit 0 iff ``GET /v2/health/ready`` answers 200 on 127.0.0.1.

``python3.11 -m edgepack_runtime.healthcheck [--port P]``; without --port, the port comes from the
config named by $EDGEPACK_RUNTIME_CONFIG, else 8080.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from .config import ConfigError, load_config


def default_port() -> int:
    try:
        return load_config(None).port
    except ConfigError:
        return 8080


def check(port: int, timeout_s: float) -> bool:
    # An http_proxy variable in the container's environment must not capture a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/health/ready", timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgepack_runtime.healthcheck")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else default_port()
    return 0 if check(port, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
