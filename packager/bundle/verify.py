"""``edgepack verify``: re-check every checksum of a bundle and what its device class adds.

The device class's checks (an image's digests, ...) belong to its backend; this layer cannot
import backends, so callers pass the lookup (``packager.backends.get_backend``) in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

from packager.agent.confinement import ConfinementError, detached_args
from packager.bundle.manifest import (
    MANIFEST,
    Manifest,
    check_files,
    path_problems,
    read_manifest,
)
from packager.bundle.signing import verify_signature
from packager.errors import UnsupportedError, VerifyError


class DeviceChecks(Protocol):
    """The part of a backend verify needs (``packager.backends.base.Backend.verify_bundle``)."""

    def verify_bundle(self, root: Path, manifest: Manifest) -> Sequence[str]: ...


def verify_bundle(root: Path, device: Callable[[str], DeviceChecks] | None = None) -> list[str]:
    """Every problem found, one line each naming the file; empty when the bundle is intact.

    ``manifest.json`` is read and typed first (VerifyError, exit 8, for an unknown or missing
    field). The path policy (:mod:`packager.agent.paths`) is checked next and alone: a bundle
    that lists a path outside itself or holds a symlink is refused before anything reads
    through it. ``device`` (device class -> backend) adds the class's own checks; None checks
    checksums and confinement only."""
    manifest = read_manifest(root)
    problems = path_problems(root, manifest)
    if problems:
        return problems
    problems = check_files(root, manifest)
    try:
        detached_args(root)  # the container flags devices will use: allow-listed, floor kept
    except ConfinementError as exc:
        problems.append(str(exc))
    if device is not None:
        try:
            checks = device(manifest.target.device_class)
        except UnsupportedError as exc:  # a class this edgepack has no backend for
            raise VerifyError(
                f"{root / MANIFEST}: target.device_class: {exc.one_line()}",
                hint="verify it with the edgepack release that built it",
            ) from exc
        problems += checks.verify_bundle(root, manifest)
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
