"""``edgepack optimize``'s own option parsers take integers in ASCII digits only: str.isdigit()
also passes '²' (which int() then refuses: an internal error) and '١' (which int() reads as 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.cli import main
from packager.commands.optimize import parse_inputs, parse_resize
from packager.errors import ExitCode, UsageError

# Each passes str.isdigit(); none is ASCII.
NOT_ASCII_DIGITS = ["²", "١", "٣", "𝟚"]


@pytest.mark.parametrize("digit", NOT_ASCII_DIGITS)
def test_resize_takes_ascii_digits_only(digit: str) -> None:
    for text in (f"{digit}x2", f"2x{digit}", f"2{digit}x2"):
        with pytest.raises(UsageError, match=r"^--resize .*ASCII digits"):
            parse_resize(text)


@pytest.mark.parametrize("digit", NOT_ASCII_DIGITS)
def test_dynamic_dim_axis_takes_ascii_digits_only(digit: str) -> None:
    with pytest.raises(UsageError, match=r"^--dynamic-dim .*ASCII digits"):
        parse_inputs(("x=1,3",), (f"x:{digit}",))


@pytest.mark.parametrize("dims", ["١,3", "1,٣", "+1,3", "1_0,3", "1,3.0", "1,,3"])
def test_input_shape_dims_take_ascii_digits_only(dims: str) -> None:
    """int() alone reads '١' as 1, '+1' and '1_0' as numbers: none is a shape the user wrote."""
    with pytest.raises(UsageError, match=r"^--input-shape .*ASCII digits"):
        parse_inputs((f"x={dims}",), ())


def test_plain_values_still_parse() -> None:
    assert parse_resize("224X160") == (224, 160)
    (spec,) = parse_inputs(("x=1, 3, 8,8",), ("x:0", "x:3"))
    assert (spec.shape, spec.dynamic_axes) == ((1, 3, 8, 8), (0, 3))


def test_the_cli_answers_one_usage_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reproduction from the docstring pass: exit 2 and one JSON document, no internal error,
    nothing written."""
    out = tmp_path / "out"
    argv = ["optimize", str(tmp_path / "m.onnx"), "--quantize", "fp16", "--out", str(out)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--resize", "²x2", "--json"])
    assert exited.value.code == ExitCode.USAGE
    document = json.loads(capsys.readouterr().out)
    assert document["error"] == "usage"
    assert document["message"].startswith("--resize '²x2': give HEIGHTxWIDTH")
    assert not out.exists()


def test_digit_strings_past_int_max_str_digits_are_one_usage_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """5000 ASCII digits pass ``[0-9]+`` and then int() refuses them (over CPython's 4300-digit
    limit): an internal error, exit 1, on the unbounded pattern. Each value is bounded now."""
    big = "1" * 5000
    out = tmp_path / "out"
    argv = ["optimize", str(tmp_path / "m.pt"), "--quantize", "fp16", "--out", str(out), "--json"]
    for extra in (
        ["--resize", f"{big}x2"],
        ["--input-shape", f"x={big}"],
        ["--input-shape", "x=1,3", "--dynamic-dim", f"x:{big}"],
    ):
        with pytest.raises(SystemExit) as exited:
            main([*argv, *extra])
        assert exited.value.code == ExitCode.USAGE, extra
        document = json.loads(capsys.readouterr().out)
        assert document["error"] == "usage", document
        assert "ASCII digits" in document["message"], document
        assert len(document["message"]) < 300  # the value is cut, the line stays one line
    assert not out.exists()
    (spec,) = parse_inputs(("x=268435456",), ())  # 9 digits, and the example-input bound
    assert spec.shape == (268_435_456,)
    with pytest.raises(UsageError, match=r"^--input-shape 'x': 999999999 is more than "):
        parse_inputs(("x=999999999",), ())  # 9 digits, past the bound (InputSpec)
    with pytest.raises(UsageError, match=r"^--input-shape .*at most 9"):
        parse_inputs(("x=1000000000",), ())
