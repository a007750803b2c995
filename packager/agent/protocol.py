"""The OTA release contract: the repository layout, the release document's path policy and the
signed release facts, for both sides.

The agent (on the device) imports nothing from the rest of packager, so the contract lives here
and the publisher (``packager.ota``) imports it: one definition, no copy to drift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from .paths import PathError, check_mode, check_relpath

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
RELEASE_PREFIX = "releases/"
BLOB_PREFIX = "blobs/sha256/"
FILE_PREFIX = "files/sha256/"
RELEASE_SCHEMA = "edgepack.release/v1"
REPORT_SCHEMA = "edgepack.ota-report/v1"
CUSTOM_KEY = "edgepack"
USB_SUBDIR = "edgepack-ota"
# One bucket per 0.01 %: every whole percentage selects an exact set of buckets. Changing the
# count would move devices between cohorts.
BUCKETS = 10000


# What a release may name, as whole strings (re.fullmatch): the bundle name (container name
# edgepack-<name>), the image reference handed to the engine, and the content-addressed targets.
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._/-]{0,254}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")
OBJECT_TARGET = re.compile(r"(blobs|files)/sha256/[0-9a-f]{64}")
# A channel name, as a whole string (re.fullmatch): the one definition of the form, shared by the
# build's --ota-channel and the publisher's --channel (packager.targets.CHANNEL_FORM is this
# pattern) and by the agent, which takes no release whose signed channel is not one. It lands
# in the target path releases/<channel>/<sequence>.json: no '/', no line break, no leading dot.
CHANNEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Files the agent writes itself in a staged release: a release may not name them.
RESERVED_FILES = frozenset({"image.tar", "release.json"})

# A release's device requirements beyond platform and device class (``compat.requires``): what a
# backend's ``release_compatibility`` returns, checked by the agent against the device itself
# (packager/agent/device.py). Keys and values are whole strings; the publisher signs only known
# keys with valid values, and an agent that meets a key it does not know skips the release (never
# installs it on a guess). l4t_min / l4t_below: the L4T releases the bundle runs on, lowest
# (inclusive) and first one above (exclusive), as in ``/etc/nv_tegra_release``; sm: the GPU's
# CUDA compute capability as NN (8.7 -> "87").
L4T_RELEASE = re.compile(r"r(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")
REQUIREMENTS: dict[str, re.Pattern[str]] = {
    "l4t_min": L4T_RELEASE,
    "l4t_below": L4T_RELEASE,
    "sm": re.compile(r"[1-9][0-9]{1,2}"),
}
# The shape any agent accepts before judging the keys (a newer publisher may sign keys this
# agent does not know: those releases are skipped with a reason, not dropped in silence).
MAX_REQUIREMENTS = 16
_REQUIREMENT_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_REQUIREMENT_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def parse_requires(value: object) -> dict[str, str]:
    """``compat.requires`` as signed: absent (None) -> {}; else at most
    :data:`MAX_REQUIREMENTS` entries of a short lower-case key and a short plain value (both
    whole strings). ValueError naming the entry otherwise. Keys are not judged here: see
    :func:`check_requires`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"requires: expected an object, not {type(value).__name__}")
    if len(value) > MAX_REQUIREMENTS:
        raise ValueError(f"requires: {len(value)} entries (at most {MAX_REQUIREMENTS})")
    parsed: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _REQUIREMENT_KEY.fullmatch(key):
            raise ValueError(f"requires: key {str(key)[:40]!r} is not a plain lower-case name")
        if not isinstance(item, str) or not _REQUIREMENT_VALUE.fullmatch(item):
            raise ValueError(f"requires.{key}: value {str(item)[:70]!r} is not a plain value")
        parsed[key] = item
    return dict(sorted(parsed.items()))


def check_requires(value: object) -> dict[str, str]:
    """:func:`parse_requires`, then every key one of :data:`REQUIREMENTS` with a value its
    pattern matches whole, and l4t_min below l4t_below when both are given. ValueError naming
    the key and the value otherwise (the publisher refuses to sign it; the agent skips it)."""
    parsed = parse_requires(value)
    for key, item in parsed.items():
        pattern = REQUIREMENTS.get(key)
        if pattern is None:
            known = ", ".join(sorted(REQUIREMENTS))
            raise ValueError(f"requires.{key}: unknown requirement (this agent knows {known})")
        if not pattern.fullmatch(item):
            raise ValueError(f"requires.{key}: {item!r} is not a valid value")
    if "l4t_min" in parsed and "l4t_below" in parsed:
        if l4t_tuple(parsed["l4t_min"]) >= l4t_tuple(parsed["l4t_below"]):
            raise ValueError(
                f"requires: l4t_min {parsed['l4t_min']} is not below l4t_below"
                f" {parsed['l4t_below']}"
            )
    return parsed


def l4t_tuple(release: str) -> tuple[int, int, int]:
    """``"r36.3.0"`` -> (36, 3, 0); ValueError unless :data:`L4T_RELEASE` matches it whole."""
    match = L4T_RELEASE.fullmatch(release)
    if match is None:
        raise ValueError(f"{release!r} is not an L4T release like r36.3.0")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def release_target(channel: str, sequence: int) -> str:
    """The TUF target path of a release document: ``releases/<channel>/<sequence:012d>.json``."""
    return f"{RELEASE_PREFIX}{channel}/{sequence:012d}.json"


def cohort_bucket(device_id: str) -> int:
    """A stable bucket in [0, BUCKETS) from the device id alone.

    It does not depend on the release, so raising a rollout's percentage only ever adds devices,
    and the same devices go first in every rollout (the canary group stays the canary group).
    """
    digest = hashlib.sha256(f"edgepack-cohort:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_cohort(device_id: str, percent: int) -> bool:
    """Whether the device is in a rollout to ``percent`` (0-100) of devices."""
    return cohort_bucket(device_id) < percent * BUCKETS // 100


def check_percent(value: object) -> int:
    """A rollout percentage as signed: a whole number 0-100 (TUF's canonical JSON has no floats).
    ValueError otherwise."""
    problem = ValueError(f"percent {value!r}: not a whole number from 0 to 100")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise problem
    if not 0 <= value <= 100 or value != int(value):  # NaN and infinities fail the range
        raise problem
    return int(value)


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
    percent: int  # 0-100, whole: see check_percent
    halted: bool
    # compat.requires (parse_requires: bounded, plain; keys judged by the agent): {} = none.
    requires: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_custom(cls, target: str, custom: Any) -> ReleaseInfo | None:
        """None when the target is no edgepack release or its fields are malformed (a channel
        that is no :data:`CHANNEL`, a percent that is no whole 0-100, ...)."""
        if not isinstance(custom, dict):
            return None
        data = custom.get(CUSTOM_KEY)
        if not isinstance(data, dict) or data.get("kind") != "release":
            return None
        channel = data.get("channel")
        if not isinstance(channel, str) or not CHANNEL.fullmatch(channel):
            return None  # no channel the publisher can sign (see CHANNEL)
        try:
            compat = data["compat"]
            return cls(
                target=target,
                channel=channel,
                sequence=int(data["sequence"]),
                name=str(data["name"]),
                version=str(data["version"]),
                platform=str(compat["platform"]),
                device_class=str(compat["device_class"]),
                percent=check_percent(data["percent"]),
                halted=bool(data["halted"]),
                requires=parse_requires(compat.get("requires")),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
