"""What ``edgepack verify`` checks in a Linux container bundle beyond its checksums: the image
archive's blobs (every digest and size its OCI index and manifest name) and that its manifest
digest is the one ``manifest.json`` records (``image.digest``)."""

from __future__ import annotations

from pathlib import Path

from packager.agent.paths import PathError, check_inside
from packager.bundle.manifest import MANIFEST, Manifest


def check_image(root: Path, manifest: Manifest) -> tuple[str, ...]:
    """Problems with the bundle's image, one line each naming the file; () when it is intact or
    the bundle has no image. A missing archive is the file check's to report (it is listed)."""
    from packager.image.builder import inspect_image_archive, verify_image_archive

    image = manifest.image
    if image is None:
        return ()
    try:
        archive = check_inside(root, image.archive)
    except PathError as exc:
        return (f"{MANIFEST}: image.archive: {exc}",)
    if not archive.is_file():
        return ()
    problems = tuple(f"{archive.name}: {p}" for p in verify_image_archive(archive))
    if problems:
        return problems
    digest = inspect_image_archive(archive)["manifest_digest"]
    if digest != image.digest:
        return (f"{archive.name}: image digest {digest}, manifest.json says {image.digest}",)
    return ()
