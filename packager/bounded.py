"""Bounded reads of the files edgepack does not trust: target files, bundle documents, keys,
device reports picked up from USB sticks.

One reader, so every such file is refused the same way before it is parsed: a file that cannot be
opened, one that is not a regular file (a FIFO planted under a report's name would otherwise hold
the command forever; a device node's open runs its driver, e.g. a watchdog's or a tape's, on a
stick mounted without ``nodev``: its ``stat`` is checked before any open, and what is opened is
opened with ``O_NONBLOCK`` and checked again with ``fstat``, never read, in case it was swapped
in between), one behind a symbolic link where the caller forbids them (``lstat``, then
``O_NOFOLLOW``), and one larger than the caller's limit (at most ``limit + 1`` bytes are read,
whatever the file's size says, so a file growing after a size check cannot pass either).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from packager.errors import EdgepackError, InputError


def read_bounded(
    path: Path,
    limit: int,
    *,
    error: type[EdgepackError] = InputError,
    shown: str | None = None,
    what: str = "",
    follow_symlinks: bool = True,
) -> bytes:
    """At most ``limit`` bytes (``limit`` >= 0): the whole content of the regular file ``path``.

    ``error`` (with the exit code of its class) carries ONE line starting with ``shown`` (default:
    the path): ``cannot be read: <reason>``, ``is a symbolic link`` (only when
    ``follow_symlinks`` is False), ``not a regular file`` or ``larger than <limit> bytes`` with
    ``: <what>`` after it when given (e.g. "not a target file").
    """
    where = str(path) if shown is None else shown
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except OSError as exc:
        raise error(f"{where}: cannot be read: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(mode):  # lstat: only when follow_symlinks is False
        raise error(f"{where}: is a symbolic link")
    if not stat.S_ISREG(mode):
        raise error(f"{where}: not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise error(f"{where}: is a symbolic link") from exc
        raise error(f"{where}: cannot be read: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{where}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise error(f"{where}: cannot be read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise error(f"{where}: larger than {limit} bytes" + (f": {what}" if what else ""))
    return data
