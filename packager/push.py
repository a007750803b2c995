"""``edgepack push BUNDLE... docker://REGISTRY/REPO:TAG``: a bundle's image to a registry; for
several bundles of one model (an arm64 Pi and an amd64 PC, say), one OCI image index naming every
platform, so that one tag serves a mixed fleet (issue 13).

Nothing is rebuilt: the manifests, configs and layers are the bundles' own bytes, so each
platform's digest in the registry is the ``image.digest`` of its bundle's manifest.json. The index
is written here (canonical JSON, platforms in order: the same bundles give the same index digest)
and skopeo copies it with ``--preserve-digests``; the registry's copy is read back and compared.

Each image's SBOM (the bundle's ``sbom.cdx.json``, issue 15) goes next to it as an OCI 1.1
referrer: an artifact manifest (``artifactType`` ``application/vnd.cyclonedx+json``, the empty
config, one layer holding the SBOM's exact bytes, ``subject`` the image manifest), listed in an
image index tagged ``sha256-<hex of the image digest>`` (the referrers tag schema of the OCI
distribution spec 1.1, for registries without the referrers API, such as Debian's
docker-registry 2.8; a registry with the API indexes the artifact by its ``subject`` itself).
The image is not touched (the SBOM records its digest, so it cannot be inside it), and the
artifact is not in ``image.tar`` (``docker load`` and podman expect one image there).
The tag's index entries carry no ``artifactType``: skopeo 1.9 (containers/image 5.23) drops
that field when it reads an index, so it refuses to copy one that has it with
``--preserve-digests`` (measured); a reader finds the type in the artifact manifest.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packager.backends import get_backend
from packager.bundle.manifest import ManifestRead
from packager.bundle.sbom import SBOM_FILE
from packager.bundle.verify import verify_bundle
from packager.digest import CHUNK
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
SBOM_ARTIFACT_TYPE = "application/vnd.cyclonedx+json"
# The OCI 1.1 empty descriptor (image-spec manifest.md, "Guidance for an Empty Descriptor").
MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
_EMPTY = b"{}"
_TITLE = "org.opencontainers.image.title"


@dataclass(frozen=True)
class PushRequest:
    """``edgepack push``'s arguments: the bundles, the destination, skopeo's registry options."""

    bundles: tuple[Path, ...]
    destination: str  # docker://REGISTRY/REPO:TAG
    options: RegistryOptions = field(default_factory=RegistryOptions)


@dataclass(frozen=True)
class PushedImage:
    """One bundle's image as pushed: its platform, its manifest digest (``sha256:...``) and the
    digest of its SBOM referrer."""

    bundle: Path
    platform: str  # "linux/arm64/v8"
    digest: str  # its manifest's, as in the bundle's manifest.json
    sbom: str | None = None  # the SBOM referrer manifest's digest; None: the bundle has no SBOM


@dataclass(frozen=True)
class PushResult:
    """A finished ``edgepack push``: the digest the tag names (an image manifest for one bundle,
    an OCI image index for several: ``media_type`` says which) and each image pushed."""

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
                {"bundle": str(i.bundle), "platform": i.platform, "digest": i.digest,
                 "sbom": i.sbom}
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


def referrers_tag(digest: str) -> str:
    """``sha256:HEX`` -> ``sha256-HEX``: the referrers tag schema (OCI distribution spec 1.1)."""
    return digest.replace(":", "-", 1)


def sbom_referrer(subject_digest: str, subject_size: int, sbom: bytes) -> tuple[bytes, bytes]:
    """(artifact manifest, referrers index) bytes, canonical JSON, for an SBOM of the image
    manifest ``subject_digest`` (``subject_size`` bytes): OCI image-spec 1.1 artifact guidance."""
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": SBOM_ARTIFACT_TYPE,
        "config": {"mediaType": MEDIA_EMPTY, "digest": "sha256:"
                   + hashlib.sha256(_EMPTY).hexdigest(), "size": len(_EMPTY), "data": "e30="},
        "layers": [{"mediaType": SBOM_ARTIFACT_TYPE,
                    "digest": "sha256:" + hashlib.sha256(sbom).hexdigest(), "size": len(sbom),
                    "annotations": {_TITLE: SBOM_FILE}}],
        "subject": {"mediaType": MEDIA_MANIFEST, "digest": subject_digest,
                    "size": subject_size},
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{"mediaType": MEDIA_MANIFEST,
                       "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                       "size": len(manifest)}],
    })
    return manifest, index


def stage_sbom_layout(
    sources: list[_Source], images: Path, layout: Path
) -> list[tuple[_Source, str, str, bytes]]:
    """An OCI layout of each bundle's SBOM referrer (bundles without ``sbom.cdx.json`` are left
    out), next to ``images`` (stage_layout's layout of their manifests): [(source, layout tag
    naming its referrers index, artifact manifest digest, the index's bytes)]."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    refs: list[dict[str, Any]] = []
    staged = []
    for n, src in enumerate(sources):
        path = src.bundle / SBOM_FILE
        if not path.is_file():
            continue
        sbom = path.read_bytes()
        subject_size = (images / blob_name(src.digest)).stat().st_size
        manifest, index = sbom_referrer(src.digest, subject_size, sbom)
        for blob in (_EMPTY, sbom, manifest, index):
            (layout / blob_name("sha256:" + hashlib.sha256(blob).hexdigest())).write_bytes(blob)
        tag = f"sbom-{n}"
        refs.append({"mediaType": MEDIA_INDEX, "digest": "sha256:"
                     + hashlib.sha256(index).hexdigest(), "size": len(index),
                     "annotations": {REF_NAME: tag}})
        staged.append((src, tag, "sha256:" + hashlib.sha256(manifest).hexdigest(), index))
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(
        canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": refs}))
    return staged


def _read_bundle(bundle: Path, loaded: ManifestRead | None = None) -> _Source:
    """``bundle`` verified (``loaded``: its manifest as the caller already read it) and
    described by the manifest verified: never a second read of manifest.json."""
    check = verify_bundle(bundle, get_backend, loaded=loaded)
    if check.problems:
        raise VerifyError(f"{bundle}: {check.problems[0]}", hint="rebuild or copy it again")
    manifest = check.manifest
    image = manifest.image
    if image is None:
        raise UsageError(
            f"{bundle}: a {manifest.target.device_class} bundle has no container image to push",
            hint="push Linux container bundles")
    if not _ARCHIVE_NAME.fullmatch(image.archive):
        raise VerifyError(
            f"{bundle}/manifest.json: image.archive {image.archive!r} is not a file name")
    return _Source(bundle, bundle / image.archive, manifest.name, manifest.version,
                   image.platform, image.digest)


def plan_sources(
    bundles: tuple[Path, ...], loaded: Mapping[Path, ManifestRead] | None = None
) -> list[_Source]:
    """The bundles' images in platform order, each bundle verified (VerifyError); UsageError
    unless they are one model and version on distinct platforms. ``loaded``: manifests the
    caller already read (:func:`packager.bundle.manifest.load_manifest`), verified as read."""
    if not bundles:
        raise UsageError("push: name at least one bundle")
    sources = [_read_bundle(b, (loaded or {}).get(b)) for b in bundles]
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
        shutil.copyfileobj(src, dst, CHUNK)
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
        # After the image is in and checked: no reader finds an SBOM whose subject is missing.
        sboms: dict[str, str] = {}
        sbom_layout = Path(tmp) / "sbom"
        repository = destination.rsplit(":", 1)[0]
        for src, tag, artifact, index in stage_sbom_layout(sources, layout, sbom_layout):
            target = f"{repository}:{referrers_tag(src.digest)}"
            push_layout(sbom_layout, tag, target, options=request.options)
            if inspect_raw(target, options=request.options) != index:
                raise ToolFailedError(f"{target}: the registry's SBOM index differs from the one "
                                      "edgepack pushed", hint="another push raced this one?")
            sboms[src.digest] = artifact
    return PushResult(destination, digest, media_type,
                      tuple(PushedImage(s.bundle, s.platform, s.digest, sboms.get(s.digest))
                            for s in sources))
