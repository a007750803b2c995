"""``--input-shape NAME=D1,D2,...:DTYPE``: DTYPE is one of an explicit table of torch dtype
names, checked whole when the command line is parsed (exit 2, one line), never looked up in
torch's namespace (``:nn`` named torch.nn and ended in an internal error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.errors import ExitCode, UsageError
from packager.models.torch_export import INPUT_DTYPES, MAX_EXAMPLE_ELEMENTS, InputSpec
from tests.cli_runner import run_cli

BAD_DTYPES = (
    "nn", "float32\n", "float32 ", " float32", "FLOAT32", "Tensor", "float", "long",
    "complex64", "qint8", "", "load", "float32;id",
)  # fmt: skip


def test_every_allowed_dtype_is_a_torch_dtype() -> None:
    torch = pytest.importorskip("torch")
    for name in INPUT_DTYPES:
        assert isinstance(getattr(torch, name), torch.dtype), name
        assert InputSpec("x", (1, 4), name).dtype == name


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_a_dtype_outside_the_table_is_a_usage_error(dtype: str) -> None:
    with pytest.raises(UsageError) as raised:
        InputSpec("x", (1, 4), dtype)
    line = raised.value.one_line()
    assert line.startswith(f"--input-shape 'x': DTYPE {dtype!r} is not an input dtype")
    assert ", ".join(INPUT_DTYPES) in line


@pytest.mark.parametrize("dtype", ["nn", "float32\n"])
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_bad_dtype_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: str, as_json: bool
) -> None:
    """A real module file and --trust-model-code: without the check, ':nn' reached torch."""
    torch = pytest.importorskip("torch")
    model = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(4, 2), model)
    out = tmp_path / "out"
    argv = ["optimize", str(model), "--trust-model-code", "--quantize", "int8-dynamic",
            "--input-shape", f"x=1,4:{dtype}", "--out", str(out)]  # fmt: skip
    code, stdout, stderr = run_cli([*argv, "--json"] if as_json else argv, capsys)
    assert code == ExitCode.USAGE, stderr
    assert "Traceback" not in stdout + stderr and not out.exists()
    if as_json:  # one JSON error document on stdout, which --json owns
        document = json.loads(stdout)
        assert document["exit_code"] == 2 and not stderr.strip(), stderr
        message = document["message"]
        assert "\n" not in message
    else:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and not stdout.strip(), stderr
        message = lines[0]
    assert "--input-shape 'x'" in message and repr(dtype) in message, message
    assert "float32, float16" in message


@pytest.mark.parametrize("shape", [(999_999_999, 999_999_999), (2**14, 2**14 + 1), (2**62, 4)])
def test_an_example_input_past_the_bound_is_a_usage_error(shape: tuple[int, ...]) -> None:
    """The export allocates one example tensor per input: 10**18 elements ended in torch's
    allocator (RuntimeError, an internal error) instead of one line naming the flag."""
    with pytest.raises(UsageError) as raised:
        InputSpec("x", shape)
    line = raised.value.one_line()
    assert line.startswith(f"--input-shape 'x': {'x'.join(map(str, shape))} is more than ")
    assert str(MAX_EXAMPLE_ELEMENTS) in line and "\n" not in line


def test_an_example_input_at_the_bound_is_taken() -> None:
    assert InputSpec("x", (1, 2**14, 2**14)).shape == (1, 2**14, 2**14)
    assert 2**14 * 2**14 == MAX_EXAMPLE_ELEMENTS


def test_cli_huge_input_shape_exits_2_with_one_json_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    model = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(4, 2), model)
    out = tmp_path / "out"
    argv = ["optimize", str(model), "--trust-model-code", "--quantize", "fp16", "--input-shape",
            "x=999999999,999999999", "--out", str(out), "--json"]  # fmt: skip
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == ExitCode.USAGE, stdout + stderr
    assert json.loads(stdout)["error"] == "usage" and not out.exists()
