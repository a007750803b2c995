"""Keras (``.keras``, ``.h5``) or SavedModel -> fully int8 TFLite, for int8-only MCU kernels.

TensorFlow is large, so it is imported only here and only when such a model is built; it lives
in an optional extra. Calibration data uses the same directory formats as ``edgepack optimize``
(``packager.calibration``).

A SavedModel directory is a program, not data: loading it runs graph operations from the file,
so the build loads it only with ``--trust-model-code`` (packager.models.trust), and ``inspect``
never loads it (:func:`_inspect_saved_model` parses ``saved_model.pb``). In the pinned TensorFlow
(2.21.0, read in ``.venv/lib/python3.11/site-packages/tensorflow/python``):

- ``tf.saved_model.load`` (``saved_model/load.py:821``) of a TF2 SavedModel builds a ``Loader``
  (``load.py:1056``), which restores the checkpoint through the restore functions the file
  names (``_load_checkpoint_save_and_restore_functions``, ``load.py:328``; ``_restore_checkpoint``,
  ``:226``, ``:548``) and then calls ``_initialize()`` on every ``CapturableResource``
  (``load.py:227-229``): a ``RestoredResource`` (``trackable/resource.py:290``) whose
  ``_initialize`` is a function from the file, run eagerly.
- a TF1-style SavedModel goes through ``load_v1_in_v2.load`` (``load.py:1070``), which restores
  the variables and then RUNS the graph's init op, ``loader_impl.get_init_op`` (the
  ``__saved_model_init_op`` signature, ``main_op`` or ``legacy_init_op``, ``loader_impl.py:210``)
  as ``_Initializer._initialize()`` (``load_v1_in_v2.py:261-284``).
- ``tf.lite.TFLiteConverter.from_saved_model`` loads it the same way (``lite/python/lite.py``,
  ``_load(saved_model_dir, tags)``).

Measured: a graph whose init op, or whose resource initializer, is ``tf.io.write_file`` (the
``WriteFile`` op: any path this process may write) writes its file during each of these loads
(tests/integration/test_untrusted_models.py).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from packager.bounded import read_bounded
from packager.calibration import representative_rows, require_calibration
from packager.console import capture_fd
from packager.digest import sha256_file
from packager.errors import InputError, UnsupportedError
from packager.extras import require
from packager.models import code_form
from packager.models.info import ModelInfo, TensorInfo, element_count, loaded_info
from packager.models.trust import check_trusted

# What inspect says of every Keras model: it is not deployable as it is.
_NOTES = ("MCU targets convert it to int8 TFLite with --calibration DIR",)


def _tensorflow() -> Any:
    return require("tensorflow", "converting Keras/SavedModel models to TFLite", "mcu-convert")


def load_keras_model(tf: Any, path: Path) -> Any:
    """``path`` (.keras / .h5) loaded with ``safe_mode=True``: no Python code from the file is
    deserialized, whatever ``keras.config.enable_unsafe_deserialization`` says elsewhere.

    Keras 3.15.1 (the one TensorFlow 2.21 ships as tf.keras): ``saving_api.load_model`` passes
    ``safe_mode`` to the .keras loader and to ``legacy_h5_format.load_model_from_hdf5``, which
    deserializes the .h5 config inside ``SafeModeScope(safe_mode)``
    (keras/src/legacy/saving/legacy_h5_format.py:137); ``Lambda.from_config``
    (keras/src/layers/core/lambda_layer.py:183-200) raises ValueError before
    ``python_utils.func_load`` unmarshals the lambda's bytecode. InputError (exit 3) with the fix
    for such a model; InputError for any other unreadable file."""
    try:
        return tf.keras.models.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError for bad files
        text = str(exc).strip()
        if "safe_mode" in text:
            raise InputError(
                f"{path}: refused: the model holds Python code (a Lambda layer or another "
                "object Keras deserializes only with safe_mode=False), and model files are "
                "untrusted",
                hint="rebuild the model without Lambda layers (a built-in layer, or a "
                "registered custom layer class) and save it as .keras",
            ) from exc
        first = text.splitlines()[0] if text else type(exc).__name__
        raise InputError(f"{path}: cannot load the Keras model ({first})") from exc


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


def convert_to_int8_tflite(path: Path, calibration: Path | None, *, trusted: bool = False) -> bytes:
    """A fully integer (int8 inputs, outputs and kernels) TFLite flatbuffer of ``path``.
    ``trusted``: the builder's ``--trust-model-code``; without it a SavedModel directory is
    refused (InputError, exit 3) before TensorFlow reads it: loading it runs its graph's init
    ops (module docstring)."""
    check_trusted(path, code_form(path), trusted)
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
            model = load_keras_model(tf, path)
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
    ``packager.models``): tensors, layer histogram and weights from the loaded Keras model
    (``safe_mode``: no deserialized Python code runs), or from a SavedModel's protobuf, never
    loaded (:func:`_inspect_saved_model`). activation_bytes is the largest single
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


# saved_model.pb is read whole and parsed by protobuf, which needs about 28x the file's size
# for a graph of many small nodes (measured: 112 MB of 3M nodes peaked at 3.9 GB), so the bound
# is far below protobuf's own 2 GiB: the graph of a model small enough for a microcontroller
# (the one SavedModel build target) is a few MiB; its weights are in variables/, not here.
_SAVED_MODEL_PB_LIMIT = 64 * 1024 * 1024
# The signature build and inspect read (tf.saved_model's default serving signature key).
_SERVING = "serving_default"
# Graph plumbing left out of the operator histogram (the old loaded inspector's set, plus the
# call ops whose functions are counted instead).
_PLUMBING = frozenset(
    {"Placeholder", "NoOp", "Identity", "Const", "ReadVariableOp", "PartitionedCall",
     "StatefulPartitionedCall"}
)  # fmt: skip
# Graph nodes that hold a variable: TF2 resource handles, TF1 reference variables.
_VARIABLE_OPS = frozenset({"VarHandleOp", "VariableV2", "Variable"})


def _node_name(tensor: str) -> str:
    """The node a graph input or tensor name refers to: ``^ctrl``, ``name:1``, ``name``."""
    return tensor.lstrip("^").split(":")[0]


def _called_functions(node: Any) -> list[str]:
    """The names of the functions a NodeDef calls through its attrs (call ops, If, While...)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names.extend(f.name for f in value.list.func)
    return names


