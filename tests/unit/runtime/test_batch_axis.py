"""The runtime batches only along a declared batch axis (issue 10, kind 5), whatever
runtime.json asks: runtime.json comes from the bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.runtime.config import ConfigError, RuntimeConfig, parse_config
from packager.runtime.model import is_batch_dim, load_model
from packager.runtime.server import App


def cumsum_model(path: Path, first: str | None) -> Path:
    """y = CumSum(x, axis 0): each row depends on the rows before it, like a time-major RNN's
    steps, so requests concatenated along axis 0 answer wrongly."""
    axis = numpy_helper.from_array(np.array(0, dtype=np.int64), "axis")
    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"])],
        "cumsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [first, 2])],
        initializer=[axis],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def make_app(model: Path, **config: object) -> App:
    settings = RuntimeConfig(model_name="m", model_path=model, **config)  # type: ignore[arg-type]
    app = App(settings, load_model(model, "m", "1"))
    app.ready.set()
    return app


def test_batch_dimension_names() -> None:
    for name in ("N", "n", "batch", "BATCH", "batch_size", "batchsize", "bs", "B", "nbatch"):
        assert is_batch_dim(name), name
    for dim in ("seq", "time", "unk__3", "batch\n", " batch", "Nx", "", None, 1, -1):
        assert not is_batch_dim(dim), dim


def test_signature_names_the_tensors_without_a_batch_axis(tmp_path: Path) -> None:
    named = load_model(cumsum_model(tmp_path / "n.onnx", "N"), "m", "1").signature
    assert named.batchable and named.unnamed_batch_axis() == ()
    seq = load_model(cumsum_model(tmp_path / "s.onnx", "seq"), "m", "1").signature
    assert [(t.name, t.first_dim) for t in seq.unnamed_batch_axis()] == [("x", "seq"), ("y", "seq")]


def test_batching_a_time_axis_is_refused_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = cumsum_model(tmp_path / "s.onnx", "seq")
    with caplog.at_level(logging.WARNING):
        app = make_app(model, max_batch_size=8, max_queue_delay_us=100)
    assert app.batcher is None and not app.batch_axis
    refused = [r for r in caplog.records if r.getMessage() == "batching_refused"]
    assert len(refused) == 1
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [3, 2], "datatype": "FP32", "data": [1.0] * 6}]}
    ).encode()
    for _ in range(3):  # served, one by one; nothing more is logged
        assert app.handle("POST", "/v2/models/m/infer", {}, body).status == 200
    assert len([r for r in caplog.records if r.getMessage() == "batching_refused"]) == 1
    app.close()


def test_a_named_or_declared_batch_axis_is_batched(tmp_path: Path) -> None:
    named = make_app(cumsum_model(tmp_path / "n.onnx", "batch"), max_batch_size=8)
    declared = make_app(cumsum_model(tmp_path / "u.onnx", None), max_batch_size=8, batch_axis=0)
    off = make_app(cumsum_model(tmp_path / "o.onnx", "batch"))  # no max_batch_size: not batched
    assert named.batcher is not None and declared.batcher is not None and off.batcher is None
    assert named.batch_axis and declared.batch_axis and off.batch_axis
    for app in (named, declared, off):
        app.close()


@pytest.mark.parametrize("value", [1, -1, True, "0", 0.0])
def test_batch_axis_config_is_0_or_null(value: object) -> None:
    document = {"model_name": "m", "model_path": "m.onnx", "batch_axis": value}
    with pytest.raises(ConfigError, match="batch_axis must be 0 or null"):
        parse_config(document, "runtime.json", Path("/"))
    document["batch_axis"] = None
    assert parse_config(document, "runtime.json", Path("/")).batch_axis is None
