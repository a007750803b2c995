"""Target files the tests write: a target document (as ``tomllib`` reads it) back to TOML."""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """``value`` (a str, bool, int, float or a list of them) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"no TOML value for {type(value).__name__} here")


def dump_toml(doc: dict[str, Any]) -> str:
    """A target document as TOML: its top-level keys, then one ``[table]`` per table (a target
    file's shape: tables of values, no nested tables). ``tomllib.loads`` of it is ``doc``."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
