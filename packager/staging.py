"""Staging directories beside an output, named for their owner so a killed build's are reclaimed.

An output (a bundle, an optimized model directory) is written into ``.{OUT}.{PID}.{RANDOM}`` next
to ``OUT`` and renamed into place when complete. A process killed with SIGKILL (or a power cut)
never runs its cleanup, so the next run for the same ``OUT`` removes every staging directory of
that ``OUT`` whose owner process no longer exists (``os.kill(pid, 0)`` -> ProcessLookupError). A
live owner's directory is kept: two builds may run at once.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

# tempfile.mkdtemp's random part: 8 characters of [a-z0-9_] (tempfile._RandomNameSequence).
_RANDOM = r"[a-z0-9_]{8}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never ours to judge: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OverflowError:
        return False
    return True


def stale_staging_dirs(out: Path) -> list[Path]:
    """The staging directories of ``out`` (real directories, not symlinks) whose owner is dead."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.([0-9]{{1,10}})\.{_RANDOM}")
    stale: list[Path] = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return stale
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if not _pid_alive(int(match.group(1))):
            stale.append(entry)
    return stale


def make_staging_dir(out: Path) -> Path:
    """A new empty directory beside ``out`` (mode 0700) for building it; stale ones first go.

    ``out.parent`` must exist. The caller removes the directory (or renames it to ``out``).
    """
    for stale in stale_staging_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
