"""Rendering bundle files from ``templates/`` (Jinja2); each backend builds its own context.

One Jinja environment for every template, with one filter per language a value can land in.
Values are validated at load (``packager.targets`` forms, the build's flag checks); the filters
escape them again where they land, so a template never pastes text as code:

- ``sh``: a POSIX shell word (``shlex.quote``).
- ``systemd``: a value in a unit file setting (``Description=``): ``%`` specifiers doubled
  (systemd.unit(5), "Specifiers").
- ``systemd_arg``: one ``ExecStart=`` argument: double-quoted with ``\\`` and ``"`` escaped,
  ``%`` doubled and ``$`` doubled (systemd.service(5), "Command lines").
- ``py``: a Python literal (a JSON string is a valid Python string literal).
- ``c``: a C/C++ string literal, anything outside printable ASCII as a three-digit octal escape.
- ``comment``: one line of text for a ``#``, ``//`` or ``/* */`` comment.

A value no escaping can make safe on one line (a control character in a unit file, say) raises
:class:`UnsafeValue`: validation at load means a bundle never gets that far.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from packager.resources import templates_dir

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeValue(ValueError):
    """A value that cannot be placed where a template puts it (a bug: validation missed it)."""


def _text(value: object, where: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise UnsafeValue(f"{where}: {type(value).__name__} {value!r} is not text")
    text = str(value)
    if _CONTROL.search(text):
        raise UnsafeValue(f"{where}: {text!r} holds a control character")
    return text


def sh(value: object) -> str:
    """One POSIX shell word holding exactly ``value``."""
    return shlex.quote(_text(value, "shell word"))


def systemd(value: object) -> str:
    """A unit file setting's value: specifiers escaped; no line breaks or continuations."""
    text = _text(value, "unit file value")
    if text.endswith("\\"):
        raise UnsafeValue(f"unit file value: {text!r} would continue onto the next line")
    return text.replace("%", "%%")


def systemd_arg(value: object) -> str:
    """One ``ExecStart=`` argument, quoted: no specifier, variable or word splitting applies."""
    text = _text(value, "ExecStart argument")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def py(value: object) -> str:
    """A Python literal for a string, integer, boolean, None or a list of those."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # ASCII-only JSON escapes (\", \\, \n, \uXXXX) mean the same in a Python string literal.
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(py(v) for v in value) + "]"
    raise UnsafeValue(f"Python literal: {type(value).__name__} {value!r} is not supported")


def c(value: object) -> str:
    """A C/C++ string literal (``?`` escaped too, so no trigraph forms)."""
    if not isinstance(value, str):
        raise UnsafeValue(f"C string: {type(value).__name__} {value!r} is not a string")
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char in '\\"?':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def comment(value: object) -> str:
    """Text for one comment line: no line break, no ``*/``, no ``\\`` (a C line splice)."""
    text = _text(value, "comment")
    return text.replace("\\", "/").replace("*/", "* /")


FILTERS = {
    "sh": sh,
    "systemd": systemd,
    "systemd_arg": systemd_arg,
    "py": py,
    "c": c,
    "comment": comment,
}


@dataclass(frozen=True)
class RenderedFile:
    """A bundle file produced from a Jinja2 template with the backend's context."""

    path: str  # relative to the bundle root
    template: str  # relative to templates/, e.g. "linux/service.jinja"
    mode: int = 0o644


@cache
def environment() -> jinja2.Environment:
    """The one Jinja environment for every template. Block tags take their line with them
    (``trim_blocks``, ``lstrip_blocks``): a template writes each blank line it means to emit."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,  # a missing context key is a bug, not an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(FILTERS)
    return env


def render(template: str, context: Mapping[str, Any]) -> str:
    """``template`` (relative to templates/) rendered with ``context``; a key the template uses
    and ``context`` lacks raises jinja2.UndefinedError (StrictUndefined)."""
    return environment().get_template(template).render(**context)


def render_files(
    files: Iterable[RenderedFile], context: Mapping[str, Any], root: Path
) -> tuple[str, ...]:
    """Render each file under ``root`` with its mode; return the relative paths written."""
    written = []
    for item in files:
        dest = root / item.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(render(item.template, context), encoding="utf-8", newline="\n")
        os.chmod(dest, item.mode)
        written.append(item.path)
    return tuple(written)
