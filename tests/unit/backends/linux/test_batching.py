"""runtime.json's batching (issue 10, kind 5): only along a declared batch axis, or refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from packager.backends.base import BuildRequest
from packager.backends.linux.backend import LinuxContainerBackend
from packager.backends.linux.fit import linux_fit
from packager.errors import ExitCode, UnsupportedError
from packager.image.spec import ImageSpec
from packager.models import inspect_model
from packager.targets import resolve_target

REPO = Path(__file__).resolve().parents[4]


def relu_model(path: Path, first: int | str | None, out_first: int | str | None = "same") -> Path:
    """x [first, 8] -> Relu -> y [out_first, 8] (out_first "same": the input's)."""
    y_first = first if out_first == "same" else out_first
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [y_first, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def runtime_json(model: Path, target: str = "industrial-pc", **kwargs: object) -> dict[str, object]:
    request = BuildRequest(model=model, target=target, **kwargs)  # type: ignore[arg-type]
    info = inspect_model(model)
    loaded = resolve_target(target)
    plan = LinuxContainerBackend().plan(request, info, loaded, linux_fit(info, loaded))
    assert isinstance(plan.payload, ImageSpec)
    files = plan.payload.layers[-1].files
    source = next(f.source for f in files if f.dest.endswith("runtime.json"))
    assert isinstance(source, bytes)
    document: dict[str, object] = json.loads(source)
    return document


@pytest.mark.parametrize("name", ["batch", "N", "batch_size", "Batch", "bs"])
def test_a_first_dimension_named_as_a_batch_is_batched(tmp_path: Path, name: str) -> None:
    config = runtime_json(relu_model(tmp_path / "m.onnx", name), max_batch_size=16)
    assert config["max_batch_size"] == 16 and "batch_axis" not in config


@pytest.mark.parametrize(
    ("first", "out_first", "said"),
    [
        ("seq", "same", "the first dimension of 'x' is 'seq', not a batch axis"),
        (None, "same", "the first dimension of 'x' is unnamed, not a batch axis"),
        ("batch", "time", "the first dimension of 'y' is 'time', not a batch axis"),
        ("batch_", "same", "'batch_', not a batch axis"),  # whole names only
        (1, "same", "'x' has a fixed first dimension (1), so requests cannot be merged"),
    ],
)
def test_max_batch_size_is_refused_without_a_batch_axis(
    tmp_path: Path, first: int | str | None, out_first: int | str | None, said: str
) -> None:
    model = relu_model(tmp_path / "m.onnx", first, out_first)
    with pytest.raises(UnsupportedError) as refused:
        runtime_json(model, max_batch_size=64)
    assert refused.value.exit_code == ExitCode.UNSUPPORTED
    line = refused.value.one_line()
    assert line.startswith("--max-batch-size 64: m.onnx: ") and said in line, line
    # Batching off, or a batch of one, asks for nothing to refuse.
    for size in (0, 1):
        assert runtime_json(model, max_batch_size=size)["max_batch_size"] == size


def test_batch_axis_0_declares_an_unnamed_first_axis(tmp_path: Path) -> None:
    for first in ("unk__12", None):
        model = relu_model(tmp_path / "m.onnx", first)
        config = runtime_json(model, max_batch_size=8, batch_axis=0)
        assert config["max_batch_size"] == 8 and config["batch_axis"] == 0
    # What the build writes, the runtime accepts (unknown keys and bad values are fatal there).
    from packager.runtime.config import parse_config

    assert parse_config(config, "runtime.json", Path("/")).batch_axis == 0


@pytest.mark.parametrize(
    ("first", "axis", "said"),
    [
        ("seq", 1, "--batch-axis 1: requests can only be merged along axis 0"),
        (1, 0, "--batch-axis 0: m.onnx: 'x' has a fixed first dimension (1)"),
    ],
)
def test_a_batch_axis_the_runtime_cannot_merge_along_is_refused(
    tmp_path: Path, first: int | str, axis: int, said: str
) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(said)):
        runtime_json(relu_model(tmp_path / "m.onnx", first), max_batch_size=8, batch_axis=axis)


def test_a_targets_own_max_batch_size_is_turned_off_for_a_time_major_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (REPO / "targets" / "industrial-pc.toml").read_text()
    target = tmp_path / "batching-pc.toml"
    target.write_text(text.replace("[runtime]\n", "[runtime]\nmax_batch_size = 8\n", 1))
    named = runtime_json(relu_model(tmp_path / "n.onnx", "N"), target=str(target))
    assert named["max_batch_size"] == 8
    config = runtime_json(relu_model(tmp_path / "m.onnx", "seq"), target=str(target))
    assert config["max_batch_size"] == 0  # the user did not ask: no refusal, no wrong answers
    assert "the target's max_batch_size 8 is turned off" in capsys.readouterr().err
