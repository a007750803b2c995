"""The host C compiler (``gcc``), used to build the model-update stub as a shared library."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from packager.tools.base import Tool

CC = Tool(name="gcc", executable="gcc", apt_package="gcc", alternatives=("cc",))


def shared_library(sources: Sequence[Path], output: Path, include: Path) -> Path:
    """Build a position-independent shared library from C sources (warnings are errors)."""
    CC.run(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-I", include,
            *sources, "-o", output])
    return output
