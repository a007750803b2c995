"""Loading real ONNX models with real onnxruntime and describing their signatures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packager.runtime.model import ModelError, load_model
from tests.integration.runtime_helpers import IDENTITY_TENSORS, TESTDATA, identity_model


def test_mnist_signature_and_warm_up() -> None:
    model = load_model(TESTDATA / "onnx" / "mnist.onnx", "mnist", "1")
    (image,) = model.signature.inputs
    (scores,) = model.signature.outputs
    assert (image.name, image.datatype, image.shape) == ("Input3", "FP32", (1, 1, 28, 28))
    assert (scores.datatype, scores.shape) == ("FP32", (1, 10))
    assert not model.signature.batchable  # a fixed batch of 1
    assert len(model.digest) == 64
    model.warm_up()


def test_dynamic_batch_dimension_is_minus_one() -> None:
    model = load_model(TESTDATA / "onnx" / "Network.onnx", "iris", "1")
    assert model.signature.inputs[0].shape == (-1, 4)
    assert model.signature.batchable
    (result,) = model.run(
        {model.signature.inputs[0].name: np.ones((5, 4), np.float32)},
        [model.signature.outputs[0].name],
    )
    assert result.shape == (5, 3)


def test_every_served_datatype_maps_and_runs(tmp_path: Path) -> None:
    model = load_model(identity_model(tmp_path / "identity.onnx"), "identity", "1")
    described = [(s.name, s.datatype, s.shape) for s in model.signature.inputs]
    assert described == [
        (name, datatype, tuple(-1 if d is None else d for d in shape))
        for name, _, shape, datatype in IDENTITY_TENSORS
    ]
    model.warm_up()
    feeds = {
        spec.name: np.arange(np.prod([2 if d < 0 else d for d in spec.shape]))
        .reshape([2 if d < 0 else d for d in spec.shape])
        .astype(spec.dtype)
        for spec in model.signature.inputs
    }
    results = model.run(feeds, [s.name for s in model.signature.outputs])
    for spec, result in zip(model.signature.inputs, results, strict=True):
        np.testing.assert_array_equal(result, feeds[spec.name])


def test_missing_and_corrupt_models_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nope\.onnx: model file not found"):
        load_model(tmp_path / "nope.onnx", "m", "1")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelError) as caught:
        load_model(corrupt, "m", "1")
    assert str(caught.value).startswith(f"{corrupt}: onnxruntime cannot load the model: ")
    assert "\n" not in str(caught.value)
