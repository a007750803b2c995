"""Build an image archive from an :class:`ImageSpec`, without Docker or emulation.

Layers, in order: the base (Debian packages, or a user archive's layers as they are), the wheels,
then each file layer of the spec. Every layer is a blob in the content cache keyed by what made it,
so a warm build only writes the small documents and copies blobs into the archive.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.agent.paths import LayerWalk, PathError
from packager.console import console
from packager.digest import CHUNK
from packager.errors import FitError, InputError
from packager.image.cache import ContentCache, cached_layer, canonical_json, key_of, store_layer
from packager.image.debian import build_base_layer
from packager.image.layer import (
    Compression,
    LayerBlob,
    TarEntry,
    hash_file,
    normalize_path,
    with_parents,
)
from packager.image.oci import (
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_ZSTD,
    MEDIA_MANIFEST,
    TAR_BLOCK,
    Descriptor,
    LayerTooLargeError,
    check_layer_media_type,
    config_document,
    container_config,
    index_document,
    inspect_image_archive,
    iso_time,
    layer_diff_id,
    legacy_manifest,
    manifest_document,
    open_source,
    select_manifest,
    sha256_of,
    verify_image_archive,
    write_archive,
)
from packager.image.registry import pull_base
from packager.image.spec import (
    ArchiveBase,
    DebianBase,
    FileLayer,
    ImageResult,
    ImageSpec,
    LayerResult,
    PackageRecord,
    RegistryBase,
    StorageBudget,
    WheelSet,
)
from packager.image.wheels import build_wheel_layer

__all__ = ["build_image", "inspect_image_archive", "verify_image_archive"]

_FILE_LAYER_VERSION = 1
# The media type of a layer edgepack writes, by its compression (--compression).
_LAYER_MEDIA: dict[str, str] = {"gzip": MEDIA_LAYER_GZIP, "zstd": MEDIA_LAYER_ZSTD}


@dataclass(frozen=True)
class _Built:
    result: LayerResult
    path: Path
    media_type: str
    created_by: str


def python_release(packages: list[PackageRecord], wheels: WheelSet) -> str | None:
    """The CPython release ("3.11.2") of the image's Debian ``pythonX.Y-minimal`` package (its
    version ``3.11.2-6+deb12u6`` without the Debian revision), None when the base is not
    edgepack's Debian base."""
    name = f"python{wheels.python_version}-minimal"
    for package in packages:
        if package.kind == "deb" and package.name == name:
            return package.version.split(":")[-1].split("-")[0].split("+")[0]
    return None


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


def file_layer_key(entries: list[TarEntry], epoch: int, compression: str = "gzip") -> str:
    """The cache key of the layer blob :func:`store_layer` writes from ``entries`` (bytes or
    files, as :func:`file_layer_entries` makes them) with mtime ``epoch`` (s) and
    ``compression``: a hex SHA-256 of each entry's metadata and content hash (a model is hashed,
    not compressed, when unchanged).

    It covers exactly what the blob's bytes depend on. The layer's name is not part of it: it
    only labels progress and the LayerResult, which is made per build, so two layers with the
    same entries rightly share one blob (the same bytes, the same digest).
    """
    described: list[Any] = []
    for e in entries:
        content = None
        if isinstance(e.data, Path):
            content = hash_file(e.data)[0]
        elif isinstance(e.data, bytes):
            content = sha256_of(e.data)
        described.append([e.path, e.kind, e.mode, e.uid, e.gid, e.linkname, content])
    document: dict[str, Any] = {"version": _FILE_LAYER_VERSION, "entries": described,
                                 "epoch": epoch}
    if compression != "gzip":  # gzip keys stay as they were: existing caches keep working
        document["compression"] = compression
    return key_of(document)


def _file_layer(layer: FileLayer, epoch: int, cache: ContentCache,
                compression: Compression = "gzip") -> _Built:
    entries = file_layer_entries(layer)
    key = file_layer_key(entries, epoch, compression)
    blob = cached_layer(cache, "file-layer", key)
    cached = blob is not None
    if blob is None:
        blob = store_layer(cache, "file-layer", key, entries, mtime=epoch,
                           label=f"layer {layer.name}", compression=compression)
    return _Built(_result(layer.name, blob, cached), blob.path, _LAYER_MEDIA[compression],
                  f"edgepack: {layer.name} ({len(layer.files)} files)")


