"""ONNX -> fully int8 TFLite for microcontrollers, calibrated on ``--calibration`` and checked
against the ONNX model before it is deployed.

Route: onnx2torch rebuilds the graph as a PyTorch module, then the PyTorch path of
``packager.models.torch_tflite`` (PT2E int8 quantization, litert-torch) writes the flatbuffer.
Measured on the shared ONNX models (mnist.onnx, Network.onnx, light_squeezenet.onnx) this route
converts all three to all-int8 flatbuffers once the graph is normalised here (explicit pads for
``auto_pad=SAME_*``, constant sub-graphs folded, inference Dropout removed, MatMul+Add as Gemm,
old opsets raised); onnx2tf 1.29.24 (the newest on PyPI) converted one of the three, tried to
download calibration images from GitHub for another, and hard-pins TensorFlow 2.19, onnx 1.19
and numpy 1.26 (conflicting with the ``mcu-convert`` extra's own pins).

The int8 model is then run in the LiteRT interpreter on the calibration rows and compared with
onnxruntime running the original ONNX model: every output must keep its direction (cosine) and,
where it is a score vector, its top-1 decision; otherwise AccuracyError (exit 11). Nothing here
reaches the network. Heavy: imported only on this path (the ``mcu-convert`` extra).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
from onnx import ModelProto, NodeProto, helper, numpy_helper

from packager.calibration import representative_rows, require_calibration
from packager.console import capture_fd
from packager.errors import AccuracyError, InputError, UnsupportedError
from packager.extras import require
from packager.models.fold import RANDOM_OPS
from packager.models.info import TensorInfo

# The converted model's agreement with the ONNX model on the calibration rows. 90 % top-1 is
# the bar the Keras path's tests hold int8 conversions to (tests/integration/test_mcu_sources.py);
# cosine 0.98 is the direction int8 rounding alone keeps on a sound model (mnist.onnx: 0.9994,
# the Iris MLP Network.onnx: 1.0000), while a broken output falls far below it.
MIN_COSINE = 0.98
MIN_TOP1_AGREEMENT = 0.90
# Rows compared (the first ones of --calibration); more only cost time.
MAX_CHECK_ROWS = 64
# A constant sub-graph is folded only while its result stays this small (MCU models are far
# smaller; larger results stay in the graph and its converter decides).
MAX_FOLD_ELEMENTS = 1 << 24
# Operators whose output can be far larger than their inputs: never folded (their converters
# take them as they are), so a hostile model cannot make the folding allocate without bound.
_GROWING = frozenset({"Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike"})
_POOLS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


@dataclass(frozen=True)
class OutputAgreement:
    """How one int8 output compares with the ONNX model's float output."""

    name: str
    cosine: float
    mean_abs_error: float  # in the output's own units
    top1_agreement: float | None  # None: not a score vector, or no decisive row
    top1_rows: int  # rows whose reference top-1 is decisive (margin over one int8 step)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "cosine": round(self.cosine, 6),
            "mean_abs_error": float(f"{self.mean_abs_error:.6g}"),
            "top1_agreement": None if self.top1_agreement is None else round(
                self.top1_agreement, 4
            ),
            "top1_rows": self.top1_rows,
        }


@dataclass(frozen=True)
class OnnxConversion:
    """The int8 flatbuffer and the agreement check that passed on it."""

    data: bytes
    route: str
    rows: int
    outputs: tuple[OutputAgreement, ...]

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f", top-1 {o.top1_agreement:.1%}"
            parts.append(f"{o.name}: cosine {o.cosine:.4f}{top1}")
        return (
            f"int8 TFLite agrees with the ONNX model on {self.rows} calibration rows "
            f"({'; '.join(parts)})"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "route": self.route,
            "check": {
                "rows": self.rows,
                "min_cosine": MIN_COSINE,
                "min_top1_agreement": MIN_TOP1_AGREEMENT,
                "outputs": [o.to_json() for o in self.outputs],
            },
        }


def convert_onnx_to_int8_tflite(path: Path, calibration: Path | None) -> OnnxConversion:
    """A TFLite flatbuffer with int8 inputs, outputs and kernels for the ONNX model at ``path``.

    Raises InputError (no/bad --calibration, unreadable model), UnsupportedError (exit 10,
    naming the first ONNX operator no converter handles), AccuracyError (exit 11, the int8
    model disagrees with the ONNX model) or ToolMissingError (the ``mcu-convert`` extra).
    """
    # The converters' C++ side prints to fd 1; keep stdout for --json.
    with capture_fd(1):
        return _convert(path, calibration)


