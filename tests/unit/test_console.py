"""packager.console: untrusted names and values never drive the terminal (ESC/CSI sequences,
bidi overrides), through every way the commands print: status, warn, error, result, tables."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from packager.console import Reporter, Table, printable
from tests.cli_runner import run_cli

HOSTILE = "dev\x1b]0;pwned\x07ice\x1b[2J\x9b31m\u202eevil\x00"


def test_printable_escapes_controls_and_keeps_tab_and_newline() -> None:
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable(HOSTILE) == "dev\\x1b]0;pwned\\x07ice\\x1b[2J\\x9b31m\\u202eevil\\x00"
    assert printable("plain ascii, ümlaut, 中文") == "plain ascii, ümlaut, 中文"


def _reporter(terminal: bool) -> tuple[Reporter, io.StringIO, io.StringIO]:
    reporter = Reporter()
    out, err = io.StringIO(), io.StringIO()
    reporter.out = Console(file=out, force_terminal=terminal, highlight=False, soft_wrap=True)
    reporter.err = Console(file=err, force_terminal=terminal, highlight=False, soft_wrap=True)
    return reporter, out, err


def _shown_everywhere(value: str, terminal: bool, *, also_error_and_result: bool = False) -> str:
    """What the reporter writes (stdout then stderr) when ``value`` is a status line, a warning,
    a table title and two table cells (and, asked, an error and a result)."""
    reporter, out, err = _reporter(terminal)
    reporter.status(value)
    reporter.warn(value)
    if also_error_and_result:
        reporter.error(value)
        reporter.result(value)
    table = Table("device", "reason", title=value)
    table.add_row(value, value)
    reporter.table(table)
    return out.getvalue() + err.getvalue()


@pytest.mark.parametrize("terminal", [False, True])
def test_no_hostile_byte_reaches_the_stream(terminal: bool) -> None:
    written = _shown_everywhere(HOSTILE, terminal, also_error_and_result=True)
    for raw in ("\x1b]", "\x1b[2J", "\x9b", "\u202e", "\x00", "\x07"):
        assert raw not in written
    assert written.count("\\x1b]0;pwned") == 7  # status, warn, error, result, title, 2 cells


def test_an_error_naming_a_hostile_path_is_escaped_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["build", "--target", str(tmp_path / "a\x1b[31mb.toml"),
                            str(tmp_path / "m.onnx")], capsys)
    assert code != 0
    assert "\x1b" not in err and "a\\x1b[31mb.toml" in err


MARKUP = "[/x][link=h:e]y[/link][b]"  # short: each table cell on one line


@pytest.mark.parametrize("terminal", [False, True])
def test_values_are_never_rich_markup(terminal: bool) -> None:
    """Before: a table cell, a title or a status/warn line holding "[/oops]" stopped the
    command with rich's MarkupError (an internal error, exit 1: `edgepack inspect` of a model
    with such a tensor name), and "[link=URL]" made rich write a hyperlink escape sequence
    (OSC 8) to the terminal."""
    written = _shown_everywhere(MARKUP, terminal)
    assert "\x1b]8;" not in written
    assert written.count(MARKUP) == 5  # status, warn, title, 2 cells: shown as they are


def test_inspect_shows_a_tensor_named_like_markup_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx
    from onnx import TensorProto, helper

    names = ["[/oops]", "[link=https://evil.example]ok[/link]"]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], [names[0]]),
         helper.make_node("Relu", [names[0]], [names[1]])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in names])
    model = tmp_path / "markup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    code, out, err = run_cli(["inspect", str(model)], capsys)
    assert code == 0, err
    assert all(name in out for name in names)
