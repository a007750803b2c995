"""OCI documents (config, manifest, index), the image archive and reading it back.

The archive is what ``docker save`` writes since Docker 25: an OCI image layout (``oci-layout``,
``index.json``, ``blobs/sha256/*``) with the legacy ``manifest.json`` beside it in the same tar, so
``docker load``, ``podman load`` and ``skopeo ... oci-archive:`` all accept it. Building the
documents is pure; :func:`write_archive` is the one step that writes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from packager.agent.paths import LayerWalk, PathError
from packager.digest import CHUNK, sha256_stream
from packager.errors import InputError, VerifyError
from packager.image.cache import canonical_json
from packager.image.layer import TarEntry, normalize_path, write_tar
from packager.image.spec import ImageConfig

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

# What each layer media type says the blob's bytes are (OCI image-spec layer.md and Docker's
# image manifest v2 schema 2). Anything else (encrypted layers, a typo) is refused, not guessed.
_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
LAYER_COMPRESSION: dict[str, str] = {
    MEDIA_LAYER_TAR: "tar",
    MEDIA_LAYER_GZIP: "gzip",
    MEDIA_LAYER_ZSTD: "zstd",
    _NONDIST: "tar",
    _NONDIST + "+gzip": "gzip",
    _NONDIST + "+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
TAR_BLOCK = 512

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NS = 1_000_000_000


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: media type, ``sha256:<hex>`` digest and size in bytes."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def sha256_of(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: the digest form OCI documents use."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_name(digest: str) -> str:
    """A blob's path inside an OCI image layout: ``sha256:<hex>`` -> ``blobs/sha256/<hex>``."""
    return "blobs/" + digest.replace(":", "/", 1)


def iso_time(epoch: int) -> str:
    """``epoch`` (seconds) as an RFC 3339 UTC time in whole seconds: ``2024-01-02T03:04:05Z``."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_reference(ref_name: str) -> tuple[str, str]:
    """``edgepack/mnist:1.0`` -> (``docker.io/edgepack/mnist:1.0``, ``1.0``), docker's rules."""
    name, tag = ref_name, "latest"
    last = ref_name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = ref_name.rpartition(":")
    first, sep, _ = name.partition("/")
    has_registry = bool(sep) and ("." in first or ":" in first or first == "localhost")
    if not has_registry:
        name = "docker.io/" + (name if sep else "library/" + name)
    return f"{name}:{tag}", tag


def merge_env(*groups: list[tuple[str, str]]) -> list[str]:
    """``KEY=VALUE`` lines; a later group overrides a key in place, keeping first-seen order."""
    merged: dict[str, str] = {}
    for group in groups:
        for key, value in group:
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def parse_env(lines: list[str]) -> list[tuple[str, str]]:
    """A config's ``Env`` lines as (key, value) pairs; a line without ``=`` has an empty value."""
    pairs = []
    for line in lines:
        key, _, value = line.partition("=")
        pairs.append((key, value))
    return pairs