@dataclass(frozen=True)
class _ArchiveBaseImage:
    layers: tuple[_Built, ...]
    container: dict[str, Any]
    history: tuple[dict[str, Any], ...]


def _checked_uncompressed_size(
    cache: ContentCache, digest: str, diff_id: str, media_type: str, label: str, index: int,
    limit: int | None, walk: LayerWalk | None = None,
) -> int:
    """Check a base layer's bytes against its media type, then decompress it once (at most
    ``limit`` bytes) to check its diff_id and learn its size; the result is remembered.

    Raises InputError for bytes that are not what the media type says, do not decompress or do
    not match the diff_id; LayerTooLargeError past ``limit``.
    """
    layer = f"{label}: layer {index} ({digest})"
    path = cache.blob_path(digest)
    with path.open("rb") as raw:
        head = raw.read(TAR_BLOCK)
    try:
        compression = check_layer_media_type(media_type, head)
    except ValueError as exc:
        raise InputError(f"{layer}: {exc}",
                         hint="re-export the base image, e.g. with skopeo copy") from exc
    record = cache.get_record("base-layer", digest.removeprefix("sha256:"))
    # A record is written only after the member walk passed (the path policy, "members"), so
    # records from before that check are read again. A cached layer's links are not known to
    # the walk of the layers above it: those were checked against it when it was first read.
    if (record is not None and record.get("diff_id") == diff_id
            and record.get("compression") == compression and record.get("members") == 1):
        size = int(record["uncompressed_size"])
        if limit is not None and size > limit:
            raise LayerTooLargeError(size, limit)
        return size
    try:
        with path.open("rb") as raw:
            actual, size = layer_diff_id(raw, compression, limit=limit, walk=walk)
    except PathError as exc:
        raise InputError(f"{layer}: {exc}", hint="a layer may write only inside the image's "
                         "root filesystem; use a trusted base image") from exc
    except ValueError as exc:
        raise InputError(f"{layer}: {exc}", hint="the base image is damaged; export it again"
                         ) from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{layer} does not decompress ({exc})") from exc
    if actual != diff_id:
        raise InputError(f"{layer} does not match its rootfs.diff_ids entry",
                         hint="the base image is damaged; export it again")
    cache.put_record("base-layer", digest.removeprefix("sha256:"),
                     {"diff_id": diff_id, "uncompressed_size": size, "compression": compression,
                      "members": 1})
    return size


