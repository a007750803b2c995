"""skopeo: inspects and copies container images between transports without a daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from packager.errors import ToolFailedError
from packager.tools.base import Tool

SKOPEO = Tool("skopeo", "skopeo", "skopeo")


def inspect_oci_archive(archive: Path, *, raw: bool = False) -> dict[str, Any]:
    """``skopeo inspect oci-archive:PATH``: digest, architecture, layers (or the raw manifest)."""
    args = ["inspect", *(["--raw"] if raw else []), f"oci-archive:{archive}"]
    proc = SKOPEO.run(args, timeout=300)
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise ToolFailedError(f"skopeo inspect {archive}: output is not JSON") from exc
    if not isinstance(doc, dict):
        raise ToolFailedError(f"skopeo inspect {archive}: expected a JSON object")
    return doc


def copy(source: str, dest: str) -> None:
    """``skopeo copy SOURCE DEST`` with transports spelled out (``oci-archive:...``)."""
    SKOPEO.run(["copy", "--quiet", source, dest], timeout=900)
