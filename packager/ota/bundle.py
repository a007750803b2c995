"""Reading a built bundle into the pure description of a release (no repository writes here)."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.agent.paths import PathError, check_inside, check_relpath, mask_mode
from packager.agent.protocol import (
    BLOB_PREFIX,
    CUSTOM_KEY,
    FILE_PREFIX,
    RELEASE_SCHEMA,
    check_release,
    check_requires,
)
from packager.agent.protocol import check_percent as check_signed_percent
from packager.backends import get_backend
from packager.bundle.manifest import MANIFEST, SIGNATURE, sha256_file
from packager.bundle.verify import verify_bundle
from packager.errors import UnsupportedError, UsageError, VerifyError
from packager.targets import CHANNEL_FORM

# An image member stored as a content-addressed blob: the whole name (re.fullmatch).
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")


@dataclass(frozen=True)
class ObjectSource:
    """One repository target and where its bytes come from in the bundle."""

    target: str  # "blobs/sha256/<hex>" or "files/sha256/<hex>"
    sha256: str
    size: int
    bundle_file: Path
    tar_member: str | None = None  # set when the bytes are a member of image.tar


@dataclass(frozen=True)
class ReleasePlan:
    """One release to publish, from a verified bundle (:func:`plan_release`): its channel and
    sequence, compatibility, rollout ``percent`` (0-100), the objects to store (one per target,
    sorted) and the release document's bytes."""

    sequence: int
    channel: str
    name: str
    version: str
    platform: str
    device_class: str
    percent: int
    objects: tuple[ObjectSource, ...]
    document: bytes  # the release document (its own target)
    # compat.requires: what the device must be beyond platform and class (the backend's
    # release_compatibility, checked by packager.agent.protocol.check_requires); () = nothing.
    requires: tuple[tuple[str, str], ...] = ()

    @property
    def custom(self) -> dict[str, Any]:
        return release_custom(self, percent=self.percent, halted=False)


def compat(platform: str, device_class: str, requires: dict[str, str]) -> dict[str, Any]:
    """The release's compatibility as signed: ``requires`` only when there is any (a Linux
    release's custom metadata is what it was before requirements existed)."""
    found: dict[str, Any] = {"platform": platform, "device_class": device_class}
    if requires:
        found["requires"] = dict(sorted(requires.items()))
    return found


def release_custom(plan: ReleasePlan, *, percent: int, halted: bool) -> dict[str, Any]:
    """The ``custom`` field signed on a release's TUF target: ``{"edgepack": {...}}`` with
    the channel, sequence, name, version, compat, rollout percent and halted flag
    (:meth:`packager.agent.protocol.ReleaseInfo.from_custom` reads it back)."""
    return {
        CUSTOM_KEY: {
            "kind": "release",
            "channel": plan.channel,
            "sequence": plan.sequence,
            "name": plan.name,
            "version": plan.version,
            "compat": compat(plan.platform, plan.device_class, dict(plan.requires)),
            "percent": percent,
            "halted": halted,
        }
    }


def check_channel(channel: str) -> str:
    """``channel`` when it is a channel name, the whole string of
    :data:`packager.targets.CHANNEL_FORM` (lower-case letters, digits, '.', '_', '-', at most
    63, the first a letter or digit: what ``build --ota-channel`` and the agent accept);
    UsageError (exit 2) naming ``--channel`` otherwise (the value is a command-line option)."""
    if not CHANNEL_FORM.matches(channel):
        raise UsageError(f"--channel {channel!r}: must match {CHANNEL_FORM.description}")
    return channel


def check_percent(percent: float) -> int:
    """A rollout percentage as signed, a whole number 0-100
    (:func:`packager.agent.protocol.check_percent`); UsageError (exit 2) naming ``--percent``
    otherwise (the value is a command-line option; a percent read back from a repository is
    checked by :meth:`packager.agent.protocol.ReleaseInfo.from_custom` instead)."""
    try:
        return check_signed_percent(percent)
    except ValueError:
        raise UsageError(f"--percent {percent}: must be a whole number from 0 to 100") from None


