"""Allow-lists are whole-string: no Python regular expression in packager/ has a bare `$`.

In Python's ``re``, ``$`` matches at the end of the string AND before a trailing newline, so
``re.match(r"^[a-z]+$", "stable\\n")`` matches: a value checked that way can carry a line break
into a path, a shell script or a unit file. A whole-string check is ``re.fullmatch`` (or ``\\Z``).
This test reads every packager/**/*.py with ``ast`` and names, as file:line, every
``re.compile`` / ``re.match`` / ``re.search`` (``re`` under any alias, or the function imported
from it) whose pattern holds a bare ``$`` anywhere outside a character class (not ``\\$``, not
``[$]``; ``^(?:a$|b)`` lets ``"a\\n"`` through as surely as ``^a$``), unless :data:`LEGITIMATE`
lists it by exact file and pattern with the reason. A pattern is read from a literal (str or
bytes), an f-string (fields shown as ``{}``), a ``+`` of those, a ``%`` or ``.format`` of one,
or a module-level name assigned one; positionally or as ``pattern=``.

Not covered here: a pattern computed at run time (a loop variable, ``"".join(...)``), and
pydantic ``Field(pattern=...)``, which pydantic-core matches with Rust's regex engine, where
``$`` is the end of the text only (a trailing newline is refused).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import packager

PACKAGER = Path(packager.__file__).parent
SCANNED = ("compile", "match", "search")

# (file relative to the repository, exact pattern) -> why its `$` is right: parsing many lines
# (re.MULTILINE) of a tool's output or a file, never deciding whether one value is allowed.
LEGITIMATE: dict[tuple[str, str], str] = {
    ("packager/runtime/jetson_preflight.py", r"""^kind:\s*["']?nvidia\.com/gpu["']?\s*$"""):
        "re.MULTILINE search for a line of a CDI spec file (a YAML scan, not a value check)",
    ("packager/tools/qemu.py", r"^bwrap: (.*)$"):
        "re.MULTILINE search for bwrap's error line in its stderr (shown to the user)",
    ("packager/backends/mcu/emulate.py",
     r"^[A-Za-z_][\w:<>,\*& ]*\b{}\s*\((?!.*;\s*$)"):
        "re.MULTILINE search of C/C++ sources for a definition line (no ';' at the line's end)",
    ("packager/backends/mcu/emulate.py",
     r"^EP cpu-mismatch built=([0-9a-f]{8}) running=([0-9a-f]{8})$"):
        "re.MULTILINE parse of the emulated firmware's console lines",
    ("packager/backends/mcu/emulate.py", r"^EP (fault .*|error .*)$"):
        "re.MULTILINE parse of the emulated firmware's console lines",
    ("packager/backends/mcu/emulate.py", r"^EP arena (\d+) (\d+)$"):
        "re.MULTILINE parse of the emulated firmware's console lines",
}  # fmt: skip


def _pattern(node: ast.expr | None, names: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The pattern text when it can be read without running anything (see the module
    docstring); bytes as latin-1; an f-string's fields as ``{}``."""
    if node is None or depth > 20:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
        return node.value.decode("latin-1")
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _pattern(node.left, names, depth + 1)
        right = _pattern(node.right, names, depth + 1)
        return None if left is None and right is None else (left or "{}") + (right or "{}")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return _pattern(node.left, names, depth + 1)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    ):
        return _pattern(node.func.value, names, depth + 1)
    if isinstance(node, ast.Name) and node.id in names:
        return _pattern(names[node.id], names, depth + 1)
    return None


def has_bare_dollar(pattern: str) -> bool:
    """Whether ``pattern`` holds a ``$`` that no backslash escapes, outside a character class."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # a ']' first in a class is a literal
                i += 1
            continue
        elif c == "$":
            return True
        i += 1
    return False


def _scanned_calls(tree: ast.Module) -> dict[str, str]:
    """{name: re function} for the calls this module can make as ``NAME(...)`` (``from re import
    compile as c``); module aliases are found by :func:`_re_aliases`."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "re":
            for alias in node.names:
                if alias.name in SCANNED:
                    found[alias.asname or alias.name] = alias.name
    return found