def _meta_graph(saved: Any, path: Path) -> Any:
    """The MetaGraphDef tf.saved_model.load would read: the only one, or the one tagged
    exactly ``serve`` (the converter's default tags)."""
    graphs = list(saved.meta_graphs)
    if len(graphs) == 1:
        return graphs[0]
    serving = [g for g in graphs if set(g.meta_info_def.tags) == {"serve"}]
    if len(serving) != 1:
        raise InputError(
            f"{path}: the SavedModel holds {len(graphs)} MetaGraphs and not one tagged 'serve'",
            hint="export the serving graph alone (tf.saved_model.save)",
        )
    return serving[0]


def _signature_tensors(tf: Any, path: Path, tensors: Any, side: str) -> tuple[TensorInfo, ...]:
    out = []
    for key in sorted(tensors):
        proto = tensors[key]
        shape = proto.tensor_shape
        if proto.WhichOneof("encoding") != "name" or shape.unknown_rank:
            raise InputError(
                f"{path}: {_SERVING} {side} '{key}' is not a dense tensor of known rank",
                hint="export the signature with tf.TensorSpec inputs and outputs",
            )
        try:
            dtype = str(tf.dtypes.as_dtype(proto.dtype).name)
        except TypeError as exc:
            raise InputError(f"{path}: {_SERVING} {side} '{key}' has an unknown dtype") from exc
        dims = tuple(None if d.size < 0 else int(d.size) for d in shape.dim)
        out.append(TensorInfo(name=key, dtype=dtype, shape=dims))
    return tuple(out)


