"""``edgepack push BUNDLE... docker://REGISTRY/REPO:TAG``: a bundle's image to a registry; for
several bundles of one model (an arm64 Pi and an amd64 PC, say), one OCI image index naming every
platform, so that one tag serves a mixed fleet (issue 13).

Nothing is rebuilt: the manifests, configs and layers are the bundles' own bytes, so each
platform's digest in the registry is the ``image.digest`` of its bundle's manifest.json. The index
is written here (canonical JSON, platforms in order: the same bundles give the same index digest)
and skopeo copies it with ``--preserve-digests``; the registry's copy is read back and compared.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.bundle.manifest import read_manifest
from packager.bundle.verify import verify_bundle
from packager.errors import ToolFailedError, UsageError, VerifyError
from packager.image.cache import canonical_json
from packager.image.layer import hash_file
from packager.image.oci import (
    MEDIA_INDEX,
    MEDIA_MANIFEST,
    REF_NAME,
    ImageSource,
    blob_name,
    open_source,
    select_manifest,
)
from packager.image.registry import parse_destination
from packager.tools.skopeo import RegistryOptions, inspect_raw, push_layout

_ARCHIVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LAYOUT_TAG = "push"


@dataclass(frozen=True)
class PushRequest:
    bundles: tuple[Path, ...]
    destination: str  # docker://REGISTRY/REPO:TAG
    options: RegistryOptions = field(default_factory=RegistryOptions)


@dataclass(frozen=True)
class PushedImage:
    bundle: Path
    platform: str  # "linux/arm64/v8"
    digest: str  # its manifest's, as in the bundle's manifest.json


@dataclass(frozen=True)
class PushResult:
    destination: str
    digest: str  # what the tag names: the image manifest (one bundle) or the index
    media_type: str
    images: tuple[PushedImage, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "digest": self.digest,
            "media_type": self.media_type,
            "images": [
                {"bundle": str(i.bundle), "platform": i.platform, "digest": i.digest}
                for i in self.images
            ],
        }


@dataclass(frozen=True)
class _Source:
    bundle: Path
    archive: Path
    name: str
    version: str
    platform: str
    digest: str


def _platform_json(platform: str) -> dict[str, str]:
    os_name, arch, *variant = platform.split("/")
    doc = {"os": os_name, "architecture": arch}
    if variant:
        doc["variant"] = variant[0]
    return doc


def _read_bundle(bundle: Path) -> _Source:
    problems = verify_bundle(bundle)
    if problems:
        raise VerifyError(f"{bundle}: {problems[0]}", hint="rebuild or copy it again")
    manifest = read_manifest(bundle)
    image = manifest.get("image")
    if not isinstance(image, dict):
        device_class = (manifest.get("target") or {}).get("device_class", "this")
        raise UsageError(f"{bundle}: a {device_class} bundle has no container image to push",
                         hint="push Linux container bundles")
    archive = str(image.get("archive", ""))
    if not _ARCHIVE_NAME.fullmatch(archive):
        raise VerifyError(f"{bundle}/manifest.json: image.archive {archive!r} is not a file name")
    return _Source(bundle, bundle / archive, str(manifest.get("name")),
                   str(manifest.get("version")), str(image["platform"]), str(image["digest"]))


def plan_sources(bundles: tuple[Path, ...]) -> list[_Source]:
    """The bundles' images in platform order; UsageError unless they are one model and version
    on distinct platforms."""
    if not bundles:
        raise UsageError("push: name at least one bundle")
    sources = [_read_bundle(b) for b in bundles]
    first = sources[0]
    for other in sources[1:]:
        if (other.name, other.version) != (first.name, first.version):
            raise UsageError(
                f"{other.bundle}: model {other.name} {other.version}, but {first.bundle} is "
                f"{first.name} {first.version}",
                hint="one push (one tag) carries one model version; push the others separately",
            )
    seen: dict[str, Path] = {}
    for source in sources:
        if source.platform in seen:
            raise UsageError(
                f"{source.bundle}: {source.platform} again (as {seen[source.platform]})",
                hint="one bundle per platform in one index",
            )
        seen[source.platform] = source.bundle
    return sorted(sources, key=lambda s: s.platform)


def index_document(entries: list[tuple[str, int, str]]) -> dict[str, Any]:
    """An OCI image index of (manifest digest, size, platform) in the order given."""
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {"mediaType": MEDIA_MANIFEST, "digest": digest, "size": size,
             "platform": _platform_json(platform)}
            for digest, size, platform in entries
        ],
    }


def _copy_blob(source: ImageSource, digest: str, layout: Path) -> None:
    target = layout / blob_name(digest)
    if target.exists():
        return
    name = blob_name(digest)
    if not source.exists(name):
        raise VerifyError(f"{source.label}: blob {name} is missing")
    with source.open(name) as src, target.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if hash_file(target)[0] != digest:
        raise VerifyError(f"{source.label}: blob {name} does not match its digest")


def stage_layout(
    sources: list[_Source], layout: Path, tag: str = _LAYOUT_TAG
) -> tuple[str, str]:
    """Write an OCI layout of every image (and, for several, their index) under ``layout``,
    naming it ``tag``; return the digest and media type of what the tag names. Also the
    ``oci-layout://`` named contexts of ``edgepack bake`` (packager/bake.py)."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    entries = []
    for src in sources:
        with open_source(src.archive, str(src.archive)) as image:
            desc, manifest = select_manifest(image)
            if desc.digest != src.digest:
                raise VerifyError(f"{src.archive}: holds {desc.digest}, its manifest.json says "
                                  f"{src.digest}", hint="rebuild the bundle")
            if desc.media_type != MEDIA_MANIFEST:
                raise VerifyError(f"{src.archive}: {desc.media_type} is not an OCI manifest")
            # The index's platform comes from the image's own (hashed) config, which must be
            # what manifest.json says: a device pulls what its platform entry names.
            config = image.read_json(blob_name(str(manifest["config"]["digest"])))
            platform = "/".join(
                str(part) for part in (config.get("os"), config.get("architecture"),
                                       config.get("variant")) if part
            )
            if platform != src.platform:
                raise VerifyError(f"{src.archive}: the image is {platform}, its manifest.json "
                                  f"says {src.platform}", hint="rebuild the bundle")
            for blob in [desc.digest, manifest["config"]["digest"],
                         *(layer["digest"] for layer in manifest.get("layers") or [])]:
                _copy_blob(image, str(blob), layout)
            entries.append((desc.digest, desc.size, src.platform))
    if len(entries) == 1:
        digest, size, _ = entries[0]
        media_type = MEDIA_MANIFEST
    else:
        index_bytes = canonical_json(index_document(entries))
        digest = "sha256:" + hashlib.sha256(index_bytes).hexdigest()
        (layout / blob_name(digest)).write_bytes(index_bytes)
        size, media_type = len(index_bytes), MEDIA_INDEX
    top: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    top["annotations"] = {REF_NAME: tag}
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(
        canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [top]}))
    return digest, media_type


def push_bundles(request: PushRequest) -> PushResult:
    """Push, then read the tag back: ToolFailedError unless the registry holds these bytes."""
    destination = parse_destination(request.destination)
    sources = plan_sources(request.bundles)
    with tempfile.TemporaryDirectory(prefix="edgepack-push-") as tmp:
        layout = Path(tmp) / "layout"
        digest, media_type = stage_layout(sources, layout)
        push_layout(layout, _LAYOUT_TAG, destination, options=request.options)
    pushed = inspect_raw(destination, options=request.options)
    actual = "sha256:" + hashlib.sha256(pushed).hexdigest()
    if actual != digest:
        raise ToolFailedError(f"{destination}: the registry holds {actual}, edgepack pushed "
                              f"{digest}", hint="another push to the same tag raced this one?")
    return PushResult(destination, digest, media_type,
                      tuple(PushedImage(s.bundle, s.platform, s.digest) for s in sources))
