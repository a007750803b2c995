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


# What the JetPack container provides (not pip requirements of the image): imported only by the
# TensorRT runner, only inside a function, so that every other runtime path works without them.
CONTAINER_PROVIDED = {"tensorrt", "cuda"}
CONTAINER_IMPORTERS = {"tensorrt_runner.py"}


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in tree.body:
        for inner in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(inner, ast.Import):
                found |= {alias.name.split(".")[0] for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                found.add(inner.module.split(".")[0])
    return found


def test_runtime_imports_only_stdlib_numpy_onnxruntime_and_itself_relatively() -> None:
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY
    offenders = []
    for path in sorted(RUNTIME.rglob("*.py")):
        container = CONTAINER_PROVIDED if path.name in CONTAINER_IMPORTERS else set()
        for level, module in _imports(path):
            top = module.split(".")[0]
            if level == 0 and top not in allowed | container:
                offenders.append(f"{path.name}: import {module}")
        offenders += [
            f"{path.name}: module-level import {m}"
            for m in sorted(_module_level_imports(path) & CONTAINER_PROVIDED)
        ]
    assert offenders == []


def test_requirements_pin_exactly_the_third_party_imports() -> None:
    lines = (RUNTIME / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    names = {pin.split("==")[0] for pin in pins}
    assert names == THIRD_PARTY
    for pin in pins:
        _name, _, version = pin.partition("==")
        assert version and all(part.isdigit() for part in version.split(".")), pin
