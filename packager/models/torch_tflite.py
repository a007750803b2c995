"""PyTorch -> fully int8 TFLite for microcontrollers, through litert-torch (Google's maintained
PyTorch-to-LiteRT converter) and PyTorch 2 export quantization (PT2E), calibrated on
``--calibration``. Heavy: imported only on this path (the ``mcu-convert`` extra).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from packager.calibration import representative_rows, require_calibration
from packager.console import capture_fd
from packager.errors import InputError, UnsupportedError
from packager.extras import require
from packager.models.info import TensorInfo
from packager.models.torch_export import (
    detect_kind,
    load_torch_model,
    require_torch,
)
from packager.models.trust import check_trusted


def _litert_torch() -> Any:
    return require("litert_torch", "converting PyTorch models to TFLite", "mcu-convert")


def convert_torch_to_int8_tflite(
    path: Path, calibration: Path | None, *, trusted: bool = False
) -> bytes:
    """A TFLite flatbuffer with int8 inputs, outputs and kernels, for a single-input model.
    ``trusted``: the builder's ``--trust-model-code``; without it InputError (exit 3) before the
    file is loaded (packager.models.trust.check_trusted: loading runs its code)."""
    check_trusted(path, detect_kind(path), trusted)
    # The converter's C++ side prints to fd 1; keep stdout for --json.
    with capture_fd(1):
        return _convert(path, calibration)


def _calibration_rows(calibration: Path) -> list[tuple[NDArray[np.float32], ...]]:
    first = next(iter(sorted(calibration.glob("*.npy"))), None) if calibration.is_dir() else None
    if first is None:
        raise InputError(
            f"{calibration}: no .npy samples for a PyTorch model",
            hint="save a float32 array [N, ...input shape without batch] as a .npy file",
        )
    shape = np.load(first, mmap_mode="r").shape
    signature = [TensorInfo(name="input", dtype="float32", shape=(1, *shape[1:]))]
    return representative_rows(calibration, signature)


def _convert(path: Path, calibration: Path | None) -> bytes:
    calibration = require_calibration(path, calibration, files=".npy")
    _litert_torch()  # the missing extra is named before the model is loaded
    kind = detect_kind(path)
    if kind == "torchscript":
        raise UnsupportedError(
            f"{path}: TorchScript cannot be quantized for TFLite",
            hint="save the module with torch.save(model) or torch.export.save",
        )
    loaded = load_torch_model(path, kind, trusted=True)  # checked by the caller
    module = loaded.module() if kind == "exported-program" else loaded
    rows = _calibration_rows(calibration)
    return module_to_int8_tflite(module, rows, f"{path}: PyTorch -> int8 TFLite conversion")


def module_to_int8_tflite(module: Any, rows: list[tuple[Any, ...]], label: str) -> bytes:
    """PT2E int8 quantization of ``module`` calibrated on ``rows`` (one tuple of float arrays,
    batch 1, per call), converted by litert-torch: a flatbuffer with int8 inputs, outputs and
    kernels. UnsupportedError ``"{label} failed (...)"`` when export or conversion fails."""
    litert_torch = _litert_torch()
    torch = require_torch()

    def tensors(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in row)

    example = tensors(rows[0])
    from litert_torch.quantize.pt2e_quantizer import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.pt2e_quantizer_utils import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        OP_TO_ANNOTATOR,
        propagate_annotation,
    )
    from litert_torch.quantize.quant_config import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        QuantConfig,
    )
    from torchao.quantization.pt2e.quantize_pt2e import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        convert_pt2e,
        prepare_pt2e,
    )

    class Quantizer(PT2EQuantizer):  # type: ignore[misc]
        """PT2EQuantizer, then once more its fixed-parameter (softmax, sigmoid) annotator and
        its propagation through reshapes: upstream runs the first before the second, so a
        softmax behind a flatten (onnx2torch's Softmax before opset 13) stayed float."""

        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            OP_TO_ANNOTATOR["fixed_qparams"](model, self.global_config, None)
            propagate_annotation(model)
            return model

    quantizer = Quantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    try:
        graph = torch.export.export(module, example).module()
        _annotatable_softmax(torch, graph)
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for row in rows:
                prepared(*tensors(row))
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
            f"{label} failed ({first})",
            hint="only operators with int8 TFLite kernels can run on int8-only MCU targets",
        ) from exc


def _annotatable_softmax(torch: Any, graph: Any) -> None:
    """``aten.softmax.int`` -> ``aten._softmax.default`` (the same function without a dtype
    argument): litert-torch's quantizer gives only the latter TFLite's fixed int8 softmax
    parameters, so a model ending in Softmax otherwise keeps a float SOFTMAX that int8-only
    kernels cannot run."""
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.softmax.int:
            continue
        if (len(node.args) > 2 and node.args[2] is not None) or node.kwargs.get("dtype"):
            continue  # a dtype cast is part of it: left as it is
        node.target = torch.ops.aten._softmax.default
        node.args = (node.args[0], node.args[1], False)
        node.kwargs = {}
        changed = True
    if changed:
        graph.recompile()
