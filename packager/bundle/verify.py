"""``edgepack verify``: re-check every checksum of a bundle and, for images, every digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

from packager.agent.confinement import ConfinementError, detached_args
from packager.agent.paths import PathError, check_inside
from packager.bundle.manifest import MANIFEST, check_files, path_problems, read_manifest
from packager.bundle.signing import verify_signature


def verify_bundle(root: Path) -> list[str]:
    """Every problem found, one line each naming the file; empty when the bundle is intact.

    The path policy (:mod:`packager.agent.paths`) is checked first and alone: a bundle that
    lists a path outside itself or holds a symlink is refused before anything reads through it."""
    document = read_manifest(root)
    problems = path_problems(root, document)
    if problems:
        return problems
    problems = check_files(root, document)
    try:
        detached_args(root)  # the container flags devices will use: allow-listed, floor kept
    except ConfinementError as exc:
        problems.append(str(exc))
    image = document.get("image")
    if isinstance(image, dict):
        problems += _check_image(root, image)
    return problems


def _check_image(root: Path, image: dict[str, Any]) -> list[str]:
    from packager.image.builder import inspect_image_archive, verify_image_archive

    try:
        archive = check_inside(root, str(image.get("archive", "image.tar")))
    except PathError as exc:
        return [f"{MANIFEST}: image.archive: {exc}"]
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


def verify_attestations(root: Path, key: SSlibKey | None, *, require: bool) -> dict[str, Any]:
    """What the bundle says about who built it, what is inside and how (``--json``'s
    ``attestations``): the signature (checked against ``key`` when given; VerifyError, exit 8,
    when it is missing or wrong, or missing under ``require``), the SBOM's package count and
    the provenance's inputs (its own signature checked with the same key)."""
    from packager.bundle.provenance import provenance_summary
    from packager.bundle.sbom import sbom_summary

    signature = verify_signature(root, key, require=require)
    return {
        "signature": signature.to_json(),
        "sbom": sbom_summary(root),
        "provenance": provenance_summary(root, key),
    }
