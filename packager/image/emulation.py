"""Data for running arm64 images under qemu-user on an x86 host.

qemu-user passes the host's /proc/cpuinfo through; onnxruntime parses it for ARM feature flags and
crashes on x86 text, so an emulated container gets a Cortex-A72 (Raspberry Pi 4) cpuinfo
bind-mounted over /proc/cpuinfo instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CPUINFO_MOUNT = "/proc/cpuinfo"


def arm64_cpuinfo() -> Path:
    """The packaged Cortex-A72 cpuinfo, a real file for ``-v PATH:/proc/cpuinfo:ro``."""
    path = Path(str(resources.files("packager.image") / "data" / "cpuinfo-arm64.txt"))
    if not path.is_file():
        raise FileNotFoundError(f"edgepack installation is missing {path}")
    return path
