"""Bad inputs to `edgepack build`: one clear line, the documented exit code, nothing written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode
from tests.model_factory import too_big_model


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return " ".join(lines[0].split())


def _assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(tmp_path / "nope.onnx"), "--target", "rpi4", "--out", str(out)], capsys
    )
    assert code == ExitCode.INPUT
    assert "nope.onnx: model file not found" in _error_line(err)
    _assert_nothing_written(tmp_path, out)


def test_truncated_model(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "trunc.onnx"
    model.write_bytes((onnx_dir / "mnist.onnx").read_bytes()[:1000])
    out = tmp_path / "bundle"
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--out", str(out)], capsys)
    assert code == ExitCode.INPUT
    line = _error_line(err)
    assert "trunc.onnx" in line and "not a valid ONNX model" in line
    _assert_nothing_written(tmp_path, out)


def test_unknown_target_suggests(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "--target", "rpi-4", "--out", str(out)], capsys
    )
    assert code == ExitCode.TARGET
    line = _error_line(err)
    assert "unknown target 'rpi-4'" in line and "did you mean 'rpi4'" in line
    _assert_nothing_written(tmp_path, out)


def test_target_file_with_wrong_field(
    tmp_path: Path, onnx_dir: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (repo_root / "targets" / "rpi4.toml").read_text()
    bad = tmp_path / "my-board.toml"
    bad.write_text(text.replace("ram_mb = 4096", "ram_mb = -4096"))
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "--target", str(bad), "--out", str(out)], capsys
    )
    assert code == ExitCode.TARGET
    line = _error_line(err)
    assert "my-board.toml: memory.ram_mb: must be a positive integer" in line
    _assert_nothing_written(tmp_path, out)


def test_target_file_with_misspelt_key(
    tmp_path: Path, onnx_dir: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (repo_root / "targets" / "rpi4.toml").read_text()
    bad = tmp_path / "board.toml"
    bad.write_text(text.replace("reserved_mb = 512", "reserved_mib = 512"))
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "--target", str(bad), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == ExitCode.TARGET
    assert "memory.reserved_mib: unknown key (did you mean 'reserved_mb'?)" in _error_line(err)


def test_model_too_big_for_zero_2w(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = too_big_model(tmp_path / "big.onnx")
    out = tmp_path / "bundle"
    code, _, err = _run(["build", str(model), "--target", "rpi-zero-2w", "--out", str(out)], capsys)
    assert code == ExitCode.FIT
    line = _error_line(err)
    assert "does not fit rpi-zero-2w" in line
    assert re.search(r"memory needs 2\.\d GiB \(weights .* \+ activations 2\.0 GiB", line)
    assert "the target has 300.0 MiB" in line
    _assert_nothing_written(tmp_path, out)


def test_errors_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["build", str(tmp_path / "x.onnx"), "--target", "rpi4", "--json"], capsys)
    assert code == ExitCode.INPUT
    doc = json.loads(out)
    assert doc["error"] == "input" and doc["exit_code"] == ExitCode.INPUT


def test_bad_name_and_version(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(onnx_dir / "mnist.onnx", model)
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--name", "Bad Name"], capsys)
    assert code == ExitCode.USAGE and "--name" in _error_line(err)
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--version", "1 0"], capsys)
    assert code == ExitCode.USAGE and "--version" in _error_line(err)
