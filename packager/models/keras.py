"""Keras (``.keras``, ``.h5``) or SavedModel -> fully int8 TFLite, for int8-only MCU kernels.

TensorFlow is large, so it is imported only here and only when such a model is built; it lives
in an optional extra. Calibration data uses the same directory formats as ``edgepack optimize``
(``packager.optimize.data``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packager.console import capture_fd
from packager.errors import InputError, UnsupportedError
from packager.extras import require
from packager.models.info import TensorInfo

# Fewer samples give int8 ranges that clip real inputs (the TFLite converter's own guidance is
# "around 100-500"; 16 is the floor below which edgepack refuses).
MIN_CALIBRATION_SAMPLES = 16


def _tensorflow() -> Any:
    return require("tensorflow", "converting Keras/SavedModel models to TFLite", "mcu-convert")


def _input_signature(tf: Any, model: Any, source: Path) -> list[TensorInfo]:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise InputError(f"{source}: the model declares no inputs; save it after building it")
    out = []
    for tensor in inputs:
        shape = tuple(None if d is None else int(d) for d in tensor.shape)
        name = str(getattr(tensor, "name", "input")).split(":")[0]
        out.append(TensorInfo(name=name, dtype=np.dtype(tensor.dtype).name, shape=shape))
    return out


def convert_to_int8_tflite(path: Path, calibration: Path | None) -> bytes:
    """A fully integer (int8 inputs, outputs and kernels) TFLite flatbuffer of ``path``."""
    # TensorFlow's C++ side prints to fd 1 while loading and converting; keep stdout for --json.
    with capture_fd(1):
        return _convert(path, calibration)


def _convert(path: Path, calibration: Path | None) -> bytes:
    if calibration is None:
        raise InputError(
            f"{path}: a fully int8 model needs representative inputs",
            hint="pass --calibration DIR with .npy/.npz samples of real inputs",
        )
    tf = _tensorflow()
    from packager.optimize.data import iter_rows, load_samples, require_min_samples

    try:
        if path.is_dir():
            converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
            loaded = tf.saved_model.load(str(path))
            signature = loaded.signatures["serving_default"]
            inputs = [
                TensorInfo(name=k, dtype=v.dtype.name, shape=tuple(v.shape.as_list()))
                for k, v in sorted(signature.structured_input_signature[1].items())
            ]
        else:
            model = tf.keras.models.load_model(str(path), compile=False)
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            inputs = _input_signature(tf, model, path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from exc

    samples = load_samples(calibration, inputs, purpose="calibration")
    require_min_samples(samples, MIN_CALIBRATION_SAMPLES)
    names = [t.name for t in inputs]

    def representative() -> Iterator[list[Any]]:
        for feed in samples.feeds:
            for row in iter_rows(feed):
                yield [row[n].astype(np.float32) for n in names]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    try:
        data: bytes = converter.convert()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(
            f"{path}: TFLite int8 conversion failed ({first})",
            hint="only operators with int8 TFLite kernels can run on int8-only MCU targets",
        ) from exc
    return data
