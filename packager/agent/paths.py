"""The one path policy for every file named inside a bundle, a release or a layer.

Used by the build (the file list the manifest records), ``edgepack verify``, ``edgepack ota
publish`` and the device agent (which refuses a bad release even when it is validly signed), so
a name that one of them would refuse is refused by all of them. Standard library only: the agent
runs on devices without the rest of edgepack, and the host side imports this module.

The rule, after tar/umoci/python-tuf (which map a target to one file inside their own directory):

* a path is relative, in POSIX form, already normalised: components separated by single ``/``,
  none empty, ``.`` or ``..``, each matching :data:`PART` in full (letters, digits, ``._+@=,~-``;
  no spaces, control characters or backslashes), at most :data:`MAX_DEPTH` deep and
  :data:`MAX_PATH` bytes long;
* resolved under its root, no component is a symbolic link and the result stays inside the root;
* a file mode is 0644 or 0755 (what releases record and devices write): never setuid, setgid,
  sticky or world-writable (what ``verify`` refuses in a bundle on disk);
* files an attacker could have planted a link at are opened with ``O_NOFOLLOW`` (and created
  with ``O_EXCL``), walking from a trusted directory one component at a time (``openat``).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

PART = re.compile(r"[A-Za-z0-9._+@=,~-]{1,255}")
MAX_DEPTH = 32
MAX_PATH = 1024
FILE_MODE = 0o644
EXEC_MODE = 0o755
ALLOWED_MODES = (FILE_MODE, EXEC_MODE)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathError(ValueError):
    """A path or mode the policy refuses; the message names the path and why."""


def check_relpath(path: object) -> str:
    """``path`` unchanged when the policy allows it; raises :class:`PathError` naming it."""
    if not isinstance(path, str):
        raise PathError(f"{path!r}: a path must be a string")
    shown = repr(path)
    if not path:
        raise PathError("'': empty path")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise PathError(f"{shown[:60]}...: longer than {MAX_PATH} bytes")
    if path.startswith("/"):
        raise PathError(f"{shown}: absolute path (paths are relative to the bundle)")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise PathError(f"{shown}: deeper than {MAX_DEPTH} directories")
    for part in parts:
        if part in ("", ".", ".."):
            raise PathError(f"{shown}: empty, '.' or '..' component (use a normalised path)")
        if not PART.fullmatch(part):
            raise PathError(
                f"{shown}: component {part!r} may use only letters, digits and ._+@=,~-"
            )
    return path


def check_mode(mode: object) -> int:
    """``mode`` when it is 0644 or 0755; raises :class:`PathError` otherwise."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in ALLOWED_MODES:
        shown = f"{mode:04o}" if isinstance(mode, int) else repr(mode)
        raise PathError(
            f"mode {shown}: only 0644 and 0755 are allowed (no setuid, setgid, sticky or"
            " group/world-writable bits)"
        )
    return mode


def mask_mode(mode: int) -> int:
    """0755 when any execute bit is set, else 0644 (what a release records for a file)."""
    return EXEC_MODE if mode & 0o111 else FILE_MODE


def bad_mode_bits(mode: int) -> bool:
    """True for setuid, setgid, sticky or world-writable bits: what a bundle on disk may not
    have (group-writable is a umask-002 host's normal; releases record masked modes anyway)."""
    return bool(mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH))


def check_inside(root: Path, path: str) -> Path:
    """``root / path`` after :func:`check_relpath`, refusing a symlinked component (checked with
    lstat from ``root`` down) and a result outside ``root``. Missing components are allowed (the
    caller reports a missing file); what exists must be real directories, then the leaf."""
    check_relpath(path)
    current = root
    for part in path.split("/"):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(info.st_mode):
            raise PathError(
                f"{path!r}: {current.relative_to(root).as_posix()!r} is a symbolic link"
            )
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise PathError(f"{path!r}: resolves outside {root}")
    return root / path


def tree_problems(root: Path) -> list[str]:
    """Every entry under ``root`` the policy refuses (symlinks, special files, bad names or
    modes), one line each naming the path; the walk never follows a link."""
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted([*dirnames, *filenames]):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            info = os.lstat(full)
            try:
                check_relpath(rel)
            except PathError as exc:
                problems.append(str(exc))
                continue
            if stat.S_ISLNK(info.st_mode):
                problems.append(f"{rel!r}: is a symbolic link (bundles hold regular files only)")
            elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                problems.append(f"{rel!r}: not a regular file or directory")
            elif stat.S_ISREG(info.st_mode) and bad_mode_bits(info.st_mode):
                problems.append(
                    f"{rel!r}: mode {stat.S_IMODE(info.st_mode):04o} has setuid, setgid,"
                    " sticky or world-writable bits (use 0644 or 0755)"
                )
        dirnames.sort()
    return problems


