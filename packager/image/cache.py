"""The content cache shared by builds: blobs by sha256, small JSON records by key.

Layout under the cache directory::

    blobs/sha256/<hex>      layer blobs (gzip or zstd), debs and wheels, named by their content
    records/<kind>/<key>.json  locks and "this input gave that blob" records
    tmp/                    staging for writes, renamed into place when complete

Everything is written to ``tmp/`` first and renamed, so a killed build never leaves a blob whose
name does not match its bytes, and two builds may share one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from packager.errors import InputError
from packager.image.layer import Compression, LayerBlob, TarEntry, hash_file, write_layer


def canonical_json(document: Any) -> bytes:
    """The one JSON encoding used for every hashed document: sorted keys, no spaces, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_of(document: Any) -> str:
    """A stable cache key for any JSON-able description of an input."""
    return hashlib.sha256(canonical_json(document)).hexdigest()


class ContentCache:
    """The content cache under ``root``: blobs by sha256, JSON records by kind and key, staging.

    Creating one makes its directories; raises InputError (exit 3) when they cannot be created.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs/sha256", "records", "tmp"):
            try:
                (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(
                    f"cache directory {root}: cannot create it ({exc.strerror})",
                    hint="pass a writable --cache-dir",
                ) from exc

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "blobs" / "sha256" / hexdigest

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        path = self.blob_path(digest)
        if not path.is_file():
            return False
        return size is None or path.stat().st_size == size

    def verified_blob(self, digest: str) -> Path | None:
        """The blob's path when present and its bytes still hash to ``digest``; else None."""
        path = self.blob_path(digest)
        if not path.is_file():
            return None
        actual, _ = hash_file(path)
        if actual != digest:
            path.unlink()  # a corrupt entry would poison every later build
            return None
        return path

    def adopt(self, staged: Path, digest: str) -> Path:
        """Move a staged file (already hashed by the caller) to its content address."""
        final = self.blob_path(digest)
        os.replace(staged, final)
        return final

    def adopt_file(self, source: Path) -> tuple[str, int]:
        """Copy ``source`` into the blob store; return its digest and size."""
        digest, size = hash_file(source)
        if not self.has_blob(digest, size):
            with self.staging_file() as staged:
                shutil.copyfile(source, staged)
                self.adopt(staged, digest)
        return digest, size

    @contextmanager
    def staging_file(self) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    @contextmanager
    def staging_dir(self, prefix: str) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix=prefix))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def record_path(self, kind: str, key: str) -> Path:
        return self.root / "records" / kind / f"{key}.json"

    def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self.record_path(kind, key)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put_record(self, kind: str, key: str, document: dict[str, Any]) -> None:
        path = self.record_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix="record-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(document, sort_keys=True, indent=2).encode() + b"\n")
        os.replace(name, path)

    def drop_record(self, kind: str, key: str) -> None:
        self.record_path(kind, key).unlink(missing_ok=True)


def cached_layer(cache: ContentCache, kind: str, key: str) -> LayerBlob | None:
    """The layer blob an earlier build stored for ``key``, if its record and blob are intact.

    The bytes are re-hashed when they are copied into an archive, so only the size is checked here.
    """
    record = cache.get_record(kind, key)
    if record is None:
        return None
    try:
        blob = LayerBlob(
            path=cache.blob_path(str(record["digest"])),
            digest=str(record["digest"]),
            diff_id=str(record["diff_id"]),
            size=int(record["size"]),
            uncompressed_size=int(record["uncompressed_size"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return blob if cache.has_blob(blob.digest, blob.size) else None


def store_layer(
    cache: ContentCache,
    kind: str,
    key: str,
    entries: Iterable[TarEntry],
    *,
    mtime: int,
    label: str,
    compression: Compression = "gzip",
) -> LayerBlob:
    """Write a layer into the blob store and remember that ``key`` produced it (``key`` must
    cover ``compression``)."""
    with cache.staging_file() as staged:
        blob = write_layer(entries, staged, mtime=mtime, label=label, compression=compression)
        final = cache.adopt(staged, blob.digest)
    blob = replace(blob, path=final)
    cache.put_record(kind, key, {
        "digest": blob.digest,
        "diff_id": blob.diff_id,
        "size": blob.size,
        "uncompressed_size": blob.uncompressed_size,
    })
    return blob