def _convert(path: Path, calibration: Path | None) -> OnnxConversion:
    calibration = require_calibration(path, calibration)
    from packager.models.onnx import check_external_data

    check_external_data(path)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError for bad files
        raise InputError(f"{path}: cannot load the ONNX model ({_first_line(exc)})") from exc
    inputs = graph_inputs(model)
    names = [t.name for t in inputs]
    rows = representative_rows(calibration, inputs)
    prepared = normalize(model, {n: a.shape for n, a in zip(names, rows[0], strict=True)})
    module = to_torch(prepared, path, rows[0])
    from packager.models.torch_tflite import module_to_int8_tflite

    data = module_to_int8_tflite(module, rows, f"{path}: ONNX -> int8 TFLite conversion")
    check = rows[:MAX_CHECK_ROWS]
    outputs = agreement(path, names, check, data)
    return OnnxConversion(
        data=data, route="onnx2torch + litert-torch (PT2E int8)", rows=len(check),
        outputs=outputs,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the graph, made explicit --------------------------------------------------------------------


def graph_inputs(model: ModelProto) -> tuple[TensorInfo, ...]:
    """The inputs a caller feeds (initializers listed as inputs, IR < 4 style, excluded)."""
    from packager.models.onnx import _tensor_info

    stored = {t.name for t in model.graph.initializer}
    return tuple(_tensor_info(v.name, v.type) for v in model.graph.input if v.name not in stored)


def normalize(model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> ModelProto:
    """A copy of ``model`` the converter can take: inputs fixed to ``shapes`` (one calibration
    row each), initializers no longer listed as inputs (IR >= 4), constant sub-graphs folded
    into initializers (converters need weights as initializers: light_squeezenet builds them
    with ConstantOfShape) and ``auto_pad=SAME_*`` replaced by the explicit pads it stands for
    (onnx2torch does not implement SAME_UPPER: mnist.onnx uses it)."""
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    stored = {t.name for t in graph.initializer}
    kept = [_copy_value(v) for v in graph.input if v.name not in stored]
    del graph.input[:]
    graph.input.extend(kept)
    out.ir_version = max(out.ir_version, 4)
    for value in graph.input:
        shape = shapes.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    _inference_dropout(out)
    _fold_constants(out)
    _explicit_pads(out)
    _matmul_to_gemm(out)
    return out


def _matmul_to_gemm(model: ModelProto) -> None:
    """``MatMul(x[N, K], W[K, M])`` (+ ``Add(b[M])``) with constant W (and b) -> ``Gemm``:
    onnx2torch makes Gemm an nn.Linear, which PT2E quantizes; a plain MatMul stays a float
    FULLY_CONNECTED the int8-only kernels cannot run (mnist.onnx's last layer)."""
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    consumers: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = stored.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or ranks.get(node.input[0]) != 2:
            continue
        inputs = [node.input[0], node.input[1]]
        result = node.output[0]
        users = consumers.get(result, [])
        if len(users) == 1 and result not in outputs and users[0].op_type == "Add":
            add = users[0]
            other = add.input[1] if add.input[0] == result else add.input[0]
            bias = stored.get(other)
            if bias is not None and int(np.prod(bias.dims)) == weight.dims[1]:
                flat = numpy_helper.to_array(bias).reshape(-1)
                name = f"{other}__gemm_bias"
                graph.initializer.append(numpy_helper.from_array(flat, name))
                inputs.append(name)
                result = add.output[0]
                drop.add(id(add))
        node.op_type = "Gemm"
        del node.input[:]
        node.input.extend(inputs)
        del node.output[:]
        node.output.append(result)
    if drop:
        kept = []
        for node in graph.node:
            if id(node) not in drop:
                copied = NodeProto()
                copied.CopyFrom(node)
                kept.append(copied)
        del graph.node[:]
        graph.node.extend(kept)


def _inference_dropout(model: ModelProto) -> None:
    """Dropout at inference is the identity; onnx2torch keeps it as a module whose ratio check
    torch.export cannot trace (light_squeezenet). Replaced where its mask output is unused and
    training_mode is not given (the default is inference)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) > 2 and node.input[2]:
            continue
        if any(o in used for o in node.output[1:] if o):
            continue
        output = node.output[0]
        node.op_type = "Identity"
        del node.input[1:]
        del node.output[:]
        node.output.append(output)
        del node.attribute[:]


def _copy_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    # Elements of a repeated field die with the field; keep copies across the clear.
    copied = onnx.ValueInfoProto()
    copied.CopyFrom(value)
    return copied


def _opset(model: ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _foldable(node: NodeProto, constants: dict[str, Any]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in RANDOM_OPS:
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for a in node.attribute):
        return False
    if node.op_type == "Constant":
        return True
    if not node.input or not all(not i or i in constants for i in node.input):
        return False
    if node.op_type in _GROWING:
        return False
    if node.op_type == "ConstantOfShape":
        # Sized before it is built: a hostile shape must not allocate terabytes.
        shape = np.asarray(constants[node.input[0]]).reshape(-1)
        return bool((shape >= 0).all()) and int(np.prod(shape.astype(object))) <= MAX_FOLD_ELEMENTS
    return True


def _fold_constants(model: ModelProto) -> None:
    """Evaluate nodes whose inputs are all constant (onnx's reference evaluator) and store their
    results as initializers; nodes are in topological order (the ONNX spec requires it)."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opset = _opset(model)
    constants: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept: list[NodeProto] = []
    for node in graph.node:
        values: list[Any] | None = None
        if _foldable(node, constants) and not graph_outputs.intersection(node.output):
            feeds = {i: constants[i] for i in node.input if i}
            try:
                values = list(ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds))
            except Exception:  # left in the graph: its converter decides
                values = None
            if values is not None and any(
                np.asarray(v).size > MAX_FOLD_ELEMENTS for v in values
            ):
                values = None
        if values is None:
            copied = NodeProto()
            copied.CopyFrom(node)
            kept.append(copied)
            continue
        for name, value in zip(node.output, values, strict=False):
            if name:
                array = np.asarray(value)
                constants[name] = array
                graph.initializer.append(numpy_helper.from_array(array, name))
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | graph_outputs
    initializers = [t for t in graph.initializer if t.name in used]
    if len(initializers) != len(graph.initializer):
        copies = []
        for t in initializers:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            copies.append(c)
        del graph.initializer[:]
        graph.initializer.extend(copies)


def _explicit_pads(model: ModelProto) -> None:
    """``auto_pad=SAME_UPPER|SAME_LOWER`` -> ``pads``, from the inferred input shapes (the
    formula of the ONNX Conv/Pool specification: output = ceil(input / stride))."""
    if not any(
        n.op_type in _POOLS and any(a.name == "auto_pad" for a in n.attribute)
        for n in model.graph.node
    ):
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    for node in model.graph.node:
        mode = next((a for a in node.attribute if a.name == "auto_pad"), None)
        if node.op_type not in _POOLS or mode is None:
            continue
        if mode.s not in (b"SAME_UPPER", b"SAME_LOWER"):
            continue
        spatial = shapes.get(node.input[0], [])[2:]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = attrs.get("kernel_shape") or shapes.get(node.input[1], [])[2:]
        if not spatial or not all(spatial) or len(kernel) != len(spatial):
            continue  # shape unknown: left to the converter, which names the problem
        strides = attrs.get("strides") or [1] * len(spatial)
        dilations = attrs.get("dilations") or [1] * len(spatial)
        begin: list[int] = []
        end: list[int] = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            upper = mode.s == b"SAME_UPPER"
            begin.append(small if upper else total - small)
            end.append(total - small if upper else small)
        node.attribute.remove(mode)
        node.attribute.append(helper.make_attribute("pads", begin + end))


# --- ONNX -> PyTorch -----------------------------------------------------------------------------


def _onnx2torch() -> Any:
    """onnx2torch, importable even where torchvision is not.

    onnx2torch imports torchvision for its NonMaxSuppression and RoiAlign converters only. The
    torchvision wheel PyPI serves is built against CUDA PyTorch and fails to import next to the
    CPU build (``operator torchvision::nms does not exist``); then those two converters get a
    placeholder and a model using them is refused by name (they have no TFLite Micro kernel).
    """
    if "onnx2torch" not in sys.modules:
        try:
            import torchvision  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
        except Exception:
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]
            placeholder = types.ModuleType("torchvision")
            ops = types.ModuleType("torchvision.ops")

            def unavailable(*args: object, **kwargs: object) -> None:
                raise NotImplementedError("torchvision is not importable here")

            for attr in ("nms", "roi_align", "box_convert"):
                setattr(ops, attr, unavailable)
            placeholder.ops = ops  # type: ignore[attr-defined]
            sys.modules["torchvision"] = placeholder
            sys.modules["torchvision.ops"] = ops
    return require("onnx2torch", "converting ONNX models to TFLite", "mcu-convert")


_NEEDS_TORCHVISION = frozenset({"NonMaxSuppression", "RoiAlign"})


def unconvertible_ops(model: ModelProto) -> list[str]:
    """``op (opset N)`` for each operator onnx2torch has no converter for, in graph order.

    onnx2torch looks a node up by the ``since_version`` of its schema at the model's opset
    (``onnx2torch.node_converters.registry.get_converter``); the same lookup here.
    """
    from onnx import defs
    from onnx2torch.node_converters.registry import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        _CONVERTER_REGISTRY,
    )

    registered = {(d.domain or "", d.operation_type, d.version) for d in _CONVERTER_REGISTRY}
    versions = {o.domain or "": o.version for o in model.opset_import}
    placeholder = getattr(sys.modules.get("torchvision"), "__file__", None) is None
    missing: list[str] = []
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = versions.get(domain, 1)
        try:
            since = defs.get_schema(
                node.op_type, max_inclusive_version=version, domain=domain
            ).since_version
        except Exception:  # an unknown operator or domain: no schema, no converter
            since = version
        usable = (domain, node.op_type, since) in registered
        if placeholder and node.op_type in _NEEDS_TORCHVISION:
            usable = False
        label = f"{domain + '.' if domain else ''}{node.op_type} (opset {version})"
        if not usable and label not in missing:
            missing.append(label)
    return missing


