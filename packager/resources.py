"""Where the project's data folders (``templates/``, ``targets/``) live.

In a source checkout or an editable install they sit beside ``packager/``; a wheel install puts
them under ``<prefix>/share/edgepack/``. ``EDGEPACK_DATA_DIR`` overrides both.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path


@cache
def data_root() -> Path:
    override = os.environ.get("EDGEPACK_DATA_DIR")
    candidates = [Path(override)] if override else []
    candidates += [
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix) / "share" / "edgepack",
    ]
    for root in candidates:
        if (root / "targets").is_dir() and (root / "templates").is_dir():
            return root
    return candidates[0]


def targets_dir() -> Path:
    return data_root() / "targets"


def templates_dir() -> Path:
    return data_root() / "templates"


def runtime_dir() -> Path:
    """The on-device runtime package that is copied into images."""
    return Path(__file__).resolve().parent / "runtime"
