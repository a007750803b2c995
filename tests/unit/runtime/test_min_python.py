"""packager/runtime runs on the JetPack container's own CPython: 3.8 on JetPack 5, 3.10 on 6.

TensorRT's Python bindings exist only for the base's system CPython, so the runtime copied into a
JetPack 5 image (packager/backends/jetson/container.py) must import and serve on CPython 3.8.
No CPython 3.8 exists on this machine, so the rule is checked statically, two ways:

- vermin 1.6 (``-t=3.8-``): the standard library, builtins and syntax by the version that
  introduced them (``zip(strict=)``, ``str.removeprefix``, ``functools.cache``, ...);
- what vermin's default mode does not see: expressions CPython evaluates at run time that
  subscript a builtin or ``collections.abc`` class (``dict[str, str]`` as a base class,
  ``Callable[...]`` as a module-level alias: TypeError on 3.8) or join types with ``|``
  (``isinstance(x, int | str)``: TypeError before 3.10). Annotations are not evaluated (every
  runtime module has ``from __future__ import annotations``), nor ``if TYPE_CHECKING:`` blocks.
  (vermin's ``--eval-annotations`` / ``--feature union-types`` report those annotations too,
  hence this check.)

jetson_preflight.py runs on the JetPack 4 HOST's CPython 3.6 and is held to 3.6 here too
(tests/unit/runtime/test_jetson_preflight.py parses it with 3.6's grammar).
"""

from __future__ import annotations

import ast
import builtins
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parents[3] / "packager" / "runtime"
PREFLIGHT = RUNTIME / "jetson_preflight.py"
# JetPack 5 (L4T r35, Ubuntu 20.04): CPython 3.8; JetPack 4 (r32, Ubuntu 18.04): 3.6.
RUNTIME_TARGET = (3, 8)
PREFLIGHT_TARGET = (3, 6)
_SUBSCRIPT_NEEDS_39 = {"list", "dict", "tuple", "set", "frozenset", "type"}
_ABC_GENERICS = {
    "Callable", "Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable",
    "Iterator", "Generator", "Collection", "Container", "Set", "MutableSet", "Awaitable",
    "Coroutine", "AsyncIterator", "AsyncIterable", "AsyncGenerator", "Reversible",
    "KeysView", "ValuesView", "ItemsView", "MappingView", "Hashable", "Sized", "Buffer",
    "deque", "defaultdict", "OrderedDict", "Counter", "ChainMap",
}  # fmt: skip


def run_vermin(target: tuple[int, int], *paths: Path) -> list[str]:
    """vermin's violations of ``target`` as ``file:line: feature (requires X.Y)`` lines."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
         f"-t={target[0]}.{target[1]}-", "--no-tips", "--violations", "--format", "parsable",
         *map(str, paths)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    found = []
    for line in proc.stdout.splitlines():
        # parsable: file:line:column:py2:py3:feature; the per-file and final summary lines have
        # no line number or no feature.
        parts = line.rsplit(":", 5)
        if len(parts) == 6 and parts[1] and parts[5]:
            found.append(f"{Path(parts[0]).name}:{parts[1]}: {parts[5]} (requires {parts[4]})")
    assert proc.returncode in (0, 1) and (proc.returncode == 0) == (not found), (
        f"vermin exited {proc.returncode}: {proc.stderr[-2000:]}{proc.stdout[-2000:]}"
    )
    return found


def _annotation_nodes(tree: ast.AST) -> set[int]:
    nodes: set[int] = set()
    for node in ast.walk(tree):
        annotations: list[ast.expr] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            every += [a for a in (args.vararg, args.kwarg) if a is not None]
            annotations += [a.annotation for a in every if a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            nodes |= {id(inner) for inner in ast.walk(annotation)}
    return nodes


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:`` (never run); its ``else:`` runs and is checked."""
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in {
            "TYPE_CHECKING", "typing.TYPE_CHECKING"
        }:
            for statement in node.body:
                nodes |= {id(inner) for inner in ast.walk(statement)}
    return nodes


