"""The ONNX-side operations of an optimization, each one call into onnx or onnxruntime's own
tools: inline loading, opset conversion, pre-processing, INT8 quantization and FP16 conversion.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from packager.calibration import Feed, SampleSet
from packager.errors import InputError, UnsupportedError
from packager.models.info import TensorInfo
from packager.models.onnx_save import data_file_name, model_files, save_onnx

_NO_KERNEL = re.compile(
    r"Could not find an implementation for (?P<op>\w+)\((?P<ver>\d+)\) node with name "
    r"'(?P<node>[^']*)'"
)


def load_inline(source: Path, dest: Path) -> None:
    """Copy ``source`` (with any external weights) to ``dest`` as one self-contained file."""
    try:
        model = onnx.load(str(source), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError for bad files
        raise InputError(
            f"{source}: cannot load the ONNX model or its external data ({exc})"
        ) from exc
    # IR < 4 requires every initializer to be listed as a graph input too; the quantizers and
    # users see those as inputs to feed, and onnx's version converter rejects IR 3 files that
    # skip the listing (mnist.onnx). IR 4 lets initializers stand alone, so only real inputs stay.
    initializers = {t.name for t in model.graph.initializer}
    real = [_copy(v) for v in model.graph.input if v.name not in initializers]
    model.ir_version = max(model.ir_version, 4)
    if len(real) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(real)
    save(model, dest)


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    # Elements of a repeated field die with the field; keep copies across the clear.
    copied = onnx.ValueInfoProto()
    copied.CopyFrom(value)
    return copied


def save(model: ModelProto, dest: Path) -> None:
    """Every model the optimizer writes goes through here: external data above protobuf's limit
    (``packager.models.onnx_save``)."""
    save_onnx(model, dest)


def is_large(path: Path) -> bool:
    """True for a model saved with external data: ``save`` only does that when the model is
    too large for one protobuf, so the tools that write it next must do the same."""
    return len(model_files(path)) > 1


def _clear_data_file(dest: Path) -> None:
    # onnx and onnxruntime append to an existing data file rather than replace it.
    dest.with_name(data_file_name(dest.name)).unlink(missing_ok=True)


def signature(path: Path) -> tuple[tuple[TensorInfo, ...], tuple[str, ...]]:
    """The model's real inputs (name, dtype, shape) and its output names."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor_info(v) for v in model.graph.input if v.name not in initializers)
    return inputs, tuple(v.name for v in model.graph.output)


def convert_opset(source: Path, dest: Path, target: int) -> None:
    """onnx's version converter: ``source`` rewritten at opset ``target`` into ``dest``.

    A large model's weights stay external. Raises UnsupportedError (exit 10) when onnx cannot
    convert it.
    """
    large = is_large(source)
    # The converter serializes the model it is given, so a large one goes without its weights
    # (references to the data file), which are loaded back after conversion.
    model = onnx.load(str(source), load_external_data=not large)
    try:
        converted = onnx.version_converter.convert_version(model, target)
        if large:
            onnx.load_external_data_for_model(converted, str(source.parent))
    except Exception as exc:  # the converter raises a bare RuntimeError/ConvertError
        message = " ".join(str(exc).split())[:300]
        raise UnsupportedError(
            f"{source.name}: onnx cannot convert this model to opset {target} ({message})",
            hint="re-export the model at a newer opset",
        ) from exc
    save(converted, dest)


