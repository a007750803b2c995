"""The agent runs on devices without the rest of edgepack: it may import only the standard
library, its own modules (relatively) and its wheels (tuf, securesystemslib, urllib3)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import packager.agent

AGENT = Path(packager.agent.__file__).parent
ALLOWED_THIRD_PARTY = {"tuf", "securesystemslib", "urllib3", "cryptography"}


def _imports(path: Path) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_agent_imports_only_stdlib_its_wheels_and_itself() -> None:
    files = sorted(AGENT.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for module, level in _imports(path):
            if level > 0:
                continue  # relative: inside the agent
            top = module.split(".")[0]
            assert top != "packager", f"{path.name} imports {module}: use a relative import"
            assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY, (
                f"{path.name} imports {module}, which the device does not have"
            )


def test_only_the_engine_module_starts_processes() -> None:
    for path in sorted(AGENT.glob("*.py")):
        uses = any(module == "subprocess" for module, _ in _imports(path))
        assert uses == (path.name == "engine.py"), path.name
