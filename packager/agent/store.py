"""Durable files on the device: atomic JSON writes, directory fsync, the blob store, the image tar.

Every write that must survive a power cut is write-to-temp, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via ``.<name>.tmp``: write, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, document: Any) -> None:
    """:func:`write_atomic` of ``document`` as JSON (indent 2, sorted keys, trailing newline)."""
    write_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """The UTF-8 JSON document at ``path``; OSError or json.JSONDecodeError as raised."""
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    """The file's SHA-256 as 64 lowercase hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def symlink_atomic(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` with one rename(2): readers see old or new, never none."""
    tmp = link.with_name(f".{link.name}.new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def write_tar(out: Path, members: Iterable[tuple[str, Path]]) -> None:
    """A plain (uncompressed) tar of ``(name, file)`` pairs with fixed metadata, fsync'd."""
    with out.open("wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, source in members:
                info = tarfile.TarInfo(name)
                info.size = source.stat().st_size
                info.mode = 0o644
                info.mtime = 0
                with source.open("rb") as handle:
                    tar.addfile(info, handle)
        raw.flush()
        os.fsync(raw.fileno())