# Default-domain opsets tried, in order, when the model's own lacks converters: onnx2torch
# registers most operators from opset 9-13 on, so old models (mnist.onnx: opset 7) go up.
_UPGRADE_OPSETS = (13, 17)


def convertible(model: ModelProto, source: Path) -> ModelProto:
    """``model``, or a copy at a newer opset (onnx's version converter), whose every operator
    onnx2torch converts; UnsupportedError (exit 10) naming the operators otherwise."""
    missing = unconvertible_ops(model)
    if not missing:
        return model
    current = _opset(model)
    for opset in _UPGRADE_OPSETS:
        if opset <= current:
            continue
        try:
            upgraded = onnx.version_converter.convert_version(model, opset)
        except Exception:  # the version converter lacks an adapter: try the next one
            continue
        if not unconvertible_ops(upgraded):
            return upgraded
    raise UnsupportedError(
        f"{source}: ONNX operator {', '.join(missing)} cannot be converted to TFLite for a "
        f"microcontroller (no ONNX -> PyTorch converter in onnx2torch)",
        hint="replace the operator in the model, or convert it to .tflite yourself",
    )


def to_torch(model: ModelProto, source: Path, example: tuple[Any, ...]) -> Any:
    """The ONNX graph as a PyTorch module (eval mode); UnsupportedError names missing ops."""
    onnx2torch = _onnx2torch()
    model = convertible(model, source)
    try:
        module = onnx2torch.convert(model).eval()
    except Exception as exc:  # the converters raise many unrelated types
        raise UnsupportedError(
            f"{source}: ONNX -> PyTorch conversion failed ({_first_line(exc)})",
            hint="only operators with int8 TFLite kernels can run on int8-only MCU targets",
        ) from exc
    try:
        return static_reshapes(module, example)
    except Exception as exc:  # the converters raise many unrelated types
        raise UnsupportedError(
            f"{source}: ONNX -> PyTorch conversion failed ({_first_line(exc)})",
            hint="only operators with int8 TFLite kernels can run on int8-only MCU targets",
        ) from exc