def preprocess(source: Path, dest: Path) -> tuple[str, ...]:
    """onnxruntime's quant_pre_process; symbolic shape inference is skipped if it cannot cope."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external: dict[str, Any] = {}
    if is_large(source):
        external = {
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_location": data_file_name(dest.name),
        }
    _clear_data_file(dest)
    try:
        quant_pre_process(str(source), str(dest), **external)
        return ()
    except Exception as exc:  # symbolic shape inference raises anything on exotic graphs
        _clear_data_file(dest)
        quant_pre_process(str(source), str(dest), skip_symbolic_shape=True, **external)
        return (f"symbolic shape inference skipped ({' '.join(str(exc).split())[:120]})",)


def squeeze_gemm_biases(path: Path) -> int:
    """Reshape [1, N] Gemm biases to [N]; returns how many were changed.

    onnxruntime's per-channel bias-scale adjustment indexes the bias per output channel and
    fails on 2-D biases (e.g. mnist.onnx's ``Parameter194``); a [N] bias broadcasts the same way.
    """
    model = onnx.load(str(path))
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    initializers = {t.name: t for t in model.graph.initializer}
    changed: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        tensor = initializers[node.input[2]]
        if uses.get(tensor.name) != 1 or len(tensor.dims) != 2 or tensor.dims[0] != 1:
            continue
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(array.reshape(-1), tensor.name))
        changed.add(tensor.name)
    if changed:
        # Stale shape annotations for the biases would contradict the new shape.
        kept = [v for v in model.graph.value_info if v.name not in changed]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        save(model, path)
    return len(changed)


def quantize_static(
    source: Path,
    dest: Path,
    samples: SampleSet,
    *,
    quant_format: str,
    per_channel: bool,
    method: str,
    activation_type: str | None = None,
    reduce_range: bool = False,
    extra_options: dict[str, object] | None = None,
) -> None:
    """onnxruntime's quantize_static; ``activation_type`` a QuantType name (default: U8 for
    QOperator, S8 for QDQ), ``reduce_range`` 7-bit weights, ``extra_options`` its extra_options
    (packager.optimize.cpu: Int8Settings)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """The calibration samples, in file order, one model call each."""

        def __init__(self) -> None:
            self._feeds: Iterator[Feed] = iter(samples.feeds)

        def get_next(self) -> Feed | None:
            return next(self._feeds, None)

    # onnxruntime's x64 QOperator kernels are fast for uint8 activations with int8 weights
    # (it warns that S8S8 QOperator is slow); QDQ is fastest with S8S8.
    activations = QuantType.QUInt8 if quant_format == "QOperator" else QuantType.QInt8
    if activation_type is not None:
        activations = getattr(QuantType, activation_type)
    _ort_quantize(
        ort_quantize_static,
        source,
        dest,
        Reader(),
        quant_format=getattr(QuantFormat, quant_format),
        per_channel=per_channel,
        activation_type=activations,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        calibration_providers=["CPUExecutionProvider"],
        reduce_range=reduce_range,
        extra_options=dict(extra_options or {}),
    )


def _ort_quantize(
    quantizer: Callable[..., None], source: Path, dest: Path, *args: Any, **options: Any
) -> None:
    """Run one of onnxruntime's quantizers from ``source`` to ``dest`` with ``args`` and
    ``options``: a large model's weights go to NAME.onnx.data (as save() names it; a stale one
    is removed first), and stdout is silenced: the histogram calibrators print progress on it,
    and it must stay clean for --json."""
    large = is_large(source)
    _clear_data_file(dest)
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer(str(source), str(dest), *args, use_external_data_format=large, **options)


def quantize_dynamic(
    source: Path, dest: Path, *, per_channel: bool, reduce_range: bool = False
) -> None:
    """onnxruntime's quantize_dynamic: int8 weights, activations quantized at run time.

    ``reduce_range``: 7-bit weights. Through :func:`_ort_quantize` (external data, quiet stdout).
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    _ort_quantize(
        ort_quantize_dynamic,
        source,
        dest,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
    )


def convert_fp16(source: Path, dest: Path) -> None:
    """onnxruntime's float16 converter: float tensors to float16, keeping float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # A path, not a loaded model: onnxruntime then infers shapes with infer_shapes_path, which
    # copes with models over 2 GiB (infer_shapes on a ModelProto serializes it).
    # keep_io_types: callers keep feeding float32 and get float32 back.
    converted = convert_float_to_float16(str(source), keep_io_types=True)
    save(converted, dest)


def open_session(path: Path, label: str) -> Any:
    """An onnxruntime CPU session; a missing kernel becomes UnsupportedError naming the op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One thread: a fair, steadier comparison between variants on a shared host.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/NotImplemented types
        text = str(exc)
        found = _NO_KERNEL.search(text)
        if found:
            raise UnsupportedError(
                f"{label}: onnxruntime has no CPU kernel for operator {found['op']} "
                f"(opset {found['ver']}, node '{found['node']}') in this precision",
                hint="choose another --quantize/--format for this model",
            ) from exc
        raise UnsupportedError(
            f"{label}: onnxruntime cannot load the model ({' '.join(text.split())[:300]})"
        ) from exc


def run(session: Any, samples: SampleSet) -> list[list[np.ndarray[Any, Any]]]:
    """Every output of every feed, in order."""
    return [list(session.run(None, feed)) for feed in samples.feeds]


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name)
    except (KeyError, ValueError):
        dtype = "undefined"
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorInfo(value.name, dtype, tuple(dims))
