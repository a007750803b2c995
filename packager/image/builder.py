"""Build an image archive from an :class:`ImageSpec`, without Docker or emulation.

Layers, in order: the base (Debian packages, or a user archive's layers as they are), the wheels,
then each file layer of the spec. Every layer is a blob in the content cache keyed by what made it,
so a warm build only writes the small documents and copies blobs into the archive.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from packager.console import console
from packager.errors import InputError
from packager.image.cache import ContentCache, cached_layer, canonical_json, key_of, store_layer
from packager.image.debian import build_base_layer
from packager.image.layer import (
    HashingWriter,
    LayerBlob,
    TarEntry,
    hash_file,
    normalize_path,
    with_parents,
)
from packager.image.oci import (
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Descriptor,
    config_document,
    container_config,
    index_document,
    inspect_image_archive,
    iso_time,
    legacy_manifest,
    manifest_document,
    open_source,
    select_manifest,
    sha256_of,
    verify_image_archive,
    write_archive,
)
from packager.image.spec import (
    ArchiveBase,
    DebianBase,
    FileLayer,
    ImageResult,
    ImageSpec,
    LayerResult,
)
from packager.image.wheels import build_wheel_layer

__all__ = ["build_image", "inspect_image_archive", "verify_image_archive"]

_FILE_LAYER_VERSION = 1


@dataclass(frozen=True)
class _Built:
    result: LayerResult
    path: Path
    media_type: str
    created_by: str


def _result(name: str, blob: LayerBlob, cached: bool) -> LayerResult:
    return LayerResult(name=name, digest=blob.digest, diff_id=blob.diff_id, size=blob.size,
                       uncompressed_size=blob.uncompressed_size, cached=cached)


def file_layer_entries(layer: FileLayer) -> list[TarEntry]:
    """The tar entries of a file layer, with parent directories (root, 0755) added."""
    entries: list[TarEntry] = []
    for path, mode, uid, gid in layer.dirs:
        entries.append(TarEntry(normalize_path(path), "dir", mode, uid, gid))
    for path, target in layer.symlinks:
        entries.append(TarEntry(normalize_path(path), "symlink", 0o777, linkname=target))
    for item in layer.files:
        dest = normalize_path(item.dest)
        if isinstance(item.source, bytes):
            entries.append(TarEntry(dest, "file", item.mode, item.uid, item.gid,
                                    size=len(item.source), data=item.source))
            continue
        if not item.source.is_file():
            raise InputError(f"{item.source}: file for {item.dest} in layer '{layer.name}' "
                             "is missing", hint="check the path")
        entries.append(TarEntry(dest, "file", item.mode, item.uid, item.gid,
                                size=item.source.stat().st_size, data=item.source))
    return with_parents(entries)


def file_layer_key(layer: FileLayer, entries: list[TarEntry], epoch: int) -> str:
    """Key by metadata and content hashes (a model is hashed, not compressed, when unchanged)."""
    described: list[Any] = []
    for e in entries:
        content = None
        if isinstance(e.data, Path):
            content = hash_file(e.data)[0]
        elif isinstance(e.data, bytes):
            content = sha256_of(e.data)
        described.append([e.path, e.kind, e.mode, e.uid, e.gid, e.linkname, content])
    return key_of({"version": _FILE_LAYER_VERSION, "entries": described, "epoch": epoch})


def _file_layer(layer: FileLayer, epoch: int, cache: ContentCache) -> _Built:
    entries = file_layer_entries(layer)
    key = file_layer_key(layer, entries, epoch)
    blob = cached_layer(cache, "file-layer", key)
    cached = blob is not None
    if blob is None:
        blob = store_layer(cache, "file-layer", key, entries, mtime=epoch,
                           label=f"layer {layer.name}")
    return _Built(_result(layer.name, blob, cached), blob.path, MEDIA_LAYER_GZIP,
                  f"edgepack: {layer.name} ({len(layer.files)} files)")


@dataclass(frozen=True)
class _ArchiveBaseImage:
    layers: tuple[_Built, ...]
    container: dict[str, Any]
    history: tuple[dict[str, Any], ...]


def _checked_uncompressed_size(cache: ContentCache, digest: str, diff_id: str, label: str) -> int:
    """Decompress a base layer once to check its diff_id and learn its size; remembered."""
    record = cache.get_record("base-layer", digest.removeprefix("sha256:"))
    if record is not None and record.get("diff_id") == diff_id:
        return int(record["uncompressed_size"])
    hasher = HashingWriter(None)
    path = cache.blob_path(digest)
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw) if gzipped else raw
        try:
            while chunk := stream.read(1 << 20):
                hasher.write(chunk)
        except (OSError, EOFError) as exc:
            raise InputError(f"{label}: layer {digest} does not decompress ({exc})") from exc
    if hasher.digest != diff_id:
        raise InputError(f"{label}: layer {digest} does not match its rootfs.diff_ids entry",
                         hint="the base image is damaged; export it again")
    cache.put_record("base-layer", digest.removeprefix("sha256:"),
                     {"diff_id": diff_id, "uncompressed_size": hasher.size})
    return hasher.size


def _archive_base(base: ArchiveBase, arch: str, cache: ContentCache) -> _ArchiveBaseImage:
    """Copy a user base image's layers into the cache as they are; keep its config."""
    label = f"--base {base.reference}"
    with open_source(base.path, label) as source:
        _, manifest = select_manifest(source, arch)
        config_name = "blobs/" + str(manifest["config"]["digest"]).replace(":", "/", 1)
        config = source.read_json(config_name)
        base_arch = config.get("architecture")
        if base_arch != arch:
            raise InputError(f"{label}: the base image is linux/{base_arch}, the target is "
                             f"linux/{arch}", hint=f"use a base image built for {arch}")
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layers = list(manifest.get("layers") or [])
        if len(diff_ids) != len(layers):
            raise InputError(f"{label}: config lists {len(diff_ids)} diff_ids for "
                             f"{len(layers)} layers")
        built = []
        for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            digest, size = str(layer["digest"]), int(layer["size"])
            name = "blobs/" + digest.replace(":", "/", 1)
            if not cache.has_blob(digest, size):
                if not source.exists(name):
                    raise InputError(f"{label}: layer blob {name} is missing")
                with cache.staging_file() as staged, source.open(name) as src:
                    with staged.open("wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                    actual, actual_size = hash_file(staged)
                    if actual != digest or actual_size != size:
                        raise InputError(f"{label}: layer blob {name} does not match its digest")
                    cache.adopt(staged, digest)
            uncompressed = _checked_uncompressed_size(cache, digest, str(diff_id), label)
            blob = LayerBlob(cache.blob_path(digest), digest, str(diff_id), size, uncompressed)
            built.append(_Built(_result(f"base-{i}", blob, True), blob.path,
                                str(layer.get("mediaType", MEDIA_LAYER_GZIP)), ""))
        history = tuple(h for h in config.get("history") or [] if isinstance(h, dict))
        return _ArchiveBaseImage(tuple(built), dict(config.get("config") or {}), history)


def build_image(
    spec: ImageSpec, out: Path, cache_dir: Path, *, refresh: bool = False, offline: bool = False
) -> ImageResult:
    """Write the image archive for ``spec`` to ``out`` (atomically) and describe it.

    ``refresh`` re-resolves the Debian packages and wheels instead of using the stored locks;
    ``offline`` refuses to touch the network (a cold cache then fails with NetworkError).
    """
    cache = ContentCache(cache_dir)
    built: list[_Built] = []
    base_container: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    created = iso_time(spec.created_epoch)
    if isinstance(spec.base, DebianBase):
        base = build_base_layer(spec.base, spec.arch, spec.users, spec.created_epoch, cache,
                                refresh=refresh, offline=offline)
        built.append(_Built(_result("base", base.blob, base.cached), base.blob.path,
                            MEDIA_LAYER_GZIP, f"edgepack: {base.description}"))
    else:
        archive_base = _archive_base(spec.base, spec.arch, cache)
        built.extend(archive_base.layers)
        base_container = archive_base.container
        history.extend(archive_base.history)
    extra_env: list[tuple[str, str]] = []
    if spec.wheels is not None:
        wheels = build_wheel_layer(spec.wheels, spec.arch, spec.created_epoch, cache,
                                   refresh=refresh, offline=offline)
        built.append(_Built(_result("wheels", wheels.blob, wheels.cached), wheels.blob.path,
                            MEDIA_LAYER_GZIP, f"edgepack: {wheels.description}"))
        extra_env.append(("PYTHONPATH", spec.wheels.site_packages))
    for layer in spec.layers:
        built.append(_file_layer(layer, spec.created_epoch, cache))
    for item in built:
        if item.created_by:
            history.append({"created": created, "created_by": item.created_by,
                            "comment": item.result.name})

    config = config_document(
        arch=spec.arch,
        variant=spec.variant,
        created_epoch=spec.created_epoch,
        container=container_config(spec.config, base=base_container, extra_env=extra_env),
        diff_ids=[b.result.diff_id for b in built],
        history=history,
    )
    config_bytes = canonical_json(config)
    config_desc = Descriptor(MEDIA_CONFIG, sha256_of(config_bytes), len(config_bytes))
    layer_descs = [Descriptor(b.media_type, b.result.digest, b.result.size) for b in built]
    manifest_bytes = canonical_json(
        manifest_document(config_desc, layer_descs, dict(spec.annotations)))
    manifest_desc = Descriptor(
        MEDIA_MANIFEST, sha256_of(manifest_bytes),
        len(manifest_bytes))
    index = index_document(manifest_desc, spec.ref_name, arch=spec.arch, variant=spec.variant)
    legacy = legacy_manifest(config_desc, layer_descs, spec.ref_name)

    blobs: list[tuple[str, Path | bytes]] = [(b.result.digest, b.path) for b in built]
    blobs += [(config_desc.digest, config_bytes), (manifest_desc.digest, manifest_bytes)]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        console.status(f"writing {out.name} ({len(built)} layers)")
        write_archive(tmp, blobs=blobs, index=index, legacy=legacy, mtime=spec.created_epoch)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ImageResult(
        archive=out,
        manifest_digest=manifest_desc.digest,
        config_digest=config_desc.digest,
        size_bytes=out.stat().st_size,
        layers=tuple(b.result for b in built),
        ref_name=spec.ref_name,
    )