def _signature_graph(
    tf: Any, meta: Any, outputs: list[str]
) -> tuple[Counter[str], list[tuple[int, int]]]:
    """The operator histogram and the ``(elements, bytes)`` of each variable of the part of the
    graph the signature's ``outputs`` (tensor names) depend on: the graph's nodes walked back
    from them, and the bodies of the functions those nodes call, followed recursively (each
    node and function once). Protobuf only: nothing is run or traced."""
    graph = meta.graph_def
    nodes = {node.name: node for node in graph.node}
    library = {f.signature.name: f for f in graph.library.function}
    histogram: Counter[str] = Counter()
    weights: list[tuple[int, int]] = []
    seen_functions: set[str] = set()

    def count(node: Any) -> list[str]:
        """Count ``node``; the functions it calls."""
        if node.op in _VARIABLE_OPS:
            dims = [int(d.size) for d in node.attr["shape"].shape.dim]
            elements = element_count(dims) if all(d >= 0 for d in dims) else 0
            if elements is None:  # np.prod would wrap around to any number, 0 included
                raise ValueError(f"variable {node.name[:60]!r} has over 2**63 elements")
            try:
                itemsize = int(tf.dtypes.as_dtype(node.attr["dtype"].type).size)
            except TypeError:
                itemsize = 0
            weights.append((elements, elements * itemsize))
        elif node.op not in _PLUMBING:
            histogram[node.op] += 1
        return _called_functions(node)

    calls: list[str] = []
    pending = [_node_name(name) for name in outputs]
    seen_nodes: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        calls.extend(count(nodes[name]))
        pending.extend(_node_name(i) for i in nodes[name].input)
    while calls:
        function = calls.pop()
        if function in seen_functions or function not in library:
            continue
        seen_functions.add(function)
        for node in library[function].node_def:
            calls.extend(count(node))
    return histogram, weights


def _inspect_saved_model(tf: Any, path: Path) -> ModelInfo:
    """The ModelInfo of a SavedModel directory from its ``saved_model.pb`` alone, parsed by
    protobuf (``tensorflow.core.protobuf.saved_model_pb2``): tf.saved_model.load would run its
    init ops (module docstring). Inputs and outputs are the ``serving_default`` signature's
    (sorted by key, as tf.saved_model.load's ``structured_input_signature`` lists them); the
    histogram and the weights (each variable's declared dtype and shape) are those of the graph
    that signature runs; activation_bytes is unknown (0). InputError for an unreadable, oversized
    or unparsable file or a missing signature."""
    # Untyped modules (no stubs); tf (the mcu-convert extra) is imported already.
    saved_model_pb2 = importlib.import_module("tensorflow.core.protobuf.saved_model_pb2")
    decode_error = importlib.import_module("google.protobuf.message").DecodeError
    data = read_bounded(
        path / "saved_model.pb", _SAVED_MODEL_PB_LIMIT, what="not a SavedModel",
        follow_symlinks=False,  # the model's own file, never one a link points at
    )
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(data)
    except decode_error as exc:
        raise InputError(f"{path}: saved_model.pb is not a SavedModel protobuf ({exc})") from exc
    meta = _meta_graph(saved, path)
    if _SERVING not in meta.signature_def:
        raise InputError(
            f"{path}: the SavedModel has no {_SERVING} signature",
            hint="export it with signatures={'serving_default': ...} (tf.saved_model.save)",
        )
    signature = meta.signature_def[_SERVING]
    inputs = _signature_tensors(tf, path, signature.inputs, "input")
    outputs = _signature_tensors(tf, path, signature.outputs, "output")
    try:
        histogram, weights = _signature_graph(
            tf, meta, [signature.outputs[k].name for k in sorted(signature.outputs)]
        )
    except ValueError as exc:
        raise InputError(f"{path}: saved_model.pb: {exc}") from exc
    version = str(meta.meta_info_def.tensorflow_version)
    if not re.fullmatch(r"[0-9A-Za-z.+_-]{1,40}", version):
        version = "unknown"  # text from the file, shown on the console: only a version string
    return loaded_info(
        path, "keras", _directory_digest(path), (inputs, outputs), histogram, weights,
        producer=f"tensorflow {version} SavedModel", notes=_NOTES,
    )  # fmt: skip


def _inspect_keras(path: Path) -> ModelInfo:
    if path.is_dir():  # a SavedModel; a missing or irregular saved_model.pb is an InputError
        return _inspect_saved_model(_tensorflow(), path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found", hint="check the path")
    tf = _tensorflow()
    model = load_keras_model(tf, path)
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
