"""Reading a built bundle into the pure description of a release (no repository writes here)."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.bundle.manifest import MANIFEST, check_files, read_manifest, sha256_file
from packager.errors import UnsupportedError, VerifyError
from packager.ota.layout import BLOB_PREFIX, CUSTOM_KEY, FILE_PREFIX, RELEASE_SCHEMA

_BLOB_NAME = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


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
    sequence: int
    channel: str
    name: str
    version: str
    platform: str
    device_class: str
    percent: int
    objects: tuple[ObjectSource, ...]
    document: bytes  # the release document (its own target)

    @property
    def custom(self) -> dict[str, Any]:
        return release_custom(self, percent=self.percent, halted=False)


def release_custom(plan: ReleasePlan, *, percent: int, halted: bool) -> dict[str, Any]:
    return {
        CUSTOM_KEY: {
            "kind": "release",
            "channel": plan.channel,
            "sequence": plan.sequence,
            "name": plan.name,
            "version": plan.version,
            "compat": {"platform": plan.platform, "device_class": plan.device_class},
            "percent": percent,
            "halted": halted,
        }
    }


def check_channel(channel: str) -> str:
    if not _CHANNEL.match(channel):
        raise VerifyError(
            f"--channel {channel!r}: use lower-case letters, digits, '.', '_' or '-' (max 64)"
        )
    return channel


def check_percent(percent: float) -> int:
    # TUF's canonical JSON has no floats, so the signed percentage is a whole number.
    if percent != int(percent) or not 0 <= percent <= 100:
        raise VerifyError(f"--percent {percent}: must be a whole number from 0 to 100")
    return int(percent)


def plan_release(bundle: Path, *, sequence: int, channel: str, percent: float) -> ReleasePlan:
    """Verify ``bundle`` (every checksum, every blob name) and describe it as a release."""
    check_channel(channel)
    percent = check_percent(percent)
    manifest = read_manifest(bundle)
    problems = check_files(bundle, manifest)
    if problems:
        raise VerifyError(f"{bundle}: {problems[0]}", hint="rebuild it with 'edgepack build'")
    try:
        target = manifest["target"]
        image = manifest["image"]
        name, version = str(manifest["name"]), str(manifest["version"])
        platform, device_class = str(target["platform"]), str(target["device_class"])
        archive, ref = str(image["archive"]), str(image["ref"])
    except (KeyError, TypeError) as exc:
        raise VerifyError(f"{bundle / MANIFEST}: missing field {exc}") from exc
    if device_class != "linux-container":
        raise UnsupportedError(
            f"{bundle / MANIFEST}: target.device_class is {device_class!r}; OTA installs"
            " linux-container bundles only"
        )
    objects: list[ObjectSource] = []
    members: list[dict[str, str]] = []
    image_path = bundle / archive
    with tarfile.open(image_path, "r:") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            match = _BLOB_NAME.match(member.name)
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
    for rel in sorted({str(f["path"]) for f in manifest["files"]} - {archive} | {MANIFEST}):
        path = bundle / rel
        digest = sha256_file(path)
        objects.append(ObjectSource(FILE_PREFIX + digest, digest, path.stat().st_size, path))
        files.append(
            {"path": rel, "target": FILE_PREFIX + digest, "mode": path.stat().st_mode & 0o777}
        )
    document = {
        "schema": RELEASE_SCHEMA,
        "sequence": sequence,
        "channel": channel,
        "name": name,
        "version": version,
        "compat": {"platform": platform, "device_class": device_class},
        "image": {"ref": ref, "digest": image.get("digest"), "members": members},
        "files": files,
        "bundle": manifest,
    }
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
    )
