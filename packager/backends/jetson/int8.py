"""The model a Jetson bundle ships for TensorRT: which precision the engine is built in, which
optimization (if any) runs on the host, and the checks the ONNX file passes before it is packed.

Precisions (the engine key's ``precision``):

``int8``
    TensorRT-ready explicit quantization: the existing optimizer (``OptimizeStep("int8-static")``,
    run by the core through ``packager.optimize.optimize_for_build``) with the TensorRT settings
    profile (:func:`packager.optimize.cpu.tensorrt_int8_settings`, chosen because the target's
    runtime engine is ``tensorrt``), measured against the FP32 model by its accuracy gate; then
    the backend's plan runs the Q/DQ lint for the target's TensorRT (:func:`.qdq_lint.check_qdq`)
    on the model it ships. Before that, ``edgepack build`` folds the model's constants with
    polygraphy (``FoldConstantsStep``, after the optimizer and before the final runtime check:
    :meth:`.backend.JetsonBackend.source_steps`), so the folded file is what is inspected,
    linted, keyed (``model_sha256``) and shipped, in every precision.
``fp16`` (the Jetson targets' default)
    **The FP32 ONNX model is shipped and the device builds the engine with ``trtexec --fp16``**;
    the host does not convert the file to float16. That is how TensorRT users do it, because:

    - ``--fp16`` lets TensorRT choose per layer and keep FP32 where a layer has no FP16 kernel or
      would overflow; an FP16 ONNX file (onnxruntime's ``convert_float_to_float16`` with
      ``keep_io_types``) pins every layer to FP16 and adds Cast nodes at the inputs/outputs that
      TensorRT must honour (literally so in TensorRT 10's strongly typed networks) and that get in
      the way of layer fusion;
    - an accuracy gate on onnxruntime's CPU FP16 would judge kernels the device never runs, so
      the host gate would be a stand-in that proves nothing about the engine; TensorRT's FP16
      is checked on the device against the references (:mod:`.reference`);
    - the same ONNX file serves the onnxruntime-CPU fallback, which is slow on FP16 files (CPU
      kernels mostly compute float32, so the converted graph adds casts).
``fp32``
    The FP32 ONNX model, built without reduced precision.

INT8 dynamic quantization and QOperator output are refused (UnsupportedError): onnxruntime writes
integer operators (DynamicQuantizeLinear, MatMulInteger, QLinear*) that TensorRT's parser
rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager.backends.base import OptimizeStep
from packager.errors import UnsupportedError, UsageError

EnginePrecision = Literal["fp16", "int8", "fp32"]


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`plan_model` decided: the host ``optimize`` step the core runs (None: the
    model stays FP32: only its constants are folded), the engine ``precision`` and the
    ``reason`` in words."""

    optimize: OptimizeStep | None
    precision: EnginePrecision
    reason: str


def _float_plan(fp16: bool, why: str) -> ModelPlan:
    """No optimizer: the FP32 ONNX (constants folded) is shipped and trtexec builds the engine
    in FP16 or FP32; ``why`` names what chose the precision."""
    return ModelPlan(
        None,
        "fp16" if fp16 else "fp32",
        f"{why}: FP32 ONNX shipped, the device builds the engine with "
        f"trtexec{' --fp16' if fp16 else ''}",
    )


def plan_model(
    quantize: str | None, preferred: str, *, calibration: Path | None = None
) -> ModelPlan:
    """The precision of a Jetson build, pure: ``quantize`` (the ``--quantize`` flag, None when
    not given), else the target's ``preferred`` precision (``runtime.preferred_precision``).

    - ``fp16`` / ``fp32``: no host step; the engine is built in that precision from FP32 ONNX;
    - ``int8-static`` (or ``int8`` preferred with ``calibration``): ``OptimizeStep("int8-static")``
      with the TensorRT profile, engine precision ``int8``;
    - ``int8-dynamic``: UnsupportedError (exit 10); ``int8`` preferred without calibration:
      UsageError naming ``--calibration``."""
    if quantize is None:
        if preferred in ("fp16", "fp32"):
            return _float_plan(preferred == "fp16", f"the target prefers {preferred}")
        if preferred == "int8":
            if calibration is None:
                raise UsageError(
                    "the target prefers int8: TensorRT INT8 is static Q/DQ, so pass "
                    "--calibration DIR (or --quantize fp16)"
                )
            quantize = "int8-static"
        else:
            raise UsageError(f"target precision '{preferred}': expected fp16, fp32 or int8")
    if quantize in ("fp16", "fp32"):
        return _float_plan(quantize == "fp16", f"--quantize {quantize}")
    if quantize == "int8-static":
        reason = "TensorRT explicit Q/DQ INT8 (symmetric int8, per-channel weights, float bias)"
        return ModelPlan(OptimizeStep("int8-static", reason), "int8", reason)
    if quantize == "int8-dynamic":
        raise UnsupportedError(
            "--quantize int8-dynamic: TensorRT takes INT8 only as static Q/DQ; dynamic "
            "quantization writes DynamicQuantizeLinear/MatMulInteger, which its parser rejects",
            hint="use --quantize int8-static --calibration DIR, or fp16",
        )
    raise UsageError(f"--quantize {quantize}: choose fp16, fp32 or int8-static for Jetson")
