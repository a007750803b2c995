"""``edgepack verify``: re-check every checksum of a bundle and, for images, every digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from packager.bundle.manifest import check_files, read_manifest


def verify_bundle(root: Path) -> list[str]:
    """Every problem found, one line each naming the file; empty when the bundle is intact."""
    document = read_manifest(root)
    problems = check_files(root, document)
    image = document.get("image")
    if isinstance(image, dict):
        problems += _check_image(root, image)
    return problems


def _check_image(root: Path, image: dict[str, Any]) -> list[str]:
    from packager.image.builder import inspect_image_archive, verify_image_archive

    archive = root / str(image.get("archive", "image.tar"))
    if not archive.is_file():
        return []  # already reported as missing by the file check
    problems = [f"{archive.name}: {p}" for p in verify_image_archive(archive)]
    if problems:
        return problems
    info = inspect_image_archive(archive)
    if info["manifest_digest"] != image.get("digest"):
        problems.append(
            f"{archive.name}: image digest {info['manifest_digest']}, "
            f"manifest.json says {image.get('digest')}"
        )
    return problems