def container_config(
    config: ImageConfig, *, base: dict[str, Any] | None, extra_env: list[tuple[str, str]]
) -> dict[str, Any]:
    """Docker's ``config`` object: the base image's ``config`` (``base``; None: none) with ours
    applied.

    - Env: the base's, then ``extra_env``, then ours, a later value replacing a key's earlier one
      in place; PATH defaults to :data:`DEFAULT_PATH` when the base sets none.
    - User, Entrypoint and StopSignal: always ours, replacing the base's.
    - Cmd: ours; when ours is empty the base's is dropped too (docker drops the base's Cmd when
      the entrypoint changes).
    - WorkingDir: ours, unless ours is ``/`` and the base sets one.
    - ExposedPorts and Labels: the base's plus ours (ours win a clash); Healthcheck: ours when
      set, else the base's.
    - Any other key of the base's stays as it is.
    """
    out: dict[str, Any] = dict(base or {})
    base_env = parse_env(list(out.get("Env") or []))
    defaults = [] if any(k == "PATH" for k, _ in base_env) else [("PATH", DEFAULT_PATH)]
    out["Env"] = merge_env(defaults, base_env, extra_env, list(config.env))
    out["User"] = config.user
    out["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        out["Cmd"] = list(config.cmd)
    else:
        out.pop("Cmd", None)  # docker drops the base's Cmd when the entrypoint changes
    if config.workdir != "/" or "WorkingDir" not in out:
        out["WorkingDir"] = config.workdir
    if config.exposed_ports:
        ports = dict(out.get("ExposedPorts") or {})
        ports.update({port: {} for port in config.exposed_ports})
        out["ExposedPorts"] = ports
    if config.labels:
        labels = dict(out.get("Labels") or {})
        labels.update(dict(config.labels))
        out["Labels"] = labels
    if config.healthcheck is not None:
        hc = config.healthcheck
        out["Healthcheck"] = {
            "Test": list(hc.test),
            "Interval": hc.interval_s * _NS,
            "Timeout": hc.timeout_s * _NS,
            "StartPeriod": hc.start_period_s * _NS,
            "Retries": hc.retries,
        }
    out["StopSignal"] = config.stop_signal
    return out


def config_document(
    *,
    arch: str,
    variant: str | None,
    created_epoch: int,
    container: dict[str, Any],
    diff_ids: list[str],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The OCI image config for linux/``arch``: ``container`` as its ``config``, layers by diff_id.

    ``created`` is ``created_epoch`` (seconds) as an RFC 3339 time; ``variant`` only when given.
    """
    doc: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "created": iso_time(created_epoch),
        "config": container,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    if variant:
        doc["variant"] = variant
    return doc


def manifest_document(
    config: Descriptor, layers: list[Descriptor], annotations: dict[str, str]
) -> dict[str, Any]:
    """The OCI image manifest (schemaVersion 2) naming ``config`` and ``layers``, in layer order.

    ``annotations`` are written only when there are some.
    """
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return doc


def index_document(
    manifest: Descriptor, ref_name: str, *, arch: str, variant: str | None
) -> dict[str, Any]:
    """The layout's ``index.json``: one manifest for linux/``arch``, named by ``ref_name``.

    Its annotations carry the full reference (``io.containerd.image.name``, docker's rules:
    :func:`image_reference`) and the tag alone (``org.opencontainers.image.ref.name``).
    """
    full, tag = image_reference(ref_name)
    platform: dict[str, str] = {"architecture": arch, "os": "linux"}
    if variant:
        platform["variant"] = variant
    entry = manifest.to_json()
    entry["platform"] = platform
    entry["annotations"] = {CONTAINERD_NAME: full, REF_NAME: tag}
    return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}


def legacy_manifest(config: Descriptor, layers: list[Descriptor], ref_name: str) -> list[Any]:
    """Docker's pre-OCI ``manifest.json``; the tag is docker's short form (``name:tag``)."""
    full, _ = image_reference(ref_name)
    short = full.removeprefix("docker.io/").removeprefix("library/")
    return [{
        "Config": blob_name(config.digest),
        "RepoTags": [short],
        "Layers": [blob_name(layer.digest) for layer in layers],
    }]


# --- writing ---------------------------------------------------------------------------------


class _VerifyingReader(io.RawIOBase):
    """Reads a cached blob and refuses, on close, bytes that no longer match its name."""

    def __init__(self, path: Path, digest: str) -> None:
        super().__init__()
        self._fh = path.open("rb")
        self._path = path
        self._digest = digest
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._hash.update(chunk)
        return chunk

    def close(self) -> None:
        if self.closed:
            return
        self._hash.update(self._fh.read())
        self._fh.close()
        super().close()
        if "sha256:" + self._hash.hexdigest() != self._digest:
            self._path.unlink(missing_ok=True)
            raise VerifyError(f"cached blob {self._path} does not match its digest {self._digest}",
                              hint="it was removed from the cache; build again")


def write_archive(
    dest: Path,
    *,
    blobs: list[tuple[str, Path | bytes]],
    index: dict[str, Any],
    legacy: list[Any],
    mtime: int,
) -> None:
    """Write the image tar (uncompressed: the layers inside are compressed already, gzip or
    zstd) to ``dest``."""
    entries = [TarEntry("blobs", "dir", 0o755), TarEntry("blobs/sha256", "dir", 0o755)]
    seen: set[str] = set()
    for digest, source in blobs:
        if digest in seen:
            continue  # two identical layers are stored once
        seen.add(digest)
        if isinstance(source, bytes):
            entries.append(TarEntry(blob_name(digest), "file", 0o644, size=len(source),
                                    data=source))
        else:
            def opener(path: Path = source, d: str = digest) -> IO[bytes]:
                return _VerifyingReader(path, d)  # type: ignore[return-value]

            entries.append(TarEntry(blob_name(digest), "file", 0o644,
                                    size=source.stat().st_size, data=opener))
    for name, doc in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index),
                      ("manifest.json", legacy)):
        data = canonical_json(doc)
        entries.append(TarEntry(name, "file", 0o644, size=len(data), data=data))
    entries.sort(key=lambda e: e.path)
    with dest.open("wb") as fh:
        write_tar(entries, fh, mtime=mtime, label="image archive")


# --- layer bytes -----------------------------------------------------------------------------


class LayerTooLargeError(Exception):
    """A layer inflated past the bound its reader was given; reading stopped there."""

    def __init__(self, read_bytes: int, limit: int) -> None:
        super().__init__(f"inflates past {limit} bytes")
        self.read_bytes = read_bytes
        self.limit = limit


def is_tar_block(block: bytes) -> bool:
    """Whether ``block`` opens a tar stream: a header whose checksum holds (POSIX ustar, GNU and
    v7 headers all carry one), or the all-zero block that ends an empty archive."""
    if len(block) < TAR_BLOCK:
        return False
    block = block[:TAR_BLOCK]
    if block == bytes(TAR_BLOCK):
        return True
    field = block[148:156].split(b"\x00", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    return stored == unsigned


def sniff_compression(head: bytes) -> str:
    """What the first bytes of a layer blob are: "gzip", "zstd", "tar", or another name."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if is_tar_block(head):
        return "tar"
    return "empty" if not head else "unknown bytes"


def check_layer_media_type(media_type: str, head: bytes) -> str:
    """The compression ``media_type`` names, after checking the blob's first bytes (``head``,
    at least 512 of them when the blob has that many) are what it says.

    Raises ValueError with a short reason: an unknown media type, or bytes of another kind (for
    a gzip layer labelled uncompressed, engines disagree: some sniff the bytes, some trust the
    label; and every check that reads the layer as what its label says would read other bytes).
    """
    expected = LAYER_COMPRESSION.get(media_type)
    if expected is None:
        raise ValueError(f"media type {media_type!r} is not a layer type edgepack can read")
    actual = sniff_compression(head[:TAR_BLOCK])
    if actual != expected:
        raise ValueError(f"media type {media_type} says {expected}, the bytes are {actual}")
    return expected


class _Counted(io.RawIOBase):
    """The uncompressed layer as it is read: hashed, counted, its first block kept, and
    stopped at ``limit`` bytes, whoever reads it (the member walk or the final drain)."""

    def __init__(self, stream: Any, limit: int | None) -> None:
        super().__init__()
        self._stream = stream
        self._limit = limit
        self.digest = hashlib.sha256()
        self.size = 0
        self.first = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self._stream.read(CHUNK if size is None or size < 0 else size)
        if len(self.first) < TAR_BLOCK:
            self.first += chunk[: TAR_BLOCK - len(self.first)]
        self.size += len(chunk)
        if self._limit is not None and self.size > self._limit:
            raise LayerTooLargeError(self.size, self._limit)
        self.digest.update(chunk)
        return chunk


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk():
        return "device node"
    return "FIFO" if member.isfifo() else "special file"


def walk_members(stream: IO[bytes], walk: LayerWalk) -> None:
    """Every member name of the tar ``stream`` through the path policy
    (:class:`packager.agent.paths.LayerWalk`), read once, in order, never extracted.

    Raises PathError (a ValueError) naming the member, ValueError for a stream that is not a tar.
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                try:
                    walk.check(member.name, _member_kind(member), member.linkname)
                except PathError as exc:
                    raise PathError(f"member {exc}") from exc
    except tarfile.TarError as exc:
        raise ValueError(f"not a readable tar archive ({exc})") from exc


def layer_diff_id(raw: IO[bytes], compression: str, *, limit: int | None = None,
                  walk: LayerWalk | None = None) -> tuple[str, int]:
    """``("sha256:<hex>", size)`` of a layer's uncompressed tar, read from ``raw`` in chunks.

    ``limit`` bounds the uncompressed bytes read: past it, LayerTooLargeError, so a 4 MiB gzip
    bomb costs at most ``limit`` bytes of work, never its 4 GiB. With ``walk``, every member
    name goes through the path policy in the same read (:func:`walk_members`; PathError, a
    ValueError, names the first refused member). Raises OSError/EOFError for bytes that do not
    decompress and ValueError when the uncompressed stream is not a tar.
    """
    with _decompressed(raw, compression) as stream:
        counted = _Counted(stream, limit)
        if walk is not None:
            try:
                walk_members(counted, walk)  # type: ignore[arg-type]
            except PathError:
                raise
            except ValueError as exc:
                if not is_tar_block(counted.first):
                    raise ValueError(f"the {compression} stream does not hold a tar archive"
                                     ) from exc
                raise
        while counted.read(CHUNK):
            pass  # the rest (end-of-archive blocks, padding) is hashed too
    if compression != "tar" and not is_tar_block(counted.first):
        raise ValueError(f"the {compression} stream does not hold a tar archive")
    return "sha256:" + counted.digest.hexdigest(), counted.size


@contextmanager
def _decompressed(raw: IO[bytes], compression: str) -> Iterator[Any]:
    if compression == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            yield gz
    elif compression == "zstd":
        from packager.tools.zstd import decompressing

        with decompressing(raw) as stream:
            yield stream
    else:
        yield raw


# --- reading ---------------------------------------------------------------------------------


class ImageSource:
    """Files of an OCI layout, from a tar (``oci-archive``) or a directory."""

    def __init__(self, tar: tarfile.TarFile | None, root: Path | None, label: str) -> None:
        self._tar = tar
        self._root = root
        self.label = label
        self._members: dict[str, tarfile.TarInfo] = {}
        if tar is not None:
            for member in tar.getmembers():
                if member.isfile():
                    self._members[normalize_path(member.name)] = member

    def names(self) -> list[str]:
        if self._tar is not None:
            return sorted(self._members)
        assert self._root is not None
        return sorted(p.relative_to(self._root).as_posix()
                      for p in self._root.rglob("*") if p.is_file())

    def exists(self, name: str) -> bool:
        if self._tar is not None:
            return name in self._members
        assert self._root is not None
        return (self._root / name).is_file()

    def size(self, name: str) -> int:
        if self._tar is not None:
            return self._members[name].size
        assert self._root is not None
        return (self._root / name).stat().st_size

    def open(self, name: str) -> IO[bytes]:
        if self._tar is not None:
            stream = self._tar.extractfile(self._members[name])
            assert stream is not None  # regular members always have data
            return stream
        assert self._root is not None
        return (self._root / name).open("rb")

    def read_json(self, name: str) -> Any:
        if not self.exists(name):
            raise InputError(f"{self.label}: {name} is missing", hint="not an OCI image layout")
        with self.open(name) as fh:
            try:
                return json.loads(fh.read())
            except ValueError as exc:
                raise InputError(f"{self.label}: {name} is not valid JSON") from exc

    def hash(self, name: str) -> tuple[str, int]:
        with self.open(name) as fh:
            hexdigest, size = sha256_stream(fh)
        return "sha256:" + hexdigest, size


@contextmanager
def open_source(path: Path, label: str | None = None) -> Iterator[ImageSource]:
    """An OCI layout directory or an archive tar, as an :class:`ImageSource`."""
    label = label or str(path)
    if path.is_dir():
        yield ImageSource(None, path, label)
        return
    if not path.is_file():
        raise InputError(f"{label}: no such file or directory", hint="check the --base path")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{label}: not a readable tar archive ({exc})",
                         hint="pass an oci-archive tar or an OCI layout directory") from exc
    with tar:
        yield ImageSource(tar, None, label)


def select_manifest(
    source: ImageSource, arch: str | None = None
) -> tuple[Descriptor, dict[str, Any]]:
    """The image manifest the layout's index names (following one nested index by platform)."""
    index = source.read_json("index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not entries:
        raise InputError(f"{source.label}: index.json lists no manifests")
    for _ in range(2):
        chosen = entries[0]
        if len(entries) > 1 and arch is not None:
            matching = [e for e in entries if (e.get("platform") or {}).get("architecture") == arch]
            if not matching:
                raise InputError(f"{source.label}: no manifest for architecture {arch}",
                                 hint="use a base image built for the target's architecture")
            chosen = matching[0]
        desc = Descriptor(str(chosen.get("mediaType", "")), str(chosen["digest"]),
                          int(chosen["size"]))
        doc = source.read_json(blob_name(desc.digest))
        if desc.media_type in (MEDIA_INDEX, DOCKER_MANIFEST_LIST) or "manifests" in doc:
            entries = doc.get("manifests") or []
            continue
        return desc, doc
    raise InputError(f"{source.label}: index nesting is too deep")


def inspect_image_archive(path: Path) -> dict[str, Any]:
    """Manifest digest, platform, layers with sizes and the config of an image archive."""
    with open_source(path) as source:
        index = source.read_json("index.json")
        desc, manifest = select_manifest(source)
        config = source.read_json(blob_name(manifest["config"]["digest"]))
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        layers = []
        for i, layer in enumerate(manifest.get("layers", [])):
            layers.append({
                "digest": layer["digest"],
                "size": layer["size"],
                "media_type": layer.get("mediaType"),
                "diff_id": diff_ids[i] if i < len(diff_ids) else None,
            })
        annotations = (index.get("manifests") or [{}])[0].get("annotations", {})
        return {
            "manifest_digest": desc.digest,
            "config_digest": manifest["config"]["digest"],
            "architecture": config.get("architecture"),
            "os": config.get("os"),
            "variant": config.get("variant"),
            "ref_name": annotations.get(CONTAINERD_NAME),
            "tag": annotations.get(REF_NAME),
            "annotations": manifest.get("annotations", {}),
            "layers": layers,
            "size_bytes": sum(int(layer["size"]) for layer in layers),
            "config": config,
        }


def _layer_problem(source: ImageSource, name: str, index: int, media_type: str,
                   diff_id: str | None, limit: int | None, walk: LayerWalk) -> str | None:
    """What is wrong with one layer blob's bytes (media type, decompression, diff_id), if any."""
    with source.open(name) as raw:
        head = raw.read(TAR_BLOCK)
    try:
        compression = check_layer_media_type(media_type, head)
        with source.open(name) as raw:
            actual, _ = layer_diff_id(raw, compression, limit=limit, walk=walk)
    except LayerTooLargeError as exc:
        return f"{name}: layer {index} inflates past {exc.limit} bytes (reading stopped there)"
    except ValueError as exc:
        return f"{name}: layer {index}: {exc}"
    except (OSError, EOFError) as exc:
        return f"{name}: layer {index} does not decompress ({exc})"
    if diff_id is not None and actual != diff_id:
        return (f"{name}: uncompressed layer {index} hashes to {actual}, config "
                f"rootfs.diff_ids says {diff_id}")
    return None


def verify_image_archive(path: Path, *, max_layer_bytes: int | None = None) -> list[str]:
    """Every problem found in an image archive, one line each naming the blob or file.

    Each layer's bytes must be what its media type says; ``max_layer_bytes`` bounds how far one
    layer is inflated (None: no bound, for archives this host built).
    """
    try:
        with open_source(path) as source:
            return _verify(source, max_layer_bytes)
    except InputError as exc:
        return [exc.one_line()]


def _verify(source: ImageSource, max_layer_bytes: int | None) -> list[str]:
    problems: list[str] = []
    hashes: dict[str, tuple[str, int]] = {}

    def check_blob(desc: dict[str, Any], what: str) -> bool:
        digest, size = str(desc.get("digest", "")), int(desc.get("size", -1))
        name = blob_name(digest)
        if not source.exists(name):
            problems.append(f"{name}: missing ({what})")
            return False
        if name not in hashes:
            hashes[name] = source.hash(name)
        actual, actual_size = hashes[name]
        ok = True
        if actual != digest:
            problems.append(f"{name}: content hashes to {actual} ({what})")
            ok = False
        if actual_size != size:
            problems.append(f"{name}: {actual_size} bytes, descriptor says {size} ({what})")
            ok = False
        return ok

    if not source.exists("oci-layout"):
        problems.append("oci-layout: missing")
    elif source.read_json("oci-layout").get("imageLayoutVersion") != "1.0.0":
        problems.append("oci-layout: imageLayoutVersion is not 1.0.0")
    try:
        _, manifest = select_manifest(source)
    except (InputError, KeyError, ValueError, TypeError) as exc:
        return [*problems, f"index.json: {exc}"]
    index_entry = source.read_json("index.json")["manifests"][0]
    if not check_blob(index_entry, "manifest named by index.json"):
        return problems
    config_desc = manifest.get("config") or {}
    if not check_blob(config_desc, "config"):
        return problems
    config = source.read_json(blob_name(config_desc["digest"]))
    layers = manifest.get("layers") or []
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(layers):
        problems.append(f"{blob_name(config_desc['digest'])}: {len(diff_ids)} diff_ids for "
                        f"{len(layers)} layers")
    walk = LayerWalk()  # the path policy over every layer's member names, lowest first
    for i, layer in enumerate(layers):
        walk.next_layer()
        if not check_blob(layer, f"layer {i}"):
            continue
        problem = _layer_problem(source, blob_name(layer["digest"]), i,
                                 str(layer.get("mediaType", "")),
                                 diff_ids[i] if i < len(diff_ids) else None, max_layer_bytes,
                                 walk)
        if problem is not None:
            problems.append(problem)
    if source.exists("manifest.json"):
        legacy = source.read_json("manifest.json")
        entry = legacy[0] if isinstance(legacy, list) and legacy else {}
        if entry.get("Config") != blob_name(config_desc["digest"]):
            problems.append(f"manifest.json: Config is {entry.get('Config')!r}, expected "
                            f"{blob_name(config_desc['digest'])}")
        if entry.get("Layers") != [blob_name(layer["digest"]) for layer in layers]:
            problems.append("manifest.json: Layers differ from the OCI manifest's layers")
        if not entry.get("RepoTags"):
            problems.append("manifest.json: RepoTags is empty")
    else:
        problems.append("manifest.json: missing (docker load needs it)")
    for name in source.names():
        if name.startswith("blobs/sha256/") and name not in hashes:
            digest, _ = source.hash(name)
            if blob_name(digest) != name:
                problems.append(f"{name}: content hashes to {digest}")
    return problems
