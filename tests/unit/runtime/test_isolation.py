"""packager/runtime is copied into images as ``edgepack_runtime``: it must stand alone."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[3] / "packager" / "runtime"
# The image installs exactly these next to the standard library (requirements.txt).
THIRD_PARTY = {"numpy", "onnxruntime"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) for every import; level > 0 is relative."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_runtime_modules_exist() -> None:
    names = {path.stem for path in RUNTIME.glob("*.py")}
    assert {"__init__", "server", "healthcheck", "config", "protocol", "model"} <= names


def test_runtime_imports_only_stdlib_numpy_onnxruntime_and_itself_relatively() -> None:
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY
    offenders = []
    for path in sorted(RUNTIME.rglob("*.py")):
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level == 0 and top not in allowed:
                offenders.append(f"{path.name}: import {module}")
    assert offenders == []


def test_requirements_pin_exactly_the_third_party_imports() -> None:
    lines = (RUNTIME / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    names = {pin.split("==")[0] for pin in pins}
    assert names == THIRD_PARTY
    for pin in pins:
        _name, _, version = pin.partition("==")
        assert version and all(part.isdigit() for part in version.split(".")), pin
