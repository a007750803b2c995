"""PyTorch -> fully int8 TFLite for microcontrollers, through litert-torch (Google's maintained
PyTorch-to-LiteRT converter) and PyTorch 2 export quantization (PT2E), calibrated on
``--calibration``. Heavy: imported only on this path (the ``mcu-convert`` extra).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from packager.console import capture_fd
from packager.errors import InputError, UnsupportedError
from packager.extras import require
from packager.models.info import TensorInfo
from packager.models.keras import MIN_CALIBRATION_SAMPLES
from packager.models.torch_export import detect_kind, load_torch_model, require_torch

TORCH_SUFFIXES = (".pt", ".pth", ".pt2")


def _litert_torch() -> Any:
    return require("litert_torch", "converting PyTorch models to TFLite", "mcu-convert")


def convert_torch_to_int8_tflite(path: Path, calibration: Path | None) -> bytes:
    """A TFLite flatbuffer with int8 inputs, outputs and kernels, for a single-input model."""
    # The converter's C++ side prints to fd 1; keep stdout for --json.
    with capture_fd(1):
        return _convert(path, calibration)


def _calibration_rows(calibration: Path) -> list[np.ndarray[Any, Any]]:
    from packager.optimize.data import iter_rows, load_samples, require_min_samples

    first = next(iter(sorted(calibration.glob("*.npy"))), None) if calibration.is_dir() else None
    if first is None:
        raise InputError(
            f"{calibration}: no .npy samples for a PyTorch model",
            hint="save a float32 array [N, ...input shape without batch] as a .npy file",
        )
    shape = np.load(first, mmap_mode="r").shape
    signature = [TensorInfo(name="input", dtype="float32", shape=(1, *shape[1:]))]
    samples = load_samples(calibration, signature, purpose="calibration")
    require_min_samples(samples, MIN_CALIBRATION_SAMPLES)
    return [row["input"] for feed in samples.feeds for row in iter_rows(feed)]


def _convert(path: Path, calibration: Path | None) -> bytes:
    if calibration is None:
        raise InputError(
            f"{path}: a fully int8 model needs representative inputs",
            hint="pass --calibration DIR with .npy samples of real inputs",
        )
    litert_torch = _litert_torch()
    torch = require_torch()
    kind = detect_kind(path)
    if kind == "torchscript":
        raise UnsupportedError(
            f"{path}: TorchScript cannot be quantized for TFLite",
            hint="save the module with torch.save(model) or torch.export.save",
        )
    loaded = load_torch_model(path, kind)
    module = loaded.module() if kind == "exported-program" else loaded
    rows = _calibration_rows(calibration)
    example = (torch.from_numpy(np.ascontiguousarray(rows[0])),)
    from litert_torch.quantize.pt2e_quantizer import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        QuantConfig,
    )
    from torchao.quantization.pt2e.quantize_pt2e import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        convert_pt2e,
        prepare_pt2e,
    )

    quantizer = PT2EQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    try:
        graph = torch.export.export(module, example).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for row in rows:
                prepared(torch.from_numpy(np.ascontiguousarray(row)))
        quantized = convert_pt2e(prepared, fold_quantize=False)
        edge = litert_torch.convert(
            quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model.tflite"
            edge.export(str(out))
            return out.read_bytes()
    except Exception as exc:  # the exporter and converter raise many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(
            f"{path}: PyTorch -> int8 TFLite conversion failed ({first})",
            hint="only operators with int8 TFLite kernels can run on int8-only MCU targets",
        ) from exc