def _is_type_operand(node: ast.expr) -> bool:
    """Looks like a type in ``A | B``: None, a builtin type, a CamelCase name or a subscript (not
    an ALL_CAPS flag such as ``os.O_RDONLY``)."""
    if isinstance(node, ast.Constant):
        return node.value is None
    if isinstance(node, ast.Subscript):
        return True
    name = node.id if isinstance(node, ast.Name) else (
        node.attr if isinstance(node, ast.Attribute) else "")
    if isinstance(getattr(builtins, name, None), type):
        return True
    return name[:1].isupper() and not name.isupper()


def runtime_evaluated_violations(source: str, filename: str) -> list[str]:
    """``file:line: what`` for each construct in ``source`` that CPython 3.8 evaluates and fails
    on (see the module docstring); annotations count only without the __future__ import."""
    tree = ast.parse(source, filename, feature_version=RUNTIME_TARGET)
    postponed = any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )  # fmt: skip
    skipped = _type_checking_nodes(tree)
    if postponed:
        skipped |= _annotation_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Subscript):
            value = node.value
            name = value.id if isinstance(value, ast.Name) else (
                value.attr if isinstance(value, ast.Attribute) else "")
            if name in _SUBSCRIPT_NEEDS_39 or name in _ABC_GENERICS:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:60]} subscripts "
                             f"{name} at run time (requires 3.9)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            if _is_type_operand(node.left) and _is_type_operand(node.right):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:60]} is a union "
                             "type at run time (requires 3.10)")
    return found


def test_vermin_finds_no_feature_newer_than_cpython_3_8_in_the_runtime() -> None:
    violations = run_vermin(RUNTIME_TARGET, RUNTIME)
    assert not violations, "packager/runtime must run on CPython 3.8 (JetPack 5):\n" + "\n".join(
        violations
    )


def test_the_preflight_keeps_to_cpython_3_6_by_vermin_too() -> None:
    violations = run_vermin(PREFLIGHT_TARGET, PREFLIGHT)
    assert not violations, "jetson_preflight.py must run on CPython 3.6 (JetPack 4 hosts):\n" + (
        "\n".join(violations)
    )


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_nothing_evaluated_at_run_time_needs_cpython_3_9(path: Path) -> None:
    violations = runtime_evaluated_violations(path.read_text(encoding="utf-8"), path.name)
    assert not violations, "\n".join(violations)


def test_the_checks_find_what_cpython_3_8_rejects(tmp_path: Path) -> None:
    """The checks are not vacuous: each construct CPython 3.8 fails on is named with its line,
    and what 3.8 accepts (postponed annotations, TYPE_CHECKING aliases, flags) is not."""
    source = (
        "from __future__ import annotations\n"
        "from collections.abc import Callable\n"
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "if TYPE_CHECKING:\n"
        "    Fine = dict[str, int]\n"
        "Alias = Callable[[int], int]\n"
        "class Headers(dict[str, str]):\n"
        "    pass\n"
        "def f(x: list[int] | None) -> dict[str, int]:\n"
        "    flags = os.O_RDONLY | os.O_CLOEXEC\n"
        "    return {} if isinstance(x, int | str) else {'a': flags}\n"
    )
    assert runtime_evaluated_violations(source, "m.py") == [
        "m.py:7: Callable[[int], int] subscripts Callable at run time (requires 3.9)",
        "m.py:8: dict[str, str] subscripts dict at run time (requires 3.9)",
        "m.py:12: int | str is a union type at run time (requires 3.10)",
    ]
    # Without the __future__ import, annotations are evaluated at definition time.
    eager = runtime_evaluated_violations(source.split("\n", 1)[1], "e.py")
    assert "e.py:9: list[int] subscripts list at run time (requires 3.9)" in eager
    module = tmp_path / "new.py"
    module.write_text(
        "def f(a, b):\n    return 'x'.removeprefix('y'), list(zip(a, b, strict=True))\n"
    )
    found = run_vermin(RUNTIME_TARGET, module)
    assert any(v.startswith("new.py:2: ") and "zip(strict)" in v and "3.10" in v for v in found)
    assert any(v.startswith("new.py:2: ") and "removeprefix" in v and "3.9" in v for v in found)
