"""polygraphy reference inputs/outputs, with the real polygraphy and onnxruntime (constant
folding moved to packager.models.fold: tests/unit/models/test_fold.py). On the device the
comparison runs ``polygraphy run --trt``; TensorRT is not installable here, so polygraphy's own
CLI with its ONNX-Runtime backend (``--onnxrt``) stands in for that run: it reads the files
exactly as the device's command does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from packager.backends.jetson.reference import (
    REFERENCE_INPUTS,
    REFERENCE_OUTPUTS,
    RUNNER_NAME,
    write_reference,
)
from packager.errors import InputError
from tests.conftest import TESTDATA

MNIST = TESTDATA / "onnx" / "mnist.onnx"
IRIS = TESTDATA / "onnx" / "Network.onnx"  # dynamic batch


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_reference_files_load_back_in_polygraphy_and_match_onnxruntime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    refs = write_reference(MNIST, tmp_path, iterations=3)
    assert capsys.readouterr().out == ""  # stdout stays clean for --json
    assert refs.files == (tmp_path / REFERENCE_INPUTS, tmp_path / REFERENCE_OUTPUTS)
    assert refs.input_names == ("Input3",) and refs.output_names == ("Plus214_Output_0",)
    feeds = load_json(str(refs.inputs))
    results = RunResults.load(str(refs.outputs))
    assert list(results.keys()) == [RUNNER_NAME]
    iterations = results[RUNNER_NAME]
    assert len(feeds) == len(iterations) == 3
    session = _session(MNIST)
    for feed, iteration in zip(feeds, iterations, strict=True):
        x = feed["Input3"]
        assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
        (expected,) = session.run(None, {"Input3": x})
        np.testing.assert_allclose(iteration["Plus214_Output_0"], expected, rtol=1e-5)


def test_reference_bytes_are_stable(tmp_path: Path) -> None:
    first = write_reference(MNIST, tmp_path / "a")
    second = write_reference(MNIST, tmp_path / "b")
    for a, b in zip(first.files, second.files, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    other = write_reference(MNIST, tmp_path / "c", seed=2)
    assert other.inputs.read_bytes() != first.inputs.read_bytes()


def test_dynamic_dimensions_get_a_concrete_shape(tmp_path: Path) -> None:
    from polygraphy.json import load_json

    refs = write_reference(IRIS, tmp_path)
    (feed,) = load_json(str(refs.inputs))
    (name,) = feed
    assert feed[name].shape == (1, 4)


def test_polygraphys_cli_compares_against_the_references(tmp_path: Path) -> None:
    """``polygraphy run --load-inputs/--load-outputs``, the device's command, with the
    ONNX-Runtime backend standing in for TensorRT: the references match the model."""
    refs = write_reference(MNIST, tmp_path, iterations=2)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    done = subprocess.run(
        [str(polygraphy), "run", str(MNIST), "--onnxrt", "--load-inputs", str(refs.inputs),
         "--load-outputs", str(refs.outputs), "--atol", "1e-4", "--rtol", "1e-4"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout
    # And a model that computes something else fails the same comparison.
    bad = onnx.load(str(MNIST))
    weight = next(t for t in bad.graph.initializer if t.name == "Parameter193")
    weight.CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(weight) * 1.5, weight.name
    ))
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    done = subprocess.run(
        [str(polygraphy), "run", str(tmp_path / "bad.onnx"), "--onnxrt", "--load-inputs",
         str(refs.inputs), "--load-outputs", str(refs.outputs)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode != 0


def test_bad_inputs_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        write_reference(tmp_path / "missing.onnx", tmp_path)
    with pytest.raises(InputError, match="iterations"):
        write_reference(MNIST, tmp_path, iterations=0)