def plan_release(bundle: Path, *, sequence: int, channel: str, percent: float) -> ReleasePlan:
    """Verify ``bundle`` as ``edgepack verify`` does (VerifyError, exit 8, for whatever
    :func:`~packager.bundle.verify.verify_bundle` refuses, same wording), check every blob
    name, and describe it as a release (from the manifest verified). ``channel`` and
    ``percent`` are the command line's: UsageError (exit 2) when malformed (:func:`check_channel`,
    :func:`check_percent`), before the bundle is read."""
    check_channel(channel)
    percent = check_percent(percent)
    # The one verifier, as `edgepack verify` runs it: path policy, checksums, confinement and
    # the device class's checks, over ONE read of manifest.json; what is published is that
    # manifest (its bytes' digest included), never a second copy from the disk.
    check = verify_bundle(bundle, get_backend)
    manifest, problems = check.manifest, check.problems
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{bundle}: {problems[0]}{more}", hint="rebuild it with 'edgepack build'",
                          details=tuple(problems[1:]))
    backend = get_backend(manifest.target.device_class)
    backend.check_publishable(bundle, manifest)
    try:
        # The publisher signs only requirements every agent can judge (known keys, valid values).
        requires = check_requires(backend.release_compatibility(bundle, manifest))
    except ValueError as exc:
        raise VerifyError(
            f"{bundle / MANIFEST}: release requirements: {exc}",
            hint="rebuild the bundle with 'edgepack build'",
        ) from exc
    image, platform = manifest.image, manifest.target.platform
    if image is None or platform is None:
        raise UnsupportedError(
            f"{bundle / MANIFEST}: a {manifest.target.device_class} bundle has no container"
            " image (image, target.platform); OTA publishes container images only"
        )
    name, version, device_class = manifest.name, manifest.version, manifest.target.device_class
    archive = image.archive
    try:
        image_path = check_inside(bundle, archive)
    except PathError as exc:
        raise VerifyError(f"{bundle / MANIFEST}: image.archive: {exc}") from exc
    objects: list[ObjectSource] = []
    members: list[dict[str, str]] = []
    with tarfile.open(image_path, "r:") as tar:
        for member in tar.getmembers():
            if member.isdir():
                continue
            try:
                check_relpath(member.name)
            except PathError as exc:
                raise VerifyError(f"{image_path}: member {exc}") from exc
            if not member.isfile():
                raise VerifyError(
                    f"{image_path}: member {member.name!r} is not a regular file (links and"
                    " devices are refused)"
                )
            match = _BLOB_NAME.fullmatch(member.name)
            if match:
                digest, prefix = match.group(1), BLOB_PREFIX
            else:
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has data
                digest, prefix = hashlib.sha256(handle.read()).hexdigest(), FILE_PREFIX
            source = ObjectSource(prefix + digest, digest, member.size, image_path, member.name)
            objects.append(source)
            members.append({"name": member.name, "target": source.target})
    files: list[dict[str, Any]] = []
    # The signature envelope travels too (unlisted: it signs the manifest), for the agent.
    signed = {SIGNATURE} if (bundle / SIGNATURE).is_file() else set()
    listed = {f.path: f.sha256 for f in manifest.files}
    for rel in sorted(listed.keys() - {archive} | {MANIFEST} | signed):
        path = bundle / rel
        # A listed file's digest is the manifest's, which verify_bundle above checked (no
        # second hashing pass); the manifest's is that of the bytes verified (the repository
        # refuses a file that no longer matches its digest); the signature is not listed.
        if rel in listed:
            digest, size = listed[rel], path.stat().st_size
        elif rel == MANIFEST:
            digest, size = check.read.sha256, len(check.read.data)
        else:
            digest, size = sha256_file(path), path.stat().st_size
        objects.append(ObjectSource(FILE_PREFIX + digest, digest, size, path))
        # The path policy's modes only: 0755 when executable, else 0644 (never setuid & co).
        files.append(
            {"path": rel, "target": FILE_PREFIX + digest, "mode": mask_mode(path.stat().st_mode)}
        )
    document = {
        "schema": RELEASE_SCHEMA,
        "sequence": sequence,
        "channel": channel,
        "name": name,
        "version": version,
        "compat": compat(platform, device_class, requires),
        "image": {"ref": image.ref, "digest": image.digest, "members": members},
        "files": files,
        "bundle": manifest.to_json(),
    }
    try:
        check_release(document)
    except PathError as exc:
        raise VerifyError(f"{bundle / MANIFEST}: {exc}") from exc
    unique = {o.target: o for o in objects}
    return ReleasePlan(
        sequence=sequence,
        channel=channel,
        name=name,
        version=version,
        platform=platform,
        device_class=device_class,
        percent=percent,
        objects=tuple(unique[t] for t in sorted(unique)),
        document=(json.dumps(document, indent=2, sort_keys=True) + "\n").encode(),
        requires=tuple(sorted(requires.items())),
    )
