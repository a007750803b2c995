"""The agent's one wrapper around the container engine (docker or podman) on the device.

This module is the only place in the agent that starts processes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("edgepack.agent")


class EngineError(Exception):
    """The container engine failed; the message names the command."""


class Engine:
    """Loads images and runs the one runtime container per bundle name."""

    def __init__(self, executable: str, run_args: Sequence[str] = (), *, timeout_s: float = 600):
        found = shutil.which(executable)
        if found is None:
            raise EngineError(f"container engine '{executable}' not found on PATH")
        self.executable = found
        self.run_args = tuple(run_args)
        self.timeout_s = timeout_s

    def _run(self, args: Sequence[str], *, check: bool = True) -> str:
        argv = [self.executable, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"{' '.join(argv[:4])}: timed out") from exc
        if check and proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
            raise EngineError(f"{' '.join(argv[:4])} failed (exit {proc.returncode}): {tail}")
        return proc.stdout.decode("utf-8", "replace")

    def load(self, archive: Path) -> None:
        self._run(["load", "-i", str(archive)])

    def stop(self, name: str) -> None:
        # A runtime may ignore SIGTERM: give it 2 s, then the engine kills it.
        self._run(["stop", "-t", "2", name], check=False)
        self._run(["rm", "-f", name], check=False)

    def start(
        self,
        name: str,
        ref: str,
        port: int,
        confinement: Sequence[str],
        container_port: int = 8080,
    ) -> None:
        """Replace whatever runs under ``name`` by a fresh container of ``ref`` (idempotent),
        confined by ``confinement`` (:func:`.confinement.detached_args`: the flags the bundle's
        unit uses plus the restart policy); the device's own ``run_args`` come last."""
        self.stop(name)
        publish = f"{port}:{container_port}"
        argv = ["run", "-d", "--name", name, "-p", publish, *confinement, *self.run_args]
        self._run([*argv, "--", ref])

    def running(self, name: str) -> bool:
        """True while the container runs and has not been restarted by its restart policy (a
        restart means the runtime exited: the agent's trial counts that as a failure)."""
        out = self._run(
            ["inspect", "--format", "{{.State.Running}} {{.RestartCount}}", name], check=False
        )
        fields = out.strip().lower().split()
        restarts = fields[1] if len(fields) > 1 else "0"
        return bool(fields) and fields[0] == "true" and restarts in ("0", "<no")

    def remove_image(self, ref: str) -> None:
        self._run(["rmi", ref], check=False)


def ready(port: int, *, timeout_s: float = 2.0) -> bool:
    """The Open Inference Protocol readiness probe on the runtime's published port."""
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False
