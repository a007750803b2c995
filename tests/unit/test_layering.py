"""The layers of packager/: a module may import its own layer or a lower one, never a higher one.

Every import counts: at module level, inside functions, under ``TYPE_CHECKING``. A module's layer
is the longest prefix of its dotted name in :data:`LAYERS`; a module no prefix covers fails the
test, so a new package is placed deliberately. The device packages (layer 0) are islands: they
import only themselves (tests/unit/agent/test_boundary.py holds the agent to the standard
library and its wheels too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import packager

PACKAGER = Path(packager.__file__).parent

# (layer, dotted-name prefixes, why they sit there), lowest first.
LAYERS: tuple[tuple[int, tuple[str, ...], str], ...] = (
    (0, ("packager.agent", "packager.runtime"),
     "device code, shipped alone: imports nothing else from packager; anything may import it"),
    (1, ("packager", "packager.__init__", "packager.errors", "packager.console", "packager.digest",
         "packager.resources", "packager.extras", "packager.staging", "packager.bounded"),
     "mechanics with no domain knowledge: errors, output, hashing, data files, staged writes, "
     "bounded reads"),
    (2, ("packager.render", "packager.tools"),
     "the one Jinja environment and the one wrapper per external program"),
    (3, ("packager.targets", "packager.models.info", "packager.fit", "packager.calibration"),
     "typed descriptions: a target, a model's signature, a fit report, a sample set"),
    (4, ("packager.models", "packager.image", "packager.ota.wheels"),
     "formats: reading and converting model files; OCI layers and images; the agent's wheels"),
    (5, ("packager.optimize",),
     "edgepack optimize: plans and runs quantization on models, measured on emulated targets"),
    (6, ("packager.bundle",),
     "what a bundle is: manifest, checksums, signatures, SBOM, provenance"),
    (7, ("packager.backends",),
     "one package per device class: fit, plan, execute, try and verify for that class"),
    (8, ("packager.plan", "packager.build", "packager.push", "packager.bake", "packager.ota",
         "packager.bundle.verify"),
     "device-neutral orchestration over the backends: plan and build, push, bake, OTA, verify"),
    (9, ("packager.commands",), "the click commands: parse options, call one layer-8 function"),
    (10, ("packager.cli", "packager.__main__"), "the entry point: prints errors, nothing else"),
)
ISLANDS = ("packager.agent", "packager.runtime")


def _layer_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for layer, prefixes, _ in LAYERS:
        for prefix in prefixes:
            assert prefix not in table, f"{prefix} is listed twice"
            table[prefix] = layer
    return table


TABLE = _layer_table()


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name: the longest listed prefix (``packager`` alone only
    names packager/__init__.py)."""
    if module == "packager":
        return TABLE["packager"]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        found = TABLE.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    base = root.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path = PACKAGER) -> list[tuple[int, str]]:
    """``(line, dotted module)`` for every packager import in ``path``, relative ones resolved;
    ``from pkg import sub`` names the submodule when ``sub`` is one."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub, root) else target))
    return list(dict.fromkeys((ln, name) for ln, name in found if name.split(".")[0] == root.name))


def violations(root: Path = PACKAGER) -> list[str]:
    """``file:line: MODULE (layer N) imports TARGET (layer M)`` for every upward import, every
    island import out of its island and every module without a layer."""
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        where = path.relative_to(root.parent)
        own = layer_of(module)
        if own is None:
            problems.append(f"{where}: {module} has no layer: add it to LAYERS")
            continue
        island = next((i for i in ISLANDS if module == i or module.startswith(i + ".")), None)
        for line, target in imports_of(path, root):
            theirs = layer_of(target)
            if island is not None and not (target == island or target.startswith(island + ".")):
                problems.append(f"{where}:{line}: {module} (device code) imports {target}")
            elif theirs is not None and theirs > own:
                problems.append(
                    f"{where}:{line}: {module} (layer {own}) imports {target} (layer {theirs})"
                )
    return problems


def test_no_module_imports_a_higher_layer() -> None:
    problems = violations()
    assert not problems, "lower layers import higher ones:\n" + "\n".join(problems)


def test_the_check_names_an_upward_import_inside_a_function(tmp_path: Path) -> None:
    root = tmp_path / "packager"
    (root / "backends").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "backends" / "__init__.py").write_text("")
    (root / "backends" / "base.py").write_text("from ..render import render\n")
    (root / "render.py").write_text(
        "import os\n\n\ndef render() -> None:\n    from packager.backends import base\n"
    )
    (root / "agent").mkdir()
    (root / "agent" / "__init__.py").write_text("")
    (root / "agent" / "x.py").write_text("from . import y\nfrom packager.errors import E\n")
    (root / "agent" / "y.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "newthing.py").write_text("")
    assert violations(root) == [
        "packager/agent/x.py:2: packager.agent.x (device code) imports packager.errors",
        "packager/newthing.py: packager.newthing has no layer: add it to LAYERS",
        "packager/render.py:5: packager.render (layer 2) imports packager.backends.base (layer 7)",
    ]


def test_every_layer_has_a_reason_and_the_table_is_ordered() -> None:
    numbers = [layer for layer, _, _ in LAYERS]
    assert numbers == sorted(numbers) == list(range(len(LAYERS)))
    assert all(reason for _, _, reason in LAYERS)
    assert all(prefix == "packager" or prefix.startswith("packager.") for prefix in TABLE)
