"""The agent's one wrapper around the container engine (docker or podman) on the device.

This module is the only place in the agent that starts processes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgepack.agent")
# A prepare container's output: each line is read at most MAX_LINE bytes at a time and logged
# cut to LOG_LINE characters; after MAX_LOGGED lines the rest is read and dropped (an engine
# build relays trtexec, which can flood with --verbose). Bounded memory whatever it prints.
MAX_LINE = 4096
LOG_LINE = 300
MAX_LOGGED = 400
# Seconds to wait for the engine's client after it is killed, and for the output reader.
REAP_S = 10.0


@dataclass(frozen=True)
class RunOutcome:
    """How a foreground container ended: ``ok``, and one line saying why not (or its last line)."""

    ok: bool
    line: str


def _one_line(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()[:LOG_LINE]


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

    def run_foreground(self, name: str, args: Sequence[str], timeout_s: float) -> RunOutcome:
        """Run ``args`` (a ``run --rm --name NAME ...`` command line: :func:`.confinement.
        prepare_argv`) to its end, at most ``timeout_s`` seconds, logging its output (bounded).
        A container of that name left by an earlier, interrupted run is removed first; on
        timeout the client is killed and the container removed by name (a docker client's death
        does not stop its container). Never raises for the container's own failure."""
        self._run(["rm", "-f", name], check=False)
        argv = [self.executable, *args]
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            return RunOutcome(False, f"{argv[0]} did not start: {exc}")
        last = [""]

        def pump() -> None:
            assert proc.stdout is not None
            logged = 0
            while True:
                raw = proc.stdout.readline(MAX_LINE)
                if not raw:
                    return
                line = _one_line(raw)
                if not line:
                    continue
                last[0] = line
                if logged < MAX_LOGGED:
                    log.info("%s: %s", name, line)
                    logged += 1
                    if logged == MAX_LOGGED:
                        log.info("%s: (further output not logged)", name)

        reader = threading.Thread(target=pump, name=f"{name}-output", daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            self._run(["rm", "-f", name], check=False)
            try:
                proc.wait(timeout=REAP_S)
            except subprocess.TimeoutExpired:
                log.error("%s: the engine's client did not exit after SIGKILL", name)
            reader.join(timeout=REAP_S)
            return RunOutcome(False, f"timed out after {timeout_s:.0f} s and was removed")
        reader.join(timeout=REAP_S)
        if code != 0:
            return RunOutcome(False, f"exit {code}: {last[0]}" if last[0] else f"exit {code}")
        return RunOutcome(True, last[0])

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
