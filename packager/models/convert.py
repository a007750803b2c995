"""Any model format edgepack reads -> the fully int8 TFLite flatbuffer an MCU target runs,
dispatched on the inspected format (never on a guess): heavy converters import only when used."""

from __future__ import annotations

from pathlib import Path

from packager.errors import UnsupportedError
from packager.models.info import ModelInfo


def convert_for_mcu(model: ModelInfo, calibration: Path | None) -> bytes:
    """Int8 TFLite bytes for ``model`` (ONNX, Keras/SavedModel or PyTorch), calibrated on
    ``calibration``; the converters' errors (InputError, UnsupportedError exit 10,
    AccuracyError exit 11, ToolMissingError) pass through."""
    if model.format == "onnx":
        from packager.models.onnx_tflite import convert_onnx_to_int8_tflite

        return convert_onnx_to_int8_tflite(model.path, calibration).data
    if model.format == "keras":
        from packager.models.keras import convert_to_int8_tflite

        return convert_to_int8_tflite(model.path, calibration)
    if model.format == "pytorch":
        from packager.models.torch_tflite import convert_torch_to_int8_tflite

        return convert_torch_to_int8_tflite(model.path, calibration)
    raise UnsupportedError(f"{model.path}: no int8 TFLite conversion for {model.format} models")
