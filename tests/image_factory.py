"""Hostile and hand-labelled base images for tests, generated as streams (never held in memory).

``gzip_bomb`` writes a gzip member of N zero bytes (an empty tar: a tar ends at its first zero
blocks) by repeating one deflate chunk that decodes to 1 MiB of zeros on its own (a full flush
resets the compressor, so every copy decodes the same), so 4 GiB of zeros cost a 4 MiB file and
a few seconds of CRC and SHA-256, without inflating anything.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.image.cache import canonical_json
from packager.image.oci import (
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    Descriptor,
    index_document,
    legacy_manifest,
    manifest_document,
    sha256_of,
    write_archive,
)

MIB = 1 << 20
_ZEROS = bytes(MIB)


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str  # of the bytes as stored
    size: int
    diff_id: str  # of the uncompressed tar
    uncompressed_size: int


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def gzip_bomb(path: Path, mib: int) -> Blob:
    """A gzip file of ``mib`` MiB of zeros, written chunk by chunk; its true diff_id included."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    crc = 0
    plain = hashlib.sha256()
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, mtime 0, OS unknown
        for _ in range(mib):
            f.write(chunk)
            crc = zlib.crc32(_ZEROS, crc)
            plain.update(_ZEROS)
        f.write(final)
        total = mib * MIB
        f.write(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))
    digest, size = _digest(path)
    return Blob(path, digest, size, "sha256:" + plain.hexdigest(), total)


def one_file_tar(name: str, data: bytes) -> bytes:
    """A PAX tar holding one regular file ``name`` (mode 0644, mtime 0, uid/gid 0) of ``data``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def plain_blob(path: Path, data: bytes, diff_id_of: bytes | None = None) -> Blob:
    """``data`` stored as is; its diff_id is that of ``diff_id_of`` (default: ``data``)."""
    path.write_bytes(data)
    plain = data if diff_id_of is None else diff_id_of
    return Blob(path, sha256_of(data), len(data), sha256_of(plain), len(plain))


def base_archive(
    out: Path,
    layers: list[tuple[Blob, str]],
    *,
    arch: str = "amd64",
    ref: str = "base:1",
    run_config: dict[str, Any] | None = None,
    history: list[str] | None = None,
) -> Path:
    """An OCI archive whose manifest lists ``layers`` as (blob, media type), as labelled.
    ``run_config`` is the image config's ``config`` (Env, WorkingDir, Cmd...), ``history`` each
    layer's ``created_by`` (default: ``layer 0``, ``layer 1``...)."""
    config = canonical_json({
        "architecture": arch, "os": "linux",
        "config": run_config or {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b, _ in layers]},
        "history": [{"created_by": line}
                    for line in history or [f"layer {i}" for i in range(len(layers))]],
    })
    cdesc = Descriptor(MEDIA_CONFIG, sha256_of(config), len(config))
    ldescs = [Descriptor(media, b.digest, b.size) for b, media in layers]
    manifest = canonical_json(manifest_document(cdesc, ldescs, {}))
    mdesc = Descriptor(MEDIA_MANIFEST, sha256_of(manifest), len(manifest))
    blobs: list[tuple[str, Path | bytes]] = [(b.digest, b.path) for b, _ in layers]
    blobs += [(cdesc.digest, config), (mdesc.digest, manifest)]
    write_archive(out, blobs=blobs, index=index_document(mdesc, ref, arch=arch, variant=None),
                  legacy=legacy_manifest(cdesc, ldescs, ref), mtime=0)
    return out
