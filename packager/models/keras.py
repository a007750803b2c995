"""Keras (``.keras``, ``.h5``) or SavedModel -> fully int8 TFLite, for int8-only MCU kernels.

TensorFlow is large, so it is imported only here and only when such a model is built; it lives
in an optional extra. Calibration data uses the same directory formats as ``edgepack optimize``
(``packager.calibration``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packager.calibration import representative_rows, require_calibration
from packager.console import capture_fd
from packager.digest import sha256_file
from packager.errors import InputError, UnsupportedError
from packager.extras import require
from packager.models.info import ModelInfo, TensorInfo, loaded_info

# What inspect says of every Keras model: it is not deployable as it is.
_NOTES = ("MCU targets convert it to int8 TFLite with --calibration DIR",)


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
    calibration = require_calibration(path, calibration)
    tf = _tensorflow()
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

    rows = representative_rows(calibration, inputs)

    def representative() -> Iterator[list[Any]]:
        for row in rows:
            yield list(row)

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


def inspect_keras(path: Path) -> ModelInfo:
    """The inspector for ``.keras`` / ``.h5`` files and SavedModel directories (registered in
    ``packager.models``): tensors, layer histogram and weights from the loaded model
    (``safe_mode``: no deserialized Python code runs). activation_bytes is the largest single
    layer output (float32), an estimate: the int8 build measures the real arena."""
    with capture_fd(1):
        return _inspect_keras(path)


def _directory_digest(path: Path) -> tuple[str, int]:
    """sha256 over each file's relative path and bytes, in sorted order; the total size."""
    digest = hashlib.sha256()
    size = 0
    for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        data = item.read_bytes()
        digest.update(item.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(data).digest())
        size += len(data)
    return f"sha256:{digest.hexdigest()}", size


def _inspect_saved_model(tf: Any, path: Path) -> ModelInfo:
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"{path}: cannot load the SavedModel's serving_default signature ({exc})"
        ) from exc

    def info(name: str, spec: Any) -> TensorInfo:
        return TensorInfo(name=name, dtype=spec.dtype.name, shape=tuple(spec.shape.as_list()))

    inputs = tuple(
        info(k, v) for k, v in sorted(signature.structured_input_signature[1].items())
    )
    outputs = tuple(info(k, v) for k, v in sorted(signature.structured_outputs.items()))
    skip = {"Placeholder", "NoOp", "Identity", "Const", "ReadVariableOp"}
    histogram: Counter[str] = Counter(
        op.type for op in signature.graph.get_operations() if op.type not in skip
    )
    variables = [np.asarray(v) for v in getattr(loaded, "variables", ())]
    return loaded_info(
        path, "keras", _directory_digest(path), (inputs, outputs), histogram,
        ((int(v.size), int(v.nbytes)) for v in variables),
        producer=f"tensorflow {tf.__version__} SavedModel", notes=_NOTES,
    )


def _inspect_keras(path: Path) -> ModelInfo:
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return _inspect_saved_model(_tensorflow(), path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found", hint="check the path")
    tf = _tensorflow()
    try:
        model = tf.keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load the Keras model ({first})") from exc
    inputs = tuple(_input_signature(tf, model, path))
    outputs = tuple(
        TensorInfo(
            name=str(getattr(t, "name", f"output_{i}")).split(":")[0],
            dtype=np.dtype(t.dtype).name,
            shape=tuple(None if d is None else int(d) for d in t.shape),
        )
        for i, t in enumerate(model.outputs)
    )
    histogram: Counter[str] = Counter(type(layer).__name__ for layer in model.layers)
    weights = [np.asarray(w) for w in model.weights]
    peak = 0
    for layer in model.layers:
        for tensor in tf.nest.flatten(getattr(layer, "output", None)):
            shape = getattr(tensor, "shape", None)
            if shape is not None:
                peak = max(peak, 4 * int(np.prod([1 if d is None else int(d) for d in shape])))
    return loaded_info(
        path, "keras", sha256_file(path), (inputs, outputs), histogram,
        ((int(w.size), int(w.nbytes)) for w in weights),
        producer=f"keras {getattr(tf.keras, '__version__', '?')}", notes=_NOTES,
        opsets={"keras": int(str(getattr(tf.keras, "__version__", "3")).split(".")[0])},
        activation_bytes=peak,
    )
