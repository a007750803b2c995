"""The edgepack CLI run in-process, as its console script runs it (packager.cli.main)."""

from __future__ import annotations

import pytest

from packager.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``edgepack ARGV`` through packager.cli.main: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err
