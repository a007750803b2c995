"""Start the on-device runtime as a real process on loopback and wait until it is ready.

Reuse from any test module::

    from tests.integration.runtime_helpers import TESTDATA, runtime_factory  # noqa: F401

    def test_x(runtime_factory):
        rt = runtime_factory(TESTDATA / "onnx" / "mnist.onnx", model_name="mnist")
        client = tritonclient.http.InferenceServerClient(rt.address)

or call :func:`start_runtime` directly (then call ``rt.stop()`` yourself). The runtime listens on a
kernel-chosen port (``port: 0``), which it reports in its "listening" log event; its stderr goes to
``rt.log_path`` so that a test can read the structured events.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"
RUNTIME_SOURCE = REPO_ROOT / "packager" / "runtime"


@dataclass
class RuntimeProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config_path: Path
    model_name: str
    _log: Any = field(repr=False, default=None)

    @property
    def address(self) -> str:
        """host:port, the form tritonclient.http.InferenceServerClient takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (kills the process if it does not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode


def write_config(directory: Path, model_path: Path, model_name: str, **values: Any) -> Path:
    config = {
        "model_name": model_name,
        "model_path": str(model_path),
        "host": "127.0.0.1",
        "port": 0,
        **values,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "runtime.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def install_as_edgepack_runtime(destination: Path) -> Path:
    """Copy packager/runtime as the top-level package ``edgepack_runtime``, as images do."""
    package = destination / "edgepack_runtime"
    shutil.copytree(RUNTIME_SOURCE, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return destination


def launch(
    config_path: Path,
    log_path: Path,
    *,
    module: str = "packager.runtime.server",
    pythonpath: Path | None = None,
    env_extra: dict[str, str] | None = None,
    nofile: int | None = None,
) -> tuple[subprocess.Popen[bytes], Any]:
    """Start the runtime; ``nofile`` sets its descriptor limit (RLIMIT_NOFILE), as systemd's
    LimitNOFILE= or docker's --ulimit would."""
    env = {**os.environ, **(env_extra or {})}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=pythonpath or REPO_ROOT,
        env=env,
        preexec_fn=limit_descriptors if nofile is not None else None,
    )
    return process, log


def wait_ready(process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 60.0) -> int:
    """Wait for the "ready" event; returns the listening port. Raises with the log on failure."""
    deadline = time.monotonic() + timeout_s
    port: int | None = None
    while time.monotonic() < deadline:
        for line in log_path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("event") == "listening":
                port = int(entry["port"])
            elif entry.get("event") == "ready" and port is not None:
                return port
        if process.poll() is not None:
            raise RuntimeError(
                f"runtime exited with {process.returncode}: {log_path.read_text(encoding='utf-8')}"
            )
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"runtime not ready in {timeout_s}s: {log_path.read_text(encoding='utf-8')}")


def start_runtime(
    workdir: Path,
    model_path: Path,
    model_name: str = "model",
    *,
    module: str = "packager.runtime.server",
    pythonpath: Path | None = None,
    env_extra: dict[str, str] | None = None,
    nofile: int | None = None,
    **config: Any,
) -> RuntimeProcess:
    """Write a config into ``workdir``, start the runtime and wait until it is ready."""
    config_path = write_config(workdir, model_path, model_name, **config)
    log_path = workdir / "runtime.log"
    process, log = launch(
        config_path,
        log_path,
        module=module,
        pythonpath=pythonpath,
        env_extra=env_extra,
        nofile=nofile,
    )
    try:
        port = wait_ready(process, log_path)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        raise
    return RuntimeProcess(process, port, log_path, config_path, model_name, log)


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Iterator[Callable[..., RuntimeProcess]]:
    """A function that starts runtimes (each in its own directory); all are stopped afterwards."""
    started: list[RuntimeProcess] = []

    def factory(model_path: Path, model_name: str = "model", **config: Any) -> RuntimeProcess:
        runtime = start_runtime(
            tmp_path / f"runtime{len(started)}", model_path, model_name, **config
        )
        started.append(runtime)
        return runtime

    yield factory
    for runtime in started:
        runtime.stop()


# (name, ONNX element type, shape with None for a dynamic dimension, Open Inference datatype)
IDENTITY_TENSORS: tuple[tuple[str, int, tuple[int | None, ...], str], ...] = (
    ("half", 10, (None, 3), "FP16"),  # TensorProto.FLOAT16
    ("small", 3, (None, 3), "INT8"),  # TensorProto.INT8
    ("pixels", 2, (2, 2), "UINT8"),  # TensorProto.UINT8
    ("flags", 9, (None,), "BOOL"),  # TensorProto.BOOL
    ("ids", 7, (None, 2), "INT64"),  # TensorProto.INT64
    ("wide", 11, (None,), "FP64"),  # TensorProto.DOUBLE
)


def identity_model(path: Path) -> Path:
    """An ONNX model passing one tensor of each of several dtypes through Identity nodes."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, *_ in IDENTITY_TENSORS]
    inputs = [helper.make_tensor_value_info(n, t, list(s)) for n, t, s, _ in IDENTITY_TENSORS]
    outputs = [
        helper.make_tensor_value_info(f"{n}_out", t, list(s)) for n, t, s, _ in IDENTITY_TENSORS
    ]
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path


def scrape(runtime: RuntimeProcess) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value} (labels as the runtime writes them)."""
    import urllib.request

    with urllib.request.urlopen(f"{runtime.url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
