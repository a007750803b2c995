"""Shared pieces of the agent tests: a fake engine on disk, a loopback repository server with
Range support (rangehttpserver) that can cut a response short, a device (its root, port, engine
and repository) with the agent run on it in-process or through its CLI, and the 'device is on a
complete, verified version' check."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from RangeHTTPServer import RangeRequestHandler

from packager.agent.agent import Agent, AgentConfig, CycleResult
from packager.agent.engine import ready
from packager.agent.store import sha256_file
from packager.ota.bundle import ReleasePlan
from packager.ota.repo import Repository
from tests.ports import free_port, free_port_in  # noqa: F401  (free_port: the agent tests')
from tests.unit.ota.synth import make_bundle

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL_BYTES = 256 * 1024


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


@contextmanager
def static_mirror(directory: Path, ports: range) -> Iterator[str]:
    """``directory`` over plain HTTP on the first free loopback port of ``ports`` (a test
    module's own range): a mirror of static files only, no Range, no reports; its base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    # SO_REUSEADDR as the server binds: ports left in TIME_WAIT by earlier tests count as free.
    port = free_port_in(ports, reuse=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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


def bundle(
    tmp: Path, version: str, *, seed: int, ready: str = "yes", confinement: bytes | None = None
) -> Path:
    """A synthetic bundle whose model layer is ``seed``'s random bytes and whose base layer is
    the same in every version (so an update moves only the model layer)."""
    return make_bundle(
        tmp / f"bundle-{version}",
        version=version,
        model=random.Random(seed).randbytes(MODEL_BYTES),
        base=random.Random(0).randbytes(128 * 1024),
        ready=ready,
        confinement=confinement,
    ).path


def largest_blob(repo: Repository, plan: ReleasePlan) -> Path:
    """The published file of the release's largest object (the model layer)."""
    return repo.targets_dir / max(plan.objects, key=lambda o: o.size).target


def flip_middle_byte(path: Path) -> None:
    """Flip one bit in the middle of ``path``: a mirror's corruption; flipping again repairs it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@dataclass(frozen=True)
class Device:
    """A device initialised to trust ``repo``'s root, its runtime port, and the fake engine.
    Bundles it publishes carry ``confinement`` (None: make_bundle's default)."""

    tmp: Path
    repo: Repository
    engine: Path
    root: Path
    port: int
    confinement: bytes | None = None

    @property
    def usb_uri(self) -> str:
        """The repository as a directory (a USB stick or a mounted mirror)."""
        return (self.repo.path / "repository").as_uri()

    def bundle(self, version: str, *, seed: int, ready: str = "yes") -> Path:
        return bundle(self.tmp, version, seed=seed, ready=ready, confinement=self.confinement)

    def config(self, repo_url: str | None = None, **overrides: Any) -> AgentConfig:
        return config(self.root, repo_url or self.usb_uri, self.engine, self.port, **overrides)

    def run_once(self, repo_url: str | None = None, **overrides: Any) -> CycleResult:
        """One agent cycle in this process against ``repo_url`` (default: the USB directory)."""
        return Agent(self.config(repo_url, **overrides)).run_once()

    def install_v1(self) -> None:
        self.repo.publish(self.bundle("1.0.0", seed=1))
        assert self.run_once().outcome == "committed"

    def assert_on(self, sequence: int, *, pending_ok: bool = False) -> None:
        assert_complete(self.root, sequence, self.port, pending_ok=pending_ok)

    def export_usb(self) -> Path:
        """The repository exported onto a fresh 'USB stick' directory, valid for 30 days."""
        stick = self.tmp / "usb"
        stick.mkdir()
        self.repo.export(stick, timestamp_expiry=timedelta(days=30))
        return stick

    def cli_argv(self, *source: str, device_id: str = "device-0001", extra: tuple[str, ...] = ()
                 ) -> list[str]:
        """``python -m packager.agent run ... --once`` for this device; ``source`` is
        ``--repo URL`` or ``--usb DIR``."""
        return [
            sys.executable, "-m", "packager.agent", "run", "--root", str(self.root), *source,
            "--device-id", device_id, "--platform", "linux/amd64", "--engine", str(self.engine),
            "--port", str(self.port), "--trial", "0.2", "--poll", "0.1", *extra, "--once",
        ]  # fmt: skip

    def run_cli(
        self, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The agent's CLI as a separate process, as the device's service manager runs it."""
        return subprocess.run(
            argv, cwd=REPO_ROOT, env=None if env is None else {**os.environ, **env},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
