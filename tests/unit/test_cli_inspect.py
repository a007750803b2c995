from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    return code, out, err


def test_inspect_json_parses(onnx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx_dir / "mnist.onnx"
    code, out, _ = _run(["inspect", str(model), "--json"], capsys)
    assert code == ExitCode.OK
    doc = json.loads(out)
    assert doc["format"] == "onnx"
    assert doc["inputs"] == [{"name": "Input3", "dtype": "float32", "shape": [1, 1, 28, 28]}]
    assert doc["digest"] == "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()


def test_inspect_human_summary(onnx_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["inspect", str(onnx_dir / "light_resnet50.onnx")], capsys)
    assert code == ExitCode.OK
    for text in ("gpu_0/data_0", "Conv", "float32", "activations"):
        assert text in out


def test_truncated_model_exits_3_with_one_line(
    onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes((onnx_dir / "mnist.onnx").read_bytes()[:1000])
    code, out, err = _run(["inspect", str(bad)], capsys)
    assert code == ExitCode.INPUT
    assert code == 3  # the documented number, not just the enum
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0] and "not a valid ONNX model" in lines[0]


def test_missing_model_is_our_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["inspect", str(tmp_path / "nope.onnx"), "--json"], capsys)
    assert code == ExitCode.INPUT
    doc = json.loads(out)
    assert doc["exit_code"] == 3 and "nope.onnx" in doc["message"]
