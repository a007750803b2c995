"""Staged writes: every output is written beside its destination and renamed into place.

The one home of edgepack's atomic file writes and directory replacements (a reader sees the old
whole or the new whole, never half of either), and of the staging directories outputs are built
in.

A directory output (a bundle, an optimized model directory, an OTA repository) is written into
``.{OUT}.{PID}.{RANDOM}`` next to ``OUT`` and moved into place by :func:`replace_dir` when
complete. A process killed with SIGKILL (or a power cut) never runs its cleanup, so the next run
for the same ``OUT`` removes every staging directory of that ``OUT`` whose owner process no
longer exists (``os.kill(pid, 0)`` -> ProcessLookupError). A live owner's directory is kept: two
builds may run at once.

A file is written to a temporary file in the same directory, flushed to disk (``fsync``) and
renamed over the destination (``os.replace``, atomic within one file system, POSIX rename(2)).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    """The staging directories of ``out`` (real directories, not symlinks) whose owner is dead:
    ``.{OUT}.{PID}.{RANDOM}`` (:func:`make_staging_dir`) and ``.{OUT}.old-{PID}`` (an old ``out``
    that :func:`replace_dir` had moved aside when its process was killed)."""
    pid = "([0-9]{1,10})"
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:{pid}\.{_RANDOM}|old-{pid})")
    stale: list[Path] = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return stale
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if not _pid_alive(int(match.group(1) or match.group(2))):
            stale.append(entry)
    return stale


def make_staging_dir(out: Path) -> Path:
    """A new empty directory beside ``out`` (mode 0700) for building it; stale ones first go.

    ``out.parent`` must exist. The caller removes the directory (or moves it to ``out`` with
    :func:`replace_dir`).
    """
    for stale in stale_staging_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(staging: Path, out: Path) -> None:
    """Move the finished directory ``staging`` to ``out`` (same file system), replacing whatever
    ``out`` is (a directory, a file or a symlink) whole.

    The old ``out`` is first renamed aside to ``.{OUT}.old-{PID}`` and removed after the new one
    is in place, so ``out`` is never half old, half new; the parent directory is synced.
    """
    if not out.exists() and not out.is_symlink():
        staging.rename(out)
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        _remove(old)
        out.rename(old)
        staging.rename(out)
        _remove(old)
    fsync_dir(out.parent)


@contextmanager
def staged_dir(out: Path, *, mode: int = 0o755) -> Iterator[Path]:
    """A staging directory (``mode``) beside ``out``; moved to ``out`` by :func:`replace_dir` when
    the block ends normally, removed when it raises. Creates ``out``'s parents."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out)
    try:
        staging.chmod(mode)  # mkdtemp creates 0700; the result is an ordinary directory
        yield staging
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller (or a tool) to write; when the block ends
    normally it gets ``mode``, is synced to disk and renamed over ``path``; when it raises it is
    removed and ``path`` is untouched. Creates ``path``'s parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`staged_file`)."""
    with staged_file(path, mode=mode) as tmp:
        tmp.write_bytes(data)
