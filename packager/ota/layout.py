"""Repository layout shared with the device agent (mirrored in packager/agent/protocol.py, which
cannot import this module; tests/unit/ota/test_layout.py checks the two agree)."""

from __future__ import annotations

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
RELEASE_PREFIX = "releases/"
BLOB_PREFIX = "blobs/sha256/"
FILE_PREFIX = "files/sha256/"
RELEASE_SCHEMA = "edgepack.release/v1"
REPORT_SCHEMA = "edgepack.ota-report/v1"
CUSTOM_KEY = "edgepack"
USB_SUBDIR = "edgepack-ota"


def release_target(channel: str, sequence: int) -> str:
    return f"{RELEASE_PREFIX}{channel}/{sequence:012d}.json"
