"""The App's routing and health state without sockets (the HTTP path is in tests/integration)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.runtime.config import RuntimeConfig
from packager.runtime.model import load_model
from packager.runtime.server import FAILURES_UNTIL_UNHEALTHY, App, endpoint_label
from tests.integration.runtime_helpers import TESTDATA

NETWORK = TESTDATA / "onnx" / "Network.onnx"


def make_app(**config: Any) -> App:
    settings = RuntimeConfig(model_name="iris", model_path=Path(NETWORK), **config)
    app = App(settings, load_model(NETWORK, "iris", "1"))
    app.ready.set()
    return app


def infer_body(rows: int = 1) -> bytes:
    tensor = {"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": [1.0] * 4 * rows}
    return json.dumps({"inputs": [tensor]}).encode()


def test_ready_turns_false_after_repeated_inference_failures_and_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = make_app()
    real_run = app.model.run

    def broken(inputs: Mapping[str, Any], outputs: Sequence[str]) -> list[Any]:
        raise RuntimeError("device lost")

    monkeypatch.setattr(app.model, "run", broken)
    for _ in range(FAILURES_UNTIL_UNHEALTHY):
        assert app.handle("GET", "/v2/health/ready", {}, b"").status == 200
        response = app.handle("POST", "/v2/models/iris/infer", {}, infer_body())
        assert response.status == 500
        assert json.loads(response.body) == {"error": "inference failed: device lost"}
    assert app.handle("GET", "/v2/health/ready", {}, b"").status == 503
    assert app.handle("GET", "/v2/models/iris/ready", {}, b"").status == 503
    monkeypatch.setattr(app.model, "run", real_run)
    assert app.handle("POST", "/v2/models/iris/infer", {}, infer_body()).status == 200
    assert app.handle("GET", "/v2/health/ready", {}, b"").status == 200
    app.close()


def test_not_ready_refuses_inference_with_503() -> None:
    app = make_app()
    app.ready.clear()
    response = app.handle("POST", "/v2/models/iris/infer", {}, infer_body())
    assert response.status == 503
    app.close()


def test_batching_only_for_models_with_a_batch_dimension() -> None:
    assert make_app(max_batch_size=8).batcher is not None
    settings = RuntimeConfig(model_name="m", model_path=Path("x"), max_batch_size=8)
    mnist = load_model(TESTDATA / "onnx" / "mnist.onnx", "m", "1")
    assert App(settings, mnist).batcher is None  # a fixed batch of 1 cannot be merged


def test_batched_app_returns_the_same_scores_as_unbatched() -> None:
    plain, batched = make_app(), make_app(max_batch_size=8, max_queue_delay_us=100)
    one = json.loads(plain.handle("POST", "/v2/models/iris/infer", {}, infer_body(3)).body)
    two = json.loads(batched.handle("POST", "/v2/models/iris/infer", {}, infer_body(3)).body)
    np.testing.assert_allclose(one["outputs"][0]["data"], two["outputs"][0]["data"])
    plain.close()
    batched.close()


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v2/models/m/infer", "infer"),
        ("/v2/models/m/versions/1/infer?x=1", "infer"),
        ("/v2/health/ready", "ready"),
        ("/v2/models/m", "model_metadata"),
        ("/metrics", "metrics"),
        ("/anything/else", "other"),
    ],
)
def test_endpoint_labels_are_a_fixed_set(path: str, label: str) -> None:
    assert endpoint_label(path) == label
