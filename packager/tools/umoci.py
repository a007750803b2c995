"""umoci: unpacks an OCI image layout into a runtime bundle (rootfs + config.json), daemonless."""

from __future__ import annotations

from pathlib import Path

from packager.tools.base import Tool

UMOCI = Tool("umoci", "umoci", "umoci")


def unpack(layout: Path, ref: str, bundle: Path) -> Path:
    """Unpack ``layout:ref`` into ``bundle``; returns the bundle's ``rootfs`` directory."""
    UMOCI.run(["unpack", "--image", f"{layout}:{ref}", bundle], timeout=900)
    return bundle / "rootfs"
