"""The single place where edgepack starts external programs.

Each external program is described once by a :class:`Tool` that knows how to find it and what to
install when it is missing, so a missing tool is reported as one line with the exact fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packager.errors import ToolFailedError, ToolMissingError


@dataclass(frozen=True)
class Tool:
    """An external program: its executable name and how to install it on Debian."""

    name: str
    executable: str
    apt_package: str
    alternatives: tuple[str, ...] = field(default=())

    def find(self) -> str | None:
        for candidate in (self.executable, *self.alternatives):
            found = shutil.which(candidate)
            if found:
                return found
        return None

    def available(self) -> bool:
        return self.find() is not None

    def require(self) -> str:
        found = self.find()
        if found is None:
            raise ToolMissingError(
                f"{self.name}: '{self.executable}' not found on PATH",
                hint=f"install it with: apt-get install {self.apt_package}",
            )
        return found

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        input_bytes: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        capture: bool = True,
        inherit_env: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the tool; raise ToolFailedError with the tail of its stderr when it fails, or when
        it runs past ``timeout`` seconds. ``env`` is added to this process's environment, or with
        ``inherit_env=False`` is the whole of it."""
        exe = self.require()
        argv = [exe, *(os.fspath(a) for a in args)]
        try:
            proc = subprocess.run(
                argv,
                cwd=cwd,
                env=_environment(env, inherit_env),
                input=input_bytes,
                timeout=timeout,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ToolFailedError(
                f"{self.name} timed out after {timeout:.0f}s: {' '.join(argv[:6])}"
            ) from exc
        if check and proc.returncode != 0:
            raise ToolFailedError(
                f"{self.name} failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}"
            )
        return proc

    def stream(
        self,
        args: Sequence[str | os.PathLike[str]],
        on_line: Callable[[str], None],
        *,
        cwd: Path | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the tool, calling ``on_line`` with each stdout line as it comes (for progress).

        stderr is collected for the caller's error message; the return code is not checked.
        """
        exe = self.require()
        argv = [exe, *(os.fspath(a) for a in args)]
        with (
            tempfile.TemporaryFile() as errors,
            subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=errors) as proc,
        ):
            assert proc.stdout is not None
            deadline = None if timeout is None else time.monotonic() + timeout
            for raw in proc.stdout:
                on_line(raw.decode("utf-8", "replace").rstrip("\n"))
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise ToolFailedError(f"{self.name} timed out after {timeout:.0f}s")
            proc.wait()
            errors.seek(0)
            return subprocess.CompletedProcess(argv, proc.returncode, b"", errors.read())

    def popen(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        stdin: int | None = None,
        new_session: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process (a server, a container in the foreground)."""
        exe = self.require()
        return subprocess.Popen(
            [exe, *(os.fspath(a) for a in args)],
            env=_environment(env, inherit=True),
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            start_new_session=new_session,
        )


def _environment(env: Mapping[str, str] | None, inherit: bool) -> dict[str, str] | None:
    """The child's environment: None (this process's own) without ``env``; else ``env`` added to
    this process's environment, or alone when not ``inherit``."""
    if env is None:
        return None
    return {**os.environ, **env} if inherit else dict(env)


def _tail(data: bytes | None, limit: int = 400) -> str:
    if not data:
        return "(no output)"
    text = data.decode("utf-8", "replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-3:])
    return tail[-limit:]
