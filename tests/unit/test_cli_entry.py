"""The CLI entry point: Ctrl-C at any moment (imports included) and click's own usage errors
end in one line, or one JSON document under --json, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]

# A real SIGINT, delivered while the CLI imports MODULE: an import hook sends it to its own
# process the moment MODULE is first looked up (no timing involved).
_INTERRUPT_DURING_IMPORT = textwrap.dedent(
    """
    import os, signal, sys

    # As in a terminal: a job started in the background inherits SIGINT ignored, and Python then
    # leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    MODULE = sys.argv[1]

    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == MODULE:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["edgepack", *sys.argv[2:]]
    from packager.cli import main
    main()
    """
)


@pytest.mark.parametrize(
    "module",
    [
        "click",  # what packager.cli itself needed at import time
        "rich.console",
        "packager.commands.build",  # the commands, imported when they are registered
        "packager.build",
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_during_imports_is_one_line_and_exit_130(
    tmp_path: Path, module: str, as_json: bool
) -> None:
    argv = ["build", str(tmp_path / "m.onnx"), "-t", "rpi4", *(["--json"] if as_json else [])]
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_DURING_IMPORT, module, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if as_json:
        assert json.loads(proc.stdout) == {
            "error": "aborted",
            "message": "aborted",
            "exit_code": 130,
        }
    else:
        assert proc.stderr == "error: aborted\n"
        assert proc.stdout == ""


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize(
    "argv",
    [
        ["optimize", "m.onnx", "--json"],  # a required option missing
        ["build", "m.onnx", "-t", "rpi4", "--compression", "lz4", "--json"],  # a bad choice
        ["build", "m.onnx", "-t", "rpi4", "--no-such-flag", "--json"],
        ["build", "--json"],  # a missing argument
        ["no-such-command", "--json"],
    ],
)
def test_click_usage_errors_under_json_are_a_json_document(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(argv, capsys)
    assert code == ExitCode.USAGE
    doc = json.loads(out)
    assert doc["error"] == "usage" and doc["exit_code"] == ExitCode.USAGE
    assert doc["message"] and "\n" not in doc["message"]
    assert err == ""


def test_click_usage_errors_without_json_stay_click_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(["optimize", "m.onnx"], capsys)
    assert code == ExitCode.USAGE and out == ""
    assert "Missing option '--quantize'" in err
