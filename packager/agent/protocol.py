"""The repository layout and release format the publisher (packager.ota) writes.

Kept here as plain constants because the agent cannot import the publisher; a unit test checks
that both sides agree.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from .paths import PathError, check_mode, check_relpath

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
RELEASE_PREFIX = "releases/"
BLOB_PREFIX = "blobs/sha256/"
FILE_PREFIX = "files/sha256/"
RELEASE_SCHEMA = "edgepack.release/v1"
CUSTOM_KEY = "edgepack"
USB_SUBDIR = "edgepack-ota"
# One bucket per 0.01 %: a percentage with two decimals selects an exact set of buckets.
BUCKETS = 10000


# What a release may name, as whole strings (re.fullmatch): the bundle name (container name
# edgepack-<name>), the image reference handed to the engine, and the content-addressed targets.
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._/-]{0,254}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")
OBJECT_TARGET = re.compile(r"(blobs|files)/sha256/[0-9a-f]{64}")
# Files the agent writes itself in a staged release: a release may not name them.
RESERVED_FILES = frozenset({"image.tar", "release.json"})


def check_release(doc: Any) -> None:
    """Raise :class:`PathError` (naming the field and value) unless the release document's
    names obey the path policy: every file path and image member relative, normalised, unique,
    no file also a directory of another, not a reserved name; every mode 0644 or 0755; targets
    content-addressed; the name and image reference plain. The publisher runs it before signing
    and the agent again before staging: a validly signed but hostile release is refused."""
    if not isinstance(doc, dict):
        raise PathError("release document: not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PathError(f"name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    image = doc.get("image")
    if not isinstance(image, dict):
        raise PathError("image: missing")
    ref = image.get("ref")
    if not isinstance(ref, str) or not IMAGE_REF.fullmatch(ref):
        raise PathError(f"image.ref {ref!r}: not a plain image reference (name:tag)")
    for field, entries, key in (
        ("image.members", image.get("members"), "name"),
        ("files", doc.get("files"), "path"),
    ):
        if not isinstance(entries, list):
            raise PathError(f"{field}: expected a list")
        seen: set[str] = set()
        for entry in entries:
            if not isinstance(entry, dict):
                raise PathError(f"{field}: every entry must be an object")
            path = check_relpath(entry.get(key))
            if path in seen:
                raise PathError(f"{field}: {path!r} is listed twice")
            seen.add(path)
            target = entry.get("target")
            if not isinstance(target, str) or not OBJECT_TARGET.fullmatch(target):
                raise PathError(f"{field}: {path!r}: target {target!r} is not content-addressed")
            if field == "files":
                if path in RESERVED_FILES:
                    raise PathError(f"files: {path!r} is reserved for the agent's own use")
                try:
                    check_mode(entry.get("mode", 0o644))
                except PathError as exc:
                    raise PathError(f"files: {path!r}: {exc}") from exc
        for path in seen:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                if "/".join(parts[:depth]) in seen:
                    raise PathError(f"{field}: {path!r} is inside another listed file")


def release_target(channel: str, sequence: int) -> str:
    return f"{RELEASE_PREFIX}{channel}/{sequence:012d}.json"


def cohort_bucket(device_id: str) -> int:
    """A stable bucket in [0, BUCKETS) from the device id alone.

    It does not depend on the release, so raising a rollout's percentage only ever adds devices,
    and the same devices go first in every rollout (the canary group stays the canary group).
    """
    digest = hashlib.sha256(f"edgepack-cohort:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_cohort(device_id: str, percent: float) -> bool:
    return cohort_bucket(device_id) < round(percent * BUCKETS / 100)


@dataclass(frozen=True)
class ReleaseInfo:
    """The signed facts about a release, from its target's custom fields in targets.json."""

    target: str
    channel: str
    sequence: int
    name: str
    version: str
    platform: str
    device_class: str
    percent: float
    halted: bool

    @classmethod
    def from_custom(cls, target: str, custom: Any) -> ReleaseInfo | None:
        """None when the target is no edgepack release or its fields are malformed."""
        if not isinstance(custom, dict):
            return None
        data = custom.get(CUSTOM_KEY)
        if not isinstance(data, dict) or data.get("kind") != "release":
            return None
        try:
            compat = data["compat"]
            return cls(
                target=target,
                channel=str(data["channel"]),
                sequence=int(data["sequence"]),
                name=str(data["name"]),
                version=str(data["version"]),
                platform=str(compat["platform"]),
                device_class=str(compat["device_class"]),
                percent=float(data["percent"]),
                halted=bool(data["halted"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