def _open_dir(root: Path, parts: list[str], *, create: bool) -> int:
    """A descriptor of ``root/parts...``, refusing a symlinked component below ``root``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise PathError(f"{part!r} under {root}: not a plain directory ({exc})") from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_leaf(root: Path, path: str, flags: int, mode: int, refusal: str) -> int:
    """``os.open`` of ``path``'s last component relative to its directory (opened, created as
    needed, without following a link by :func:`_open_dir`); PathError naming ``refusal`` when
    the open fails (an existing entry under O_EXCL, a link under O_NOFOLLOW, ...)."""
    *dirs, leaf = path.split("/")
    dir_fd = _open_dir(root, dirs, create=True)
    try:
        return os.open(leaf, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        raise PathError(f"{path!r} under {root}: {refusal} ({exc.strerror})") from exc
    finally:
        os.close(dir_fd)


def create_file(root: Path, path: str, mode: int) -> int:
    """A new file ``root/path`` opened for writing with ``O_CREAT|O_EXCL|O_NOFOLLOW``: its
    directories are created as needed without following a link, an existing entry (file or
    planted link) is refused. ``mode`` must pass :func:`check_mode`; it is set with fchmod, so
    the umask cannot widen or narrow it. Returns the descriptor (the caller closes it)."""
    check_relpath(path)
    check_mode(mode)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = _open_leaf(root, path, flags, mode, "already exists")
    os.fchmod(fd, mode)
    return fd


def open_append(root: Path, path: str) -> int:
    """``root/path`` opened for appending (created 0644 when missing), refusing a symlink at any
    component below ``root``, a hard-linked file and anything but a regular file (a FIFO would
    block: the open does not wait for a reader). Returns the descriptor."""
    check_relpath(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = _open_leaf(root, path, flags, FILE_MODE, "not a plain file")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise PathError(f"{path!r} under {root}: not a regular file with a single link")
    return fd


# --- members of an image layer ---------------------------------------------------------------

# Linux's PATH_MAX: a layer member name longer than this cannot be created by any extractor.
MAX_MEMBER_PATH = 4096
# The member kinds :class:`LayerWalk` takes; anything else (character/block devices, FIFOs,
# sockets) is refused: edgepack's own Debian layers hold none (debootstrap's /dev is created by
# the container engine at run time, not shipped), so a base image needs none either.
MEMBER_KINDS = ("file", "dir", "symlink", "hardlink")
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


def normalize_member(name: str) -> str:
    """A layer member's name as an extractor writes it: leading ``./`` dropped (as tar does),
    trailing ``/`` dropped; ``''`` for the root directory itself. Raises :class:`PathError`
    for an absolute name, a ``..``, ``.`` or empty component, a NUL or a name past
    :data:`MAX_MEMBER_PATH` bytes: what could land outside the root filesystem."""
    shown = repr(name)[:80]
    if "\x00" in name:
        raise PathError(f"{shown}: NUL in a member name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_MEMBER_PATH:
        raise PathError(f"{shown}...: longer than {MAX_MEMBER_PATH} bytes")
    if name.startswith("/"):
        raise PathError(f"{shown}: absolute member name (layer members are relative to /)")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name in ("", "."):
        return ""
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise PathError(f"{shown}: empty, '.' or '..' component in a member name")
    return name


class LayerWalk:
    """The path policy over an image's layers, lowest layer first, one member at a time.

    Refused (PathError naming the member): what :func:`normalize_member` refuses; a member below
    a symbolic link created earlier in the same layer or left by a lower layer this walk saw
    (an extractor would write through the link, anywhere on the host); a hard link whose target
    is refused by the same rules; a device node, FIFO or socket. Whiteouts (``.wh.NAME``,
    ``.wh..wh..opq``, OCI image-spec layer.md) remove lower layers' links, as the engine does.
    """

    def __init__(self) -> None:
        self._lower: set[str] = set()
        self._current: set[str] = set()

    def next_layer(self) -> None:
        """Start the next layer: the links of the one before become lower-layer links."""
        self._lower |= self._current
        self._current = set()

    def _below_link(self, name: str) -> str | None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._current or prefix in self._lower:
                return prefix
        return None

    def _drop_lower(self, prefix: str, *, itself: bool) -> None:
        below = prefix + "/" if prefix else ""
        self._lower = {
            p for p in self._lower if not (p.startswith(below) or (itself and p == prefix))
        }

    def check(self, name: str, kind: str, linkname: str = "") -> str:
        """The normalised name of one member of ``kind`` (one of :data:`MEMBER_KINDS`, or the
        name of another kind, refused); ``linkname`` is a hard link's target."""
        rel = normalize_member(name)
        if kind not in MEMBER_KINDS:
            raise PathError(f"{rel!r}: {kind} members are refused (no device nodes in a layer)")
        link = self._below_link(rel) if rel else None
        if link is not None:
            raise PathError(f"{rel!r}: below {link!r}, a symbolic link")
        if kind == "hardlink":
            try:
                target = normalize_member(linkname)
            except PathError as exc:
                raise PathError(f"{rel!r}: hard link to {exc}") from exc
            if not target or self._below_link(target) is not None or target in self._current:
                raise PathError(f"{rel!r}: hard link to {linkname!r}, outside the layer's files")
        leaf = rel.rsplit("/", 1)[-1]
        parent = rel.rpartition("/")[0]
        if leaf == _OPAQUE:
            self._drop_lower(parent, itself=False)
        elif leaf.startswith(_WHITEOUT):
            self._drop_lower((parent + "/" if parent else "") + leaf[len(_WHITEOUT):],
                             itself=True)
        elif kind == "symlink":
            self._current.add(rel)
        elif rel in self._lower:
            self._lower.discard(rel)  # a real entry over a lower layer's link replaces it
        return rel
