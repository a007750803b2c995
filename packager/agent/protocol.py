"""The repository layout and release format the publisher (packager.ota) writes.

Kept here as plain constants because the agent cannot import the publisher; a unit test checks
that both sides agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

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
