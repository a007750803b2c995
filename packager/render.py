"""Rendering bundle files from ``templates/`` (Jinja2); each backend builds its own context."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from packager.backends.base import RenderedFile
from packager.resources import templates_dir


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,  # a missing context key is a bug, not an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, context: Mapping[str, Any]) -> str:
    return environment().get_template(template).render(**context)


def render_files(
    files: Iterable[RenderedFile], context: Mapping[str, Any], root: Path
) -> tuple[str, ...]:
    """Render each file under ``root`` with its mode; return the relative paths written."""
    written = []
    for item in files:
        dest = root / item.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(render(item.template, context), encoding="utf-8")
        os.chmod(dest, item.mode)
        written.append(item.path)
    return tuple(written)