def _human(n: int) -> str:
    """Bytes for a message, as packager.fit shows them (GiB/MiB with one decimal)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _storage_line(budget: StorageBudget) -> str:
    return (f"{budget.target} has {_human(budget.available_bytes)} of storage "
            f"({budget.note})")


def _archive_base(
    base: ArchiveBase, arch: str, cache: ContentCache, budget: StorageBudget | None = None
) -> _ArchiveBaseImage:
    """Copy a user base image's layers into the cache as they are; keep its config.

    With a ``budget``, no layer is inflated past what the target's storage can hold: the
    base's real uncompressed size, not an estimate, goes into the storage check.
    """
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
        total = 0
        walk = LayerWalk()  # the path policy over every member name, lowest layer first
        for i, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            walk.next_layer()
            digest, size = str(layer["digest"]), int(layer["size"])
            media_type = layer.get("mediaType")
            if not isinstance(media_type, str):
                raise InputError(f"{label}: layer {i} ({digest}) has no mediaType",
                                 hint="re-export the base image, e.g. with skopeo copy")
            name = "blobs/" + digest.replace(":", "/", 1)
            if not cache.has_blob(digest, size):
                if not source.exists(name):
                    raise InputError(f"{label}: layer blob {name} is missing")
                with cache.staging_file() as staged, source.open(name) as src:
                    with staged.open("wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    actual, actual_size = hash_file(staged)
                    if actual != digest or actual_size != size:
                        raise InputError(f"{label}: layer blob {name} does not match its digest")
                    cache.adopt(staged, digest)
            limit = None if budget is None else budget.max_image_bytes - total
            try:
                uncompressed = _checked_uncompressed_size(
                    cache, digest, str(diff_id), media_type, label, i, limit, walk)
            except LayerTooLargeError as exc:
                assert budget is not None
                raise FitError(
                    f"{label}: layer {i} ({digest}, {_human(size)}) inflates past "
                    f"{_human(exc.limit)}: the base image needs more than "
                    f"{_human(total + exc.limit)} unpacked ({total + exc.limit} bytes; reading "
                    f"stopped there), and {_storage_line(budget)}, room for "
                    f"{_human(budget.max_image_bytes)} per image",
                    hint="use a smaller base image or a target with more storage",
                ) from exc
            total += uncompressed
            blob = LayerBlob(cache.blob_path(digest), digest, str(diff_id), size, uncompressed)
            built.append(_Built(_result(f"base-{i}", blob, True), blob.path, media_type, ""))
        history = tuple(h for h in config.get("history") or [] if isinstance(h, dict))
        return _ArchiveBaseImage(tuple(built), dict(config.get("config") or {}), history)


def _check_storage(budget: StorageBudget, built: list[_Built], archive_bytes: int,
                   ref_name: str) -> None:
    """Refuse an image whose real size does not fit the target's storage (FitError)."""
    unpacked = sum(b.result.uncompressed_size for b in built)
    needed = budget.copies * unpacked + archive_bytes
    if budget.enforce and needed > budget.available_bytes:
        raise FitError(
            f"image {ref_name} does not fit {budget.target}: storage needs {_human(needed)} "
            f"({needed} bytes: {budget.copies} x {_human(unpacked)} unpacked image + "
            f"{_human(archive_bytes)} image.tar), {_storage_line(budget)}",
            hint="use a smaller base image or model, a target with more storage, or --force",
        )
    if unpacked > budget.max_image_bytes:
        raise FitError(
            f"image {ref_name} unpacks to {_human(unpacked)} ({unpacked} bytes), more than "
            f"{_storage_line(budget)}",
            hint="use a smaller base image or model, or a target with more storage",
        )


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
                                refresh=refresh, offline=offline, compression=spec.compression)
        built.append(_Built(_result("base", base.blob, base.cached), base.blob.path,
                            _LAYER_MEDIA[spec.compression], f"edgepack: {base.description}"))
    else:
        user_base = spec.base
        if isinstance(user_base, RegistryBase):
            user_base = pull_base(user_base, spec.arch, spec.variant, cache, offline=offline)
        archive_base = _archive_base(user_base, spec.arch, cache, spec.storage)
        built.extend(archive_base.layers)
        base_container = archive_base.container
        history.extend(archive_base.history)
    extra_env: list[tuple[str, str]] = []
    packages: list[PackageRecord] = []
    suite: str | None = None
    if isinstance(spec.base, DebianBase):
        suite = base.lock.suite
        packages += [
            PackageRecord("deb", p.package, p.version, p.architecture, p.filename, p.sha256)
            for p in base.lock.packages
        ]
    if spec.wheels is not None:
        wheels = build_wheel_layer(spec.wheels, spec.arch, spec.created_epoch, cache,
                                   refresh=refresh, offline=offline,
                                   compression=spec.compression,
                                   python_release=python_release(packages, spec.wheels))
        built.append(_Built(_result("wheels", wheels.blob, wheels.cached), wheels.blob.path,
                            _LAYER_MEDIA[spec.compression], f"edgepack: {wheels.description}"))
        extra_env.append(("PYTHONPATH", spec.wheels.site_packages))
        for wheel in wheels.wheels:
            # name-version(-build)?-python-abi-platform.whl (PEP 427)
            name, version, *_, platform = wheel.filename.removesuffix(".whl").split("-")
            packages.append(
                PackageRecord("wheel", name, version, platform, wheel.filename, wheel.sha256)
            )
    for layer in spec.layers:
        built.append(_file_layer(layer, spec.created_epoch, cache, spec.compression))
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
        if spec.storage is not None:
            _check_storage(spec.storage, built, tmp.stat().st_size, spec.ref_name)
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
        packages=tuple(packages),
        debian_suite=suite,
    )
