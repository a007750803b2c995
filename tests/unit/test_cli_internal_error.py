"""An unexpected exception (a bug) is reported in one line, or as a JSON document under --json:
never a bare traceback, never an empty stdout for a CI job to choke on."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf.message import EncodeError
from onnx import TensorProto, helper

from packager.cli import main
from packager.optimize import graph


def model(path: Path) -> Path:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer fails the way it did on a 2.16 GB model: protobuf's own EncodeError."""

    def fail(*_args: object, **_kwargs: object) -> tuple[str, ...]:
        raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(graph, "preprocess", fail)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def optimize_args(tmp_path: Path) -> list[str]:
    return [
        "optimize",
        str(model(tmp_path / "m.onnx")),
        "--quantize",
        "int8-dynamic",
        "--out",
        str(tmp_path / "out"),
        "--latency-runs",
        "1",
    ]


def test_internal_error_under_json_is_a_json_document(
    tmp_path: Path, crash: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    code, out, err = run([*optimize_args(tmp_path), "--json"], capsys)
    assert code == 1
    document = json.loads(out)
    assert document["error"] == "internal" and document["exit_code"] == 1
    assert document["exception"] == "EncodeError"
    assert "Failed to serialize proto" in document["message"]
    assert "EDGEPACK_DEBUG=1" in document["message"]
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists()


def test_internal_error_is_one_line_without_json(
    tmp_path: Path, crash: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    code, out, err = run(optimize_args(tmp_path), capsys)
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: internal error: EncodeError: Failed to serialize proto")
    assert "Traceback" not in err


def test_edgepack_debug_prints_the_traceback_on_stderr_only(
    tmp_path: Path, crash: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEPACK_DEBUG", "1")
    code, out, err = run([*optimize_args(tmp_path), "--json"], capsys)
    assert code == 1
    assert json.loads(out)["error"] == "internal"
    assert "Traceback" in err and "EncodeError" in err
