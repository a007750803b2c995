"""Where the project's data folders (``templates/``, ``targets/``) live.

In a source checkout or an editable install they sit beside ``packager/``; a wheel install puts
them under ``<prefix>/share/edgepack/``. ``EDGEPACK_DATA_DIR`` overrides both (and must hold
both folders).
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from packager.errors import UsageError

_DATA_FOLDERS = ("targets", "templates")


@cache
def data_root() -> Path:
    """The folder holding ``targets/`` and ``templates/``.

    ``EDGEPACK_DATA_DIR`` when set (not empty): UsageError (exit 2) naming it and the folder(s)
    it lacks, rather than a later, obscure failure or a silent fall back to another folder.
    Otherwise the first of the checkout beside ``packager/`` and ``<sys.prefix>/share/edgepack``
    that holds both; else the first of them, unchecked. Computed once per process (an error is
    not cached: each call checks again).
    """
    override = os.environ.get("EDGEPACK_DATA_DIR")
    if override:
        root = Path(override)
        missing = [name for name in _DATA_FOLDERS if not (root / name).is_dir()]
        if missing:
            lacks = " and ".join(f"{name}/" for name in missing)
            raise UsageError(
                f"EDGEPACK_DATA_DIR={override}: no {lacks} folder there",
                hint="point it at a folder holding targets/ and templates/, such as an "
                "installed edgepack's <prefix>/share/edgepack, or unset it",
            )
        return root
    candidates = [
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix) / "share" / "edgepack",
    ]
    for root in candidates:
        if all((root / name).is_dir() for name in _DATA_FOLDERS):
            return root
    return candidates[0]


def targets_dir() -> Path:
    """The target catalogue, ``targets/*.toml`` (see :func:`data_root`)."""
    return data_root() / "targets"


def templates_dir() -> Path:
    """The Jinja2 templates bundles are rendered from, ``templates/`` (see :func:`data_root`)."""
    return data_root() / "templates"


def runtime_dir() -> Path:
    """The on-device runtime package that is copied into images."""
    return Path(__file__).resolve().parent / "runtime"
