"""Fixtures for tests that drive the real tools: the CLI as a process, podman, qemu."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from packager.tools.qemu import ensure_binfmt
from tests.integration.dockerd import dockerd, loopback_registry  # noqa: F401  (issue 13)
from tests.ports import free_port, free_port_in  # noqa: F401  (imported from here by tests)
from tests.process_guard import suite_container

REPO = Path(__file__).resolve().parents[2]


def edgepack(
    *args: str, check: bool = True, timeout: float = 1200, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a fresh process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "packager", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"edgepack {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def build_json(*args: str) -> dict[str, Any]:
    proc = edgepack("build", *args, "--json")
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


def build_mnist(
    onnx_dir: Path, out: Path, targets: Iterable[str], cache: Path
) -> dict[str, dict[str, Any]]:
    """The mnist bundle (version 1.0.0) for each target, built into ``out/TARGET`` with the
    session's cache: {target: the ``build --json`` document}."""
    built = {}
    for target in targets:
        built[target] = build_json(
            str(onnx_dir / "mnist.onnx"), "--target", target, "--out", str(out / target),
            "--version", "1.0.0", "--cache-dir", str(cache),
        )  # fmt: skip
    return built


@pytest.fixture(scope="session")
def edgepack_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One download/layer cache for the whole session (CI starts it empty)."""
    override = os.environ.get("EDGEPACK_TEST_CACHE")
    if override:
        return Path(override)
    return tmp_path_factory.mktemp("edgepack-cache")


@pytest.fixture(scope="session")
def arm64_emulation() -> None:
    """qemu-user through binfmt_misc, registered here when missing (needs root)."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make setup`")
    ensure_binfmt("arm64")


@pytest.fixture
def cleanup_containers() -> Iterator[list[str]]:
    """Container names a test may leave behind (its runtime killed, say): removed after it, on
    failure too. Suite containers are named ``edgepack-...`` (tests/process_guard.py checks)."""
    names: list[str] = []
    yield names
    for name in names:
        suite_container(name)  # should the removal fail, the session guard names it
        subprocess.run(["podman", "rm", "-f", "-t", "1", name], capture_output=True, timeout=120)


def run_install_sh(
    bundle: Path, *, extra_env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """The bundle's own install.sh with podman and no systemd (this host has none running);
    the engine flags this sandbox needs go through EDGEPACK_ENGINE_ARGS, as a user would."""
    from packager.tools.containers import find_engine

    # The container install.sh starts: the session guard fails the suite if it outlives it.
    suite_container(f"edgepack-{json.loads((bundle / 'manifest.json').read_text())['name']}")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "EDGEPACK_ENGINE_ARGS": " ".join(find_engine("podman").run_flags),
        **(extra_env or {}),
    }
    return subprocess.run(
        [
            "sh",
            str(bundle / "install.sh"),
            "--engine",
            "podman",
            "--no-systemd",
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def litert_int8_outputs(tflite: Path, x: Any) -> Any:
    """Run a fully int8 .tflite in the desktop LiteRT interpreter on float rows of ``x``,
    quantizing inputs and dequantizing outputs with the model's own parameters."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    (scale, zero), (o_scale, o_zero) = inp["quantization"], out["quantization"]
    rows = []
    for sample in x:
        q = np.clip(np.round(sample / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q.reshape(inp["shape"]))
        interpreter.invoke()
        rows.append((interpreter.get_tensor(out["index"]).astype(np.float32) - o_zero) * o_scale)
    return np.concatenate(rows)
