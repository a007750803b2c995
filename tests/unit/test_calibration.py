"""packager.calibration: sample directories checked against the model's signature, and the one
minimum sample count every quantizer (ONNX int8-static, the int8 TFLite converters) applies."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from packager.calibration import (
    MIN_CALIBRATION_SAMPLES,
    ImagePreprocessing,
    load_samples,
    representative_rows,
    require_calibration,
    require_min_samples,
)
from packager.errors import InputError
from packager.models.info import TensorInfo

FIXED = (TensorInfo("Input3", "float32", (1, 1, 4, 4)),)
DYNAMIC = (TensorInfo("x", "float32", ("batch", 3)),)


def test_stacks_are_split_along_a_fixed_batch_of_one(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((5, 1, 4, 4)))  # float64: narrowed to float32
    np.save(tmp_path / "b.npy", np.zeros((1, 1, 4, 4), np.float32))
    np.save(tmp_path / "c.npy", np.zeros((2, 1, 1, 4, 4), np.float32))  # new leading axis
    samples = load_samples(tmp_path, FIXED, purpose="calibration")
    assert samples.sample_count == 8
    assert all(f["Input3"].shape == (1, 1, 4, 4) for f in samples.feeds)
    assert all(f["Input3"].dtype == np.float32 for f in samples.feeds)
    assert samples.origins[:5] == ["a.npy"] * 5
    require_min_samples(samples, 8)
    with pytest.raises(InputError, match="8 calibration sample"):
        require_min_samples(samples, 9)


def test_dynamic_batch_keeps_a_batch_as_one_call(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((6, 3), np.float32))
    samples = load_samples(tmp_path, DYNAMIC, purpose="evaluation")
    assert len(samples.feeds) == 1 and samples.sample_count == 6


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            np.zeros((2, 3, 4, 4), np.float32),
            "shape [2, 3, 4, 4] does not match input 'Input3' float32 [1, 1, 4, 4]",
        ),
        (np.array([["a"] * 16]).reshape(1, 1, 4, 4), "dtype <U1 does not match"),
    ],
)
def test_mismatches_name_the_file_and_the_expected_signature(
    tmp_path: Path, array: np.ndarray, message: str
) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputError) as raised:
        load_samples(tmp_path, FIXED, purpose="calibration")
    assert "bad.npy" in raised.value.one_line() and message in raised.value.one_line()


def test_npz_needs_every_input_and_carries_labels_and_references(tmp_path: Path) -> None:
    two = (TensorInfo("a", "float32", (1, 2)), TensorInfo("b", "int64", (1,)))
    np.savez(tmp_path / "s.npz", a=np.zeros((1, 2)), b=np.array([3]), y=np.ones((1, 5)), label=[4])
    samples = load_samples(tmp_path, two, output_names=("y",), purpose="evaluation")
    assert samples.feeds[0]["b"].dtype == np.int64
    assert samples.labels is not None and samples.labels.tolist() == [4]
    assert samples.references["y"][0].shape == (1, 5)
    np.savez(tmp_path / "t.npz", a=np.zeros((1, 2)))
    with pytest.raises(InputError, match=re.escape("t.npz: no array for input 'b'")):
        load_samples(tmp_path, two, purpose="evaluation")


def test_empty_missing_and_label_count_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="calibration directory not found"):
        load_samples(tmp_path / "nope", FIXED, purpose="calibration")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=re.escape("no .npy, .npz or image files")):
        load_samples(tmp_path, FIXED, purpose="calibration")
    np.save(tmp_path / "a.npy", np.zeros((3, 1, 4, 4), np.float32))
    np.save(tmp_path / "labels.npy", np.array([1, 2]))
    with pytest.raises(InputError, match="2 labels for 3 samples"):
        load_samples(tmp_path, FIXED, purpose="evaluation")


def test_images_follow_the_declared_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[..., 0] = 200  # red channel only
    Image.fromarray(pixels).save(tmp_path / "red.png")
    nhwc = (TensorInfo("img", "float32", (1, 4, 4, 3)),)
    prep = ImagePreprocessing(
        layout="NHWC", mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 1.0), scale=1 / 255
    )
    feed = load_samples(tmp_path, nhwc, preprocessing=prep, purpose="calibration").feeds[0]
    value = feed["img"]
    assert value.shape == (1, 4, 4, 3) and value.dtype == np.float32
    assert value[..., 0] == pytest.approx((200 / 255 - 0.5) / 0.5, abs=1e-5)
    assert np.all(value[..., 1:] == 0)
    nchw = (TensorInfo("img", "float32", (1, 1, 2, 2)),)
    gray = load_samples(tmp_path, nchw, purpose="calibration").feeds[0]["img"]
    assert gray.shape == (1, 1, 2, 2) and float(gray.max()) > 0


def test_one_calibration_floor_for_onnx_and_tflite(tmp_path: Path) -> None:
    """ONNX int8-static (packager.optimize) and the int8 TFLite converters (packager.models) refuse
    below the same count: 15 samples are too few for both, 16 are enough."""
    from packager.models import keras, onnx_tflite, torch_tflite
    from packager.optimize.request import OptimizeRequest

    assert MIN_CALIBRATION_SAMPLES == 16
    assert OptimizeRequest(Path("m.onnx"), Path("o"), "int8-static").min_calibration_samples == 16
    for module in (keras, onnx_tflite, torch_tflite):
        assert not hasattr(module, "MIN_CALIBRATION_SAMPLES"), module.__name__
    np.save(tmp_path / "a.npy", np.zeros((15, 1, 1, 4, 4), np.float32))
    with pytest.raises(InputError, match="15 calibration sample"):
        representative_rows(tmp_path, FIXED)
    np.save(tmp_path / "b.npy", np.zeros((1, 1, 4, 4), np.float64))
    rows = representative_rows(tmp_path, FIXED)
    assert len(rows) == 16
    for (row,) in rows:
        assert row.dtype == np.float32 and row.shape == (1, 1, 4, 4) and row.flags.c_contiguous


def test_a_missing_calibration_directory_names_the_model() -> None:
    with pytest.raises(InputError, match=r"m\.pt: a fully int8 model needs representative") as info:
        require_calibration(Path("m.pt"), None, files=".npy")
    assert ".npy samples" in (info.value.hint or "")
    assert require_calibration(Path("m.onnx"), Path("cal")) == Path("cal")
