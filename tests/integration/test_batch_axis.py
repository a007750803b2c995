"""Issue 10, kind 5: dynamic batching only along a batch axis.

A time-major LSTM (``x: [seq, 1, 8]``) served with max_batch_size 64 had four concurrent requests
concatenated along time: the LSTM carried each request's state into the next one's, and three of
the four answers were wrong by 0.14-0.34. The build now refuses ``--max-batch-size`` for it
(exit 10), the runtime refuses to batch it whatever runtime.json says, and a model whose first
axis is named ``batch`` is still batched, each request answered as if it ran alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.integration.conftest import build_json, edgepack
from tests.integration.runtime_helpers import (
    RuntimeProcess,
    runtime_factory,  # noqa: F401  (a fixture: importing it makes it available here)
    scrape,
)
from tests.oci_files import model_files

pytestmark = pytest.mark.integration

FEATURES = 8
HIDDEN = 16
STEPS = 6
CLIENTS = 4


def lstm_model(path: Path, *, batch_first: bool) -> Path:
    """One LSTM layer. Time-major: x [seq, 1, 8] -> Y [seq, 1, 1, 16] (ONNX's layout).
    Batch-first, as PyTorch exports ``batch_first=True`` (onnxruntime has no layout=1 LSTM):
    x [batch, seq, 8] -> Transpose -> LSTM -> Transpose -> y [batch, seq, 1, 16]."""
    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
        for name, shape in (
            ("W", (1, 4 * HIDDEN, FEATURES)),
            ("R", (1, 4 * HIDDEN, HIDDEN)),
            ("B", (1, 8 * HIDDEN)),
        )
    ]
    if batch_first:
        nodes = [
            helper.make_node("Transpose", ["x"], ["x_tm"], perm=[1, 0, 2]),
            helper.make_node("LSTM", ["x_tm", "W", "R", "B"], ["y_tm"], hidden_size=HIDDEN),
            helper.make_node("Transpose", ["y_tm"], ["y"], perm=[2, 0, 1, 3]),
        ]
        x_shape: list[int | str] = ["batch", "seq", FEATURES]
        y_shape: list[int | str] = ["batch", "seq", 1, HIDDEN]
    else:
        nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=HIDDEN)]
        x_shape, y_shape = ["seq", 1, FEATURES], ["seq", 1, 1, HIDDEN]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, path)
    return path


def requests(shape: tuple[int, ...]) -> list[np.ndarray[Any, Any]]:
    """Four different inputs of one shape (so the batcher may merge them)."""
    rng = np.random.default_rng(11)
    return [rng.normal(0, 1, shape).astype(np.float32) for _ in range(CLIENTS)]


def alone(model: Path, inputs: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    """Each request's answer from onnxruntime, one request per run."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [session.run(None, {"x": x})[0] for x in inputs]


def infer(runtime: RuntimeProcess, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(runtime.address, network_timeout=120)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(runtime.model_name, [tensor]).as_numpy("y")  # type: ignore[no-any-return]
    finally:
        client.close()


def concurrently(
    runtime: RuntimeProcess, inputs: list[np.ndarray[Any, Any]]
) -> list[np.ndarray[Any, Any]]:
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda x: infer(runtime, x), inputs))


def worst_error(got: list[np.ndarray[Any, Any]], want: list[np.ndarray[Any, Any]]) -> float:
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))


def test_runtime_json_asking_to_batch_a_time_major_model_is_refused_by_the_runtime(
    tmp_path: Path,
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    """runtime.json comes from the bundle: a hand-made (or older) one that batches the
    time-major LSTM must not make the runtime merge requests along time."""
    model = lstm_model(tmp_path / "lstm_tm.onnx", batch_first=False)
    inputs = requests((STEPS, 1, FEATURES))
    runtime = runtime_factory(
        model, "lstm", max_batch_size=64, max_queue_delay_us=300_000
    )  # the issue's --max-batch-size 64 --batch-delay-us 300000
    got = concurrently(runtime, inputs)
    # Before: merged along time, three of the four answers were off by 0.1-0.4.
    assert worst_error(got, alone(model, inputs)) < 1e-5
    events = runtime.events()
    refused = [e for e in events if e.get("event") == "batching_refused"]
    assert len(refused) == 1, events  # logged once, not per request
    assert "'seq'" in refused[0]["message"] and "not a declared batch axis" in refused[0]["message"]
    assert next(e for e in events if e.get("event") == "ready")["batching"] is False
    metrics = scrape(runtime)  # one run per request, each of one row (time is not rows)
    assert metrics["edgepack_batch_size_count"] == metrics["edgepack_batch_size_sum"] == CLIENTS


def test_build_refuses_max_batch_size_for_a_time_major_model(tmp_path: Path) -> None:
    model = lstm_model(tmp_path / "lstm_tm.onnx", batch_first=False)
    out = tmp_path / "bundle"
    proc = edgepack(
        "build", str(model), "--target", "industrial-pc", "--out", str(out),
        "--max-batch-size", "64", "--batch-delay-us", "300000", "--json",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 10, proc.stdout + proc.stderr
    document = json.loads(proc.stdout)
    assert document["error"] == "unsupported"
    message = document["message"]
    assert message.startswith("--max-batch-size 64: lstm_tm.onnx: the first dimension of 'x'")
    assert "'seq', not a batch axis" in message and "--batch-axis 0" in message
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []
    # The only axis the runtime can merge along is 0; the LSTM's batch axis is 1.
    axis = edgepack(
        "build", str(model), "--target", "industrial-pc", "--out", str(out),
        "--max-batch-size", "64", "--batch-axis", "1", check=False,
    )  # fmt: skip
    assert axis.returncode == 10 and "--batch-axis 1: requests can only be merged along axis 0" in (
        axis.stderr
    )
    assert not out.exists()


@pytest.mark.slow
def test_batch_first_model_builds_batched_and_answers_each_request_as_alone(
    tmp_path: Path,
    edgepack_cache: Path,
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    model = lstm_model(tmp_path / "lstm_bf.onnx", batch_first=True)
    doc = build_json(
        str(model), "--target", "industrial-pc", "--name", "lstm", "--version", "1.0.0",
        "--out", str(tmp_path / "bundle"), "--cache-dir", str(edgepack_cache),
        "--max-batch-size", "64", "--batch-delay-us", "300000",
    )  # fmt: skip
    archive = Path(doc["bundle"]) / "image.tar"
    shipped = model_files(archive, ("runtime.json", "lstm_bf.onnx"), tmp_path)
    config = json.loads(shipped["runtime.json"].read_text())
    assert config["max_batch_size"] == 64 and config["max_queue_delay_us"] == 300_000
    assert "batch_axis" not in config  # the model's own "batch" dimension says so
    # The runtime with the bundle's settings (address and paths are this host's).
    settings = {
        k: v for k, v in config.items() if k not in ("host", "port", "model_path", "model_name")
    }
    runtime = runtime_factory(shipped["lstm_bf.onnx"], config["model_name"], **settings)
    inputs = requests((1, STEPS, FEATURES))
    got = concurrently(runtime, inputs)
    assert worst_error(got, alone(model, inputs)) < 1e-5
    metrics = scrape(runtime)
    # Every request went through the model once, in fewer runs than requests: merged.
    assert metrics["edgepack_batch_size_sum"] == CLIENTS
    assert metrics["edgepack_batch_size_count"] < CLIENTS
