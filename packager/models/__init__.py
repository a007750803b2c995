"""Model inspection and conversion, one module per model format.

Format modules import heavy libraries (onnx, tflite), so the dispatcher imports them only when a
model of that format is inspected.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import cast

from packager.errors import UnsupportedError
from packager.models.info import ModelFormat, ModelInfo
from packager.models.torch_export import TORCH_SUFFIXES, detect_kind
from packager.models.trust import CodeForm


def _lazy(module: str, function: str) -> Callable[[Path], ModelInfo]:
    def inspect(path: Path) -> ModelInfo:
        inspector = getattr(importlib.import_module(module), function)
        return cast(Callable[[Path], ModelInfo], inspector)(path)

    inspect.__name__ = function
    return inspect


# Suffix (lower case, with the dot) -> inspector; add a format with one line here.
INSPECTORS: dict[str, Callable[[Path], ModelInfo]] = {
    ".onnx": _lazy("packager.models.onnx", "inspect_onnx"),
    ".tflite": _lazy("packager.models.tflite", "inspect_tflite"),
    # Formats `build` converts (TensorFlow, the mcu-convert extra, loads them).
    ".keras": _lazy("packager.models.keras", "inspect_keras"),
    ".h5": _lazy("packager.models.keras", "inspect_keras"),
    **dict.fromkeys(sorted(TORCH_SUFFIXES), _lazy("packager.models.torch_info", "inspect_torch")),
}


# Suffix -> the format its inspector reads (one row per INSPECTORS row).
FORMATS: dict[str, ModelFormat] = {
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".keras": "keras",
    ".h5": "keras",
    **dict.fromkeys(sorted(TORCH_SUFFIXES), "pytorch"),
}


def _unsupported(path: Path) -> UnsupportedError:
    supported = ", ".join(sorted(INSPECTORS))
    return UnsupportedError(
        f"{path}: unsupported model format '{path.suffix or '(no suffix)'}'; "
        f"edgepack reads {supported}"
    )


def model_format(path: Path) -> ModelFormat:
    """The format :func:`inspect_model` will read ``path`` as, from its name alone (nothing is
    loaded; a SavedModel is its directory): UnsupportedError (exit 10) for an unknown suffix."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "keras"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise _unsupported(path)
    return fmt


def code_form(path: Path) -> CodeForm | None:
    """How loading ``path`` would run code from it (packager.models.trust.RUNS_CODE holds the
    forms that do), or None for a form whose loading runs none (ONNX, TFLite, Keras files loaded
    with safe_mode). Reads at most a PyTorch file's zip directory, never a model.

    A directory the Keras route takes (:func:`model_format` "keras": it holds ``saved_model.pb``
    or is named ``.keras``/``.h5``) is a SavedModel here, with or without ``saved_model.pb``:
    TensorFlow's loader also reads ``saved_model.pbtxt`` and ``saved_model.cpb``
    (tensorflow/python/saved_model/loader_impl.py, parse_saved_model), and that route converts
    any directory with ``TFLiteConverter.from_saved_model``. Any other directory reaches no
    TensorFlow loader (its format's reader refuses a directory), so it is not called one."""
    if path.is_dir():
        try:
            route = model_format(path)
        except UnsupportedError:
            return None
        return "saved-model" if route == "keras" else None
    if path.suffix.lower() in TORCH_SUFFIXES:
        return detect_kind(path)
    return None


def inspect_model(path: Path) -> ModelInfo:
    """Inspect a model file, choosing the format by its suffix (a SavedModel: its directory)."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return _lazy("packager.models.keras", "inspect_keras")(path)
    inspector = INSPECTORS.get(path.suffix.lower())
    if inspector is None:
        raise _unsupported(path)
    return inspector(path)
