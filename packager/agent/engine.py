"""The agent's one wrapper around the container engine (docker or podman) on the device, and
its one bounded run of a local program (:func:`capture`: the device facts probe).

This module is the only place in the agent that starts processes.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
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


# capture(): the argv a configuration may name (a program and its arguments, no shell).
MAX_ARGV = 32
MAX_ARG_CHARS = 4096
# capture() keeps at most this much of stderr (for the one-line reason); the rest is dropped.
MAX_STDERR = 4096
# capture()'s longest timeout (a day): beyond it select() overflows, and no probe needs it.
MAX_CAPTURE_S = 86400.0
_CHUNK = 65536


@dataclass(frozen=True)
class Captured:
    """How a :func:`capture` run ended: ``ok`` (exit 0 within the bounds) and its stdout, or
    ONE line saying why not (``timed out after 30 s``, ``exit 2: <its last stderr line>``)."""

    ok: bool
    stdout: bytes
    line: str


def argv_problem(argv: object) -> str | None:
    """None when ``argv`` is a program's command line :func:`capture` may run: a tuple or list
    of 1..MAX_ARGV strings, each 1..MAX_ARG_CHARS printable characters (no NUL, no newline),
    the first an absolute path (no PATH lookup); else why not, in one line."""
    if not isinstance(argv, (tuple, list)) or not argv:
        return "must be a non-empty list of strings (a program and its arguments)"
    if len(argv) > MAX_ARGV:
        return f"has {len(argv)} arguments, at most {MAX_ARGV}"
    for index, arg in enumerate(argv):
        if not isinstance(arg, str) or not 0 < len(arg) <= MAX_ARG_CHARS or not arg.isprintable():
            return (
                f"argument {index} ({str(arg)[:60]!r}) is not 1-{MAX_ARG_CHARS} printable"
                " characters"
            )
    if not os.path.isabs(argv[0]):
        return f"the program {argv[0][:60]!r} must be an absolute path"
    return None


def timeout_problem(timeout_s: object) -> str | None:
    """None when ``timeout_s`` is a number of seconds :func:`capture` can wait (an int or float,
    0 < t <= MAX_CAPTURE_S: not a bool, NaN or infinity, which select() refuses), else why not
    (it comes from the agent's configuration file and command line: untyped JSON, float())."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s <= MAX_CAPTURE_S
    ):
        shown = repr(timeout_s)[:40]  # repr: the string "30" is not the number 30
        return f"is {shown}, not a number of seconds above 0, at most {MAX_CAPTURE_S:g}"
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's process group (its own session): its children too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def capture(argv: object, *, timeout_s: float, max_stdout: int) -> Captured:
    """Run ``argv`` (checked by :func:`argv_problem`; no shell, stdin /dev/null, its own session)
    and return its stdout. Bounded: at most ``timeout_s`` seconds of wall time, and at most
    ``max_stdout`` bytes of stdout (more, and it is killed at once); stderr is read too (at
    most MAX_STDERR kept). Never raises for the program's own failure: a run that cannot start,
    exits non-zero, times out or floods is ``ok=False`` with the reason."""
    problem = argv_problem(argv)
    if problem is not None:
        return Captured(False, b"", problem)
    problem = timeout_problem(timeout_s)
    if problem is not None:
        return Captured(False, b"", f"timeout {problem}")
    assert isinstance(argv, (tuple, list))
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, shell=False, close_fds=True, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        return Captured(False, b"", f"did not start: {exc.strerror or exc}")
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout_s
    failure = ""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map() and not failure:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"timed out after {timeout_s:g} s"
                break
            for key, _ in selector.select(timeout=left):
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer: bytearray = key.data
                if buffer is out:
                    out += chunk
                    if len(out) > max_stdout:
                        failure = f"printed more than {max_stdout} bytes"
                        break
                elif len(err) < MAX_STDERR:
                    err += chunk[: MAX_STDERR - len(err)]
    if not failure:
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout_s:g} s"
    if failure:
        _kill_group(proc)
        try:
            proc.wait(timeout=REAP_S)
        except subprocess.TimeoutExpired:
            log.error("%s: did not exit after SIGKILL", argv[0])
    proc.stdout.close()
    proc.stderr.close()
    if failure:
        return Captured(False, b"", failure)
    if code != 0:
        lines = [_one_line(raw) for raw in bytes(err).splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        ended = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        return Captured(False, b"", f"{ended}: {last}" if last else ended)
    return Captured(True, bytes(out), "")


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
