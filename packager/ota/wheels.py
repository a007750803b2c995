"""What a bundle carries so install.sh can install the OTA agent offline on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import packager.agent
from packager.agent import AGENT_WHEELS
from packager.tools.pip import download

# The package name the agent gets on the device (it only uses relative imports, so any works).
DEVICE_PACKAGE = "edgepack_agent"


def agent_source_dir() -> Path:
    """The agent's sources: copy this directory to ``<lib>/edgepack_agent`` in the bundle."""
    return Path(packager.agent.__file__).parent


def download_agent_wheels(
    dest: Path, *, arch: Literal["arm64", "amd64"], python_version: str = "3.11"
) -> tuple[Path, ...]:
    """Download the agent's wheels and their dependencies (tuf, securesystemslib, cryptography,
    cffi, pycparser, urllib3) for manylinux ``arch`` CPython ``python_version`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    download(list(AGENT_WHEELS), dest, arch=arch, python_version=python_version, with_deps=True)
    return tuple(sorted(dest.glob("*.whl")))