def static_reshapes(module: Any, example: tuple[Any, ...]) -> Any:
    """``module`` with each onnx2torch Reshape (which reads its target shape from a tensor at
    run time, a data-dependent branch torch.export refuses) replaced by ``torch.reshape`` to
    the output shape it produces on ``example`` (all shapes are static here: the inputs were
    fixed to one calibration row)."""
    import torch
    from onnx2torch.node_converters.reshape import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        OnnxReshape,
    )
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(module).propagate(*(torch.from_numpy(np.ascontiguousarray(a)) for a in example))
    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(
            module.get_submodule(node.target), OnnxReshape
        ):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            continue
        with graph.inserting_after(node):
            replacement = graph.call_function(
                torch.reshape, (node.args[0], tuple(int(d) for d in meta.shape))
            )
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        module.recompile()
    return module


# --- the agreement check -------------------------------------------------------------------------


def _reference(path: Path, names: list[str], rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    ort = require("onnxruntime", "checking the converted model against ONNX", "runtime")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [
            [np.asarray(v) for v in session.run(None, dict(zip(names, row, strict=True)))]
            for row in rows
        ]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise InputError(f"{path}: onnxruntime cannot run the model ({_first_line(exc)})") from exc


def _int8_runs(
    data: bytes, rows: list[tuple[Any, ...]]
) -> tuple[list[list[Any]], list[float]]:
    """Each row through the LiteRT interpreter (float outputs, dequantized with the model's own
    parameters), and each output's int8 step (its scale)."""
    from ai_edge_litert.interpreter import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        Interpreter,
    )

    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    steps = [float(o["quantization"][0]) for o in outs]
    converted: list[list[Any]] = []
    for row in rows:
        for detail, value in zip(ins, row, strict=True):
            scale, zero = detail["quantization"]
            if detail["dtype"] == np.int8 and scale:
                value = np.clip(np.round(value / scale + zero), -128, 127)
            interpreter.set_tensor(
                detail["index"], value.astype(detail["dtype"]).reshape(detail["shape"])
            )
        interpreter.invoke()
        results = []
        for detail in outs:
            raw = interpreter.get_tensor(detail["index"])
            scale, zero = detail["quantization"]
            results.append(
                (raw.astype(np.float32) - zero) * scale if scale else raw.astype(np.float32)
            )
        converted.append(results)
    return converted, steps


