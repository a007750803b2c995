"""SHA-256 of files and streams, read in chunks: the one implementation the host side shares."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    """``(hex digest, size)`` of everything left in ``stream``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_path(path: Path) -> tuple[str, int]:
    """``(hex digest, size in bytes)`` of a file, read in :data:`CHUNK` (1 MiB) pieces; OSError
    when it cannot be read."""
    with path.open("rb") as handle:
        return sha256_stream(handle)


def sha256_file(path: Path) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of a file, read in chunks: the form OCI descriptors and
    model digests take."""
    hexdigest, size = sha256_path(path)
    return "sha256:" + hexdigest, size
