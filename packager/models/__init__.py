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
from packager.models.info import ModelInfo


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
    ".pt": _lazy("packager.models.torch_info", "inspect_torch"),
    ".pth": _lazy("packager.models.torch_info", "inspect_torch"),
    ".pt2": _lazy("packager.models.torch_info", "inspect_torch"),
}


def inspect_model(path: Path) -> ModelInfo:
    """Inspect a model file, choosing the format by its suffix (a SavedModel: its directory)."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return _lazy("packager.models.keras", "inspect_keras")(path)
    inspector = INSPECTORS.get(path.suffix.lower())
    if inspector is None:
        supported = ", ".join(sorted(INSPECTORS))
        raise UnsupportedError(
            f"{path}: unsupported model format '{path.suffix or '(no suffix)'}'; "
            f"edgepack reads {supported}"
        )
    return inspector(path)