def agreement(
    path: Path, names: list[str], rows: list[tuple[Any, ...]], data: bytes
) -> tuple[OutputAgreement, ...]:
    """Compare the int8 flatbuffer with onnxruntime on ``rows``; AccuracyError below the bars."""
    output_names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    reference = _reference(path, names, rows)
    converted, steps = _int8_runs(data, rows)
    if converted and len(converted[0]) != len(output_names):
        raise UnsupportedError(
            f"{path}: the converted model has {len(converted[0])} outputs, the ONNX model "
            f"{len(output_names)}"
        )
    report: list[OutputAgreement] = []
    failures: list[str] = []
    for k, name in enumerate(output_names):
        ref = np.stack([r[k].reshape(-1) for r in reference]).astype(np.float64)
        got = np.stack([c[k].reshape(-1) for c in converted]).astype(np.float64)
        if ref.shape != got.shape:
            raise UnsupportedError(
                f"{path}: output '{name}' has {got.shape[1]} values per row after conversion, "
                f"{ref.shape[1]} in the ONNX model"
            )
        denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
        cosine = float((ref * got).sum() / denom) if denom else float(np.allclose(ref, got))
        top1: float | None = None
        decisive = 0
        if ref.shape[1] > 1:
            ordered = np.sort(ref, axis=1)
            # A top-1 closer than one int8 step cannot be kept by any int8 model.
            mask = ordered[:, -1] - ordered[:, -2] > steps[k]
            decisive = int(mask.sum())
            if decisive:
                same = ref.argmax(1) == got.argmax(1)
                top1 = float(same[mask].mean())
        entry = OutputAgreement(
            name=name,
            cosine=cosine,
            mean_abs_error=float(np.abs(ref - got).mean()),
            top1_agreement=top1,
            top1_rows=decisive,
        )
        report.append(entry)
        if cosine < MIN_COSINE:
            failures.append(f"'{name}' cosine {cosine:.4f} < {MIN_COSINE}")
        if top1 is not None and top1 < MIN_TOP1_AGREEMENT:
            failures.append(f"'{name}' top-1 agreement {top1:.1%} < {MIN_TOP1_AGREEMENT:.0%}")
    if failures:
        raise AccuracyError(
            f"{path}: the int8 TFLite model disagrees with the ONNX model on {len(rows)} "
            f"calibration rows ({'; '.join(failures)})",
            hint="give calibration samples that cover real inputs, or a model whose "
            "operators quantize well",
        )
    return tuple(report)
