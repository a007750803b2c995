"""Shared pieces of the agent tests: a fake engine on disk, a loopback repository server with
Range support (rangehttpserver) that can cut a response short, and the 'device is on a complete,
verified version' check."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from RangeHTTPServer import RangeRequestHandler

from packager.agent.agent import AgentConfig
from packager.agent.engine import ready
from packager.agent.store import sha256_file

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
REPO_ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_engine(state: Path) -> Path:
    """An executable 'podman' that runs the fake engine with this interpreter."""
    state.mkdir(parents=True, exist_ok=True)
    exe = state / "podman"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_ENGINE} "$@"\n')
    exe.chmod(0o755)
    return exe


def kill_containers(state: Path) -> None:
    for path in (state / "containers").glob("*.json"):
        try:
            os.kill(json.loads(path.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


class Server:
    """The repository on loopback. ``cut[name] = n`` sends only n bytes of the next response for a
    path ending in ``name``, then drops the connection. Reports POSTed to /reports are kept."""

    def __init__(self, directory: Path) -> None:
        self.cut: dict[str, int] = {}
        self.reports: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(RangeRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Range")))
                super().do_GET()

            def copyfile(self, source: Any, outputfile: Any) -> None:
                for name, limit in list(outer.cut.items()):
                    if self.path.endswith(name):
                        del outer.cut[name]
                        if self.range:
                            source.seek(self.range[0])
                        outputfile.write(source.read(limit))
                        outputfile.flush()
                        self.close_connection = True
                        return
                super().copyfile(source, outputfile)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                outer.reports.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(directory))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @contextmanager
    def running(self) -> Iterator[Server]:
        self.thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


def config(root: Path, repo_url: str, engine: Path, port: int, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "root": root,
        "repo_url": repo_url,
        "device_id": "device-0001",
        "platform": "linux/amd64",
        "engine": str(engine),
        "port": port,
        "ready_timeout_s": 5.0,
        "trial_s": 0.3,
        "poll_s": 0.1,
        "http_timeout_s": 5.0,
    }
    values.update(overrides)
    return AgentConfig(**values)


def reports(root: Path) -> list[dict[str, Any]]:
    path = root / "reports.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_complete(root: Path, sequence: int, port: int, *, pending_ok: bool = False) -> None:
    """The device is on ``sequence``: state, the current link, every staged byte matching the
    signed release document, and the runtime answering ready."""
    state = json.loads((root / "state.json").read_text())
    # A download may be pending (it resumes next cycle); nothing past it may be half done.
    assert state["pending"] is None or (pending_ok and state["pending"]["phase"] == "download")
    assert state["installed"]["sequence"] == sequence
    assert os.readlink(root / "current") == f"releases/{sequence}"
    release = root / "releases" / str(sequence)
    doc = json.loads((release / "release.json").read_text())
    assert doc["sequence"] == sequence
    for entry in doc["files"]:
        assert sha256_file(release / entry["path"]) == entry["target"].rsplit("/", 1)[1]
    with tarfile.open(release / "image.tar") as tar:
        names = tar.getnames()
        assert names == [m["name"] for m in doc["image"]["members"]]
        for member in doc["image"]["members"]:
            handle = tar.extractfile(member["name"])
            assert handle is not None
            assert hashlib.sha256(handle.read()).hexdigest() == member["target"].rsplit("/", 1)[1]
    assert ready(port), f"runtime of release {sequence} not ready on port {port}"
