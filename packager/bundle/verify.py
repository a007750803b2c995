"""``edgepack verify``: re-check every checksum of a bundle and what its device class adds.

The device class's checks (an image's digests, ...) belong to its backend; this layer cannot
import backends, so callers pass the lookup (``packager.backends.get_backend``) in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

from packager.agent.confinement import ConfinementError, detached_args
from packager.bundle.manifest import (
    MANIFEST,
    Manifest,
    ManifestRead,
    check_files,
    load_manifest,
    path_problems,
)
from packager.bundle.signing import SignatureReport, verify_signature
from packager.errors import UnsupportedError, VerifyError


class DeviceChecks(Protocol):
    """The part of a backend verify needs (``packager.backends.base.Backend.verify_bundle``)."""

    def verify_bundle(self, root: Path, manifest: Manifest) -> Sequence[str]: ...


@dataclass(frozen=True)
class BundleCheck:
    """What :func:`verify_bundle` found: the typed manifest it checked (the one a command then
    acts on: never read again), every problem (one line each naming the file; empty when the
    bundle is intact), the read it came from (manifest.json's exact bytes and their sha256:
    what the signature and the file checks covered) and the signature's report when one was
    checked."""

    manifest: Manifest
    problems: tuple[str, ...]
    read: ManifestRead = field(repr=False)
    signature: SignatureReport | None = None


def verify_bundle(
    root: Path,
    device: Callable[[str], DeviceChecks] | None = None,
    *,
    key: SSlibKey | None = None,
    require_signature: bool = False,
    loaded: ManifestRead | None = None,
) -> BundleCheck:
    """Check ``root`` against ONE read of its manifest.json (:func:`load_manifest`; ``loaded``:
    that read, made by a caller that had to look at the manifest first).

    ``manifest.json`` is read and typed first (InputError, exit 3, when ``root`` is not a
    directory; VerifyError, exit 8, for an unknown or missing field). With ``key`` or
    ``require_signature`` the signature comes next, over those same bytes
    (:func:`packager.bundle.signing.verify_signature`: VerifyError, exit 8): a bundle whose
    files, SHA256SUMS and manifest.json were regenerated together passes every checksum, and
    only the signature can tell. The path policy (:mod:`packager.agent.paths`) is checked next
    and alone: a bundle that lists a path outside itself or holds a symlink is refused before
    anything reads through it. ``device`` (device class -> backend) adds the class's own
    checks; None checks checksums and confinement only."""
    read = load_manifest(root) if loaded is None else loaded
    manifest = read.manifest
    signature = None
    if key is not None or require_signature:
        signature = verify_signature(root, key, require=require_signature, manifest=read.data)
    problems = path_problems(root, manifest)
    if problems:
        return BundleCheck(manifest, tuple(problems), read, signature)
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
    return BundleCheck(manifest, tuple(problems), read, signature)


def verify_attestations(
    root: Path, key: SSlibKey | None, signature: SignatureReport | None
) -> dict[str, Any]:
    """What the bundle says about who built it, what is inside and how (``--json``'s
    ``attestations``): the signature (``signature``: :attr:`BundleCheck.signature`, the report
    of the check made over the manifest bytes verified; None: only whether there is one, and
    its keyid, unverified), the SBOM's package count and the provenance's inputs (its own
    signature checked with ``key`` when given)."""
    from packager.bundle.provenance import provenance_summary
    from packager.bundle.sbom import sbom_summary
    from packager.bundle.signing import unverified_signature

    if signature is None:
        signature = unverified_signature(root)
    return {
        "signature": signature.to_json(),
        "sbom": sbom_summary(root),
        "provenance": provenance_summary(root, key),
    }