def _re_aliases(tree: ast.Module) -> set[str]:
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "re"}
    return aliases


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = expr`` (and annotated) assignments: a pattern kept in a constant."""
    names: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            names[target.id] = value
    return names


def bare_dollar_patterns(root: Path = PACKAGER) -> list[tuple[str, int, str]]:
    """``(file, line, pattern)`` for every re.compile/match/search in ``root`` whose readable
    pattern holds a bare ``$``; file relative to ``root``'s parent."""
    found: list[tuple[str, int, str]] = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases, functions = _re_aliases(tree), _scanned_calls(tree)
        names = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            is_re = (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id in aliases
                and func.attr in SCANNED
            ) or (isinstance(func, ast.Name) and func.id in functions)
            if not is_re:
                continue
            argument = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "pattern"), None
            )
            pattern = _pattern(argument, names)
            if pattern is not None and has_bare_dollar(pattern):
                found.append((where, node.lineno, pattern))
    return sorted(found)


def test_no_validation_pattern_has_a_bare_dollar() -> None:
    found = bare_dollar_patterns()
    problems = [
        f"{where}:{line}: {pattern!r} has a bare '$', which lets a trailing newline through:"
        " use re.fullmatch without anchors (or \\Z), or list it in LEGITIMATE with the reason"
        for where, line, pattern in found
        if (where, pattern) not in LEGITIMATE
    ]
    assert not problems, "\n".join(problems)


def test_every_legitimate_entry_still_exists() -> None:
    """A stale allow-list entry would later excuse a new pattern that happens to match it."""
    present = {(where, pattern) for where, _, pattern in bare_dollar_patterns()}
    assert not set(LEGITIMATE) - present, sorted(set(LEGITIMATE) - present)
    assert all(reason for reason in LEGITIMATE.values())


def test_the_scan_names_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "packager"
    root.mkdir()
    (root / "a.py").write_text(
        "import re\n"
        "A = re.compile(r'^[a-z]+$')\n"
        "B = re.compile(r'[a-z]+\\Z')\n"
        "C = re.compile(r'price\\$')\n"
        "def f(x: str) -> bool:\n"
        "    return re.match(f'(?:{x}|b$)', 'b') is not None\n"
        "D = re.fullmatch(r'[a-z]+', 'x')\n"
        "E = re.search(r'a\\\\$', 'a')\n"
    )
    assert bare_dollar_patterns(root) == [
        ("packager/a.py", 2, "^[a-z]+$"),
        ("packager/a.py", 6, "(?:{}|b$)"),
        ("packager/a.py", 8, "a\\\\$"),
    ]


def test_the_scan_sees_through_aliases_concatenation_names_bytes_and_alternation(
    tmp_path: Path,
) -> None:
    """Each of these lets ``"abc\\n"`` through a match, and each slipped past the first scan
    (which read a literal first argument of ``re.X`` and looked at its last character only)."""
    root = tmp_path / "packager"
    root.mkdir()
    (root / "b.py").write_text(
        "import re\n"
        "import re as regex\n"
        "from re import compile as rc\n"
        "P = r'^[a-z]+$'\n"
        "A = re.compile(r'^[a-z]+' + '$')\n"
        "B = re.compile(P)\n"
        "C = re.compile(rb'^[a-z]+$')\n"
        "D = regex.compile(r'^[a-z]+')\n"
        "E = rc(r'^[a-z]+$')\n"
        "F = re.compile(pattern=r'^[a-z]+$')\n"
        "G = re.compile(r'^(?:[a-z]+$|-)')\n"
        "H = re.compile(r'^[a-z]+$   # a name', re.X)\n"
        "I = re.compile('^%s$' % P)\n"
        "J = re.compile(r'^[$a-z]+\\Z')\n"
        "K = re.compile(r'^[]$]+\\Z')\n"
        "L = regex.match(r'^[a-z]+$', 'x')\n"
    )
    found = [(line, pattern) for _, line, pattern in bare_dollar_patterns(root)]
    assert [line for line, _ in found] == [5, 6, 7, 9, 10, 11, 12, 13, 16], found
    for pattern in ("^(?:[a-z]+$|-)", "^[a-z]+$   # a name"):
        flags = re.X if "#" in pattern else 0
        assert re.compile(pattern, flags).match("abc\n"), pattern
