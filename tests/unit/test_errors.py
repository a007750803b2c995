from __future__ import annotations

import re
from pathlib import Path

from packager import errors
from packager.cli import cli
from packager.errors import EdgepackError, ExitCode


def _error_classes() -> list[type[EdgepackError]]:
    return [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, EdgepackError) and obj is not EdgepackError
    ]


def test_every_error_class_has_a_distinct_exit_code() -> None:
    classes = _error_classes()
    assert len(classes) >= 10
    codes = [cls.exit_code for cls in classes]
    assert len(set(codes)) == len(codes), codes
    assert ExitCode.OK not in codes and ExitCode.FAILURE not in codes


def test_every_exit_code_is_documented_in_cli_help() -> None:
    help_text = cli.help or ""
    section = help_text[help_text.index("Exit codes:") :]
    documented = {int(n) for n in re.findall(r"(\d+) [a-z]", section)}
    assert documented == {int(c) for c in ExitCode}
    for cls in _error_classes():
        assert int(cls.exit_code) in documented, cls.__name__


def test_each_json_kind_is_the_one_readme_documents_for_its_exit_code() -> None:
    """``--json`` consumers branch on ``error``: README's exit-code table names each code's
    kind, and every class says exactly that (the kind is spelled from the code's name)."""
    table = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = {
        int(code): kind
        for code, kind in re.findall(r"^\| (\d+) \| `([a-z-]+)` \|", table, flags=re.MULTILINE)
    }
    assert documented.pop(1) == "internal"
    assert documented == {int(cls.exit_code): cls.kind for cls in _error_classes()}
    assert errors.ToolMissingError("x").to_json()["error"] == "tool-missing"


def test_one_line_and_json() -> None:
    err = errors.InputError("a.onnx: bad\n  thing", hint="fix it")
    assert err.one_line() == "a.onnx: bad thing (fix it)"
    assert err.to_json() == {
        "error": "input",
        "message": "a.onnx: bad thing (fix it)",
        "exit_code": 3,
    }
