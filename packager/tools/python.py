"""CPython interpreters on the build host, used to write an image's ``.pyc`` files.

CPython's bytecode compiler changes between patch releases (3.11.2 and 3.11.7 compile numpy's
``pad()`` differently; measured in issue 13), so ``.pyc`` files are byte-identical across build
hosts only when every host compiles with the *same release* the image ships. This module finds
such an interpreter among the host's (the building one, ``pythonX.Y`` on PATH, ``/usr/bin``'s)
and runs ``compileall`` in it with a fixed hash seed: set and frozenset constants are marshalled
in iteration order, which string hash randomisation would otherwise change from run to run.
"""

from __future__ import annotations

import os
import shutil
import sys
from functools import cache
from pathlib import Path

from packager.errors import ToolFailedError
from packager.tools.base import Tool

_PROBE = "import sys; print(sys.implementation.name, sys.version.split()[0])"
# compileall over a site-packages of a few thousand modules takes seconds; far above that is a hang.
_COMPILE_TIMEOUT_S = 600.0
_PROBE_TIMEOUT_S = 30.0


def _candidates(minor: str) -> tuple[str, ...]:
    found = [sys.executable, shutil.which(f"python{minor}"), f"/usr/bin/python{minor}"]
    unique: list[str] = []
    for path in found:
        if path and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in unique:
                unique.append(real)
    return tuple(unique)


@cache
def release_of(interpreter: str) -> str | None:
    """``"3.11.2"`` for a CPython executable, None for anything else (or one that fails)."""
    try:
        proc = Tool("python", interpreter, "python3").run(["-c", _PROBE], timeout=_PROBE_TIMEOUT_S)
    except ToolFailedError:
        return None
    implementation, _, release = proc.stdout.decode("ascii", "replace").strip().partition(" ")
    return release if implementation == "cpython" else None


def interpreter_for(release: str) -> str | None:
    """A host CPython whose release is exactly ``release`` ("3.11.2"), or None."""
    minor = ".".join(release.split(".")[:2])
    for path in _candidates(minor):
        if release_of(path) == release:
            return path
    return None


def compile_tree(interpreter: str, root: Path, ddir: str) -> None:
    """Write unchecked-hash ``.pyc`` for every module below ``root`` with ``interpreter``,
    recording ``ddir`` (the directory as the image sees it) as the source path.

    ToolFailedError when compileall cannot run or runs past its bound. A module that does not
    compile (wheels ship the odd Python-2 test file) is left without ``.pyc``, as before."""
    proc = Tool("python", interpreter, "python3").run(
        ["-m", "compileall", "-q", "-q", "-j", "1", "-d", ddir,
         "--invalidation-mode", "unchecked-hash", str(root)],
        env={"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "SOURCE_DATE_EPOCH": "0"},
        timeout=_COMPILE_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    if proc.returncode not in (0, 1):  # 1: some module did not compile
        raise ToolFailedError(f"compileall ({interpreter}) failed with exit {proc.returncode}")
