"""Inspect an ONNX model: tensors, opsets, operators, weights, external data and an activation
estimate, without loading external weights into memory.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

# No protobuf stubs in the environment; the one name used here is an exception class.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from packager.agent.paths import PathError, check_inside, check_relpath
from packager.digest import CHUNK
from packager.errors import InputError
from packager.models.info import Dim, ModelInfo, TensorInfo, by_frequency

# Sub-byte types pack two elements per byte; numpy (ml_dtypes) reports an itemsize of 1 for them.
_FOUR_BIT = frozenset(
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(TensorProto, name)
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
# How many names a note lists before it says "and N more".
_NOTE_NAMES = 5


@dataclass(frozen=True)
class _External:
    tensor: str
    location: str
    offset: int
    length: int | None


def inspect_onnx(path: Path) -> ModelInfo:
    """Describe the ONNX model at ``path``; raise InputError for a missing or malformed file."""
    shown = str(path)
    data = _read_model_bytes(path)
    model = _parse(data, shown)
    graph = model.graph
    notes: list[str] = []

    initializer_names = {t.name for t in graph.initializer}
    inputs = tuple(
        _tensor_info(v.name, v.type) for v in graph.input if v.name not in initializer_names
    )
    outputs = tuple(_tensor_info(v.name, v.type) for v in graph.output)

    param_count, weights_bytes, externals = _weights(model)
    external_files = _external_files(path, shown, externals)
    digest, size_bytes = _digest(data, [p for _, p in external_files])

    activation_bytes = _activation_estimate(model, notes)

    return ModelInfo(
        path=path,
        format="onnx",
        digest=digest,
        size_bytes=size_bytes,
        inputs=inputs,
        outputs=outputs,
        opsets=_opsets(model),
        op_histogram=_op_histogram(graph),
        param_count=param_count,
        weights_bytes=weights_bytes,
        activation_bytes=activation_bytes,
        external_data=tuple(p for _, p in external_files),
        ir_version=model.ir_version or None,
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        notes=tuple(notes),
    )


# --- reading ------------------------------------------------------------------------------------


def _read_model_bytes(path: Path) -> bytes:
    shown = str(path)
    if path.is_dir():
        raise InputError(f"{shown}: is a directory, not an ONNX model file; pass the .onnx file")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{shown}: model file not found; check the path") from exc
    except OSError as exc:
        raise InputError(f"{shown}: cannot read the model file ({exc.strerror})") from exc


def _parse(data: bytes, shown: str) -> ModelProto:
    corrupt = InputError(
        f"{shown}: not a valid ONNX model (truncated or corrupt protobuf); "
        "re-export it or check the download"
    )
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError) as exc:
        raise corrupt from exc
    # Arbitrary bytes can decode as a protobuf of unknown fields; a real model has all of these.
    if (
        not model.HasField("graph")
        or model.ir_version <= 0
        or (len(model.graph.node) == 0 and len(model.graph.output) == 0)
    ):
        raise corrupt
    return model


# --- tensors and types --------------------------------------------------------------------------


def _dtype_name(elem_type: int) -> str:
    if elem_type == TensorProto.UNDEFINED:
        return "undefined"
    if elem_type == TensorProto.STRING:
        return "str"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError):
        return str(TensorProto.DataType.Name(elem_type)).lower()


def _element_bytes(elem_type: int, count: int) -> int:
    if elem_type in _FOUR_BIT:
        return (count + 1) // 2
    if elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return 0
    try:
        itemsize = int(onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, ValueError):
        return 0
    return itemsize * count


def _dims(type_: TypeProto) -> tuple[Dim, ...] | None:
    """Shape of a tensor type; None when the rank itself is unknown."""
    if not type_.HasField("tensor_type") or not type_.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in type_.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _tensor_info(name: str, type_: TypeProto) -> TensorInfo:
    kind = type_.WhichOneof("value")
    if kind != "tensor_type":
        # Sequences, maps and optionals have no single dtype or shape.
        return TensorInfo(name=name, dtype=str(kind or "undefined").removesuffix("_type"), shape=())
    return TensorInfo(
        name=name, dtype=_dtype_name(type_.tensor_type.elem_type), shape=_dims(type_) or ()
    )


# --- graph walking ------------------------------------------------------------------------------


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


def all_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every node of ``graph`` and of the If/Loop/Scan bodies inside it, in graph order: each
    node, then the nodes of its subgraphs (depth first)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from all_nodes(sub)


def _opsets(model: ModelProto) -> dict[str, int]:
    opsets: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in _DEFAULT_DOMAINS else entry.domain
        opsets[domain] = int(entry.version)
    return opsets


def _op_histogram(graph: GraphProto) -> dict[str, int]:
    """Operator counts including If/Loop/Scan bodies; custom-domain ops as ``domain.Op``."""
    counts = Counter(
        n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"
        for n in all_nodes(graph)
    )
    return by_frequency(counts)


# --- weights and external data ------------------------------------------------------------------


def _tensor_bytes(t: TensorProto, count: int) -> int:
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return _element_bytes(t.data_type, count)


def _constant_tensors(node: NodeProto) -> Iterator[tuple[int, int, TensorProto | None]]:
    """(elements, bytes, tensor-or-None) for the value a Constant node holds."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            count = math.prod(attr.t.dims)
            yield count, _tensor_bytes(attr.t, count), attr.t
        elif attr.name == "sparse_value" and attr.type == AttributeProto.SPARSE_TENSOR:
            values = attr.sparse_tensor.values
            count = math.prod(values.dims)
            yield count, _tensor_bytes(values, count), values
        elif attr.name in ("value_float", "value_int"):
            yield 1, 4 if attr.name == "value_float" else 8, None
        elif attr.name == "value_floats":
            yield len(attr.floats), 4 * len(attr.floats), None
        elif attr.name == "value_ints":
            yield len(attr.ints), 8 * len(attr.ints), None
        elif attr.name == "value_string":
            yield 1, len(attr.s), None
        elif attr.name == "value_strings":
            yield len(attr.strings), sum(len(s) for s in attr.strings), None


def _stored_tensors(graph: GraphProto) -> Iterator[tuple[int, int, TensorProto | None]]:
    for g in _all_graphs(graph):
        for t in g.initializer:
            count = math.prod(t.dims)
            yield count, _tensor_bytes(t, count), t
        for s in g.sparse_initializer:
            count = math.prod(s.values.dims)
            yield count, _tensor_bytes(s.values, count), s.values
        for node in g.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                yield from _constant_tensors(node)


def _weights(model: ModelProto) -> tuple[int, int, list[_External]]:
    """Parameter count and bytes from dims and dtypes, so external data is never read."""
    params = 0
    nbytes = 0
    externals: list[_External] = []
    for count, size, tensor in _stored_tensors(model.graph):
        params += count
        nbytes += size
        if tensor is not None and uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            offset = int(info.offset or 0)
            length = int(info.length) if info.length else size
            externals.append(_External(tensor.name, str(info.location), offset, length))
    return params, nbytes, externals


def _external_files(
    model_path: Path, shown: str, externals: Iterable[_External]
) -> list[tuple[str, Path]]:
    """The external data files, sorted by their normalised location, each checked to be a regular
    file inside the model's folder that holds its tensors' bytes.

    Raises InputError (exit 3) naming the model file, the tensor and the location for a location
    that is absolute, climbs out with ``..``, goes through or ends in a symbolic link, or resolves
    outside the model's folder: onnxruntime refuses such paths on the device too, and copying one
    would put a build-host file (``/etc/passwd``) into the image.
    """
    base = model_path.parent
    files: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    for ext in externals:
        rel = external_data_path(base, shown, ext.tensor, ext.location)
        if rel not in files:
            target = base / rel
            files[rel] = target
            sizes[rel] = target.stat().st_size
        end = ext.offset + (ext.length or 0)
        if end > sizes[rel]:
            raise InputError(
                f"{shown}: external data file '{ext.location}' is {sizes[rel]} bytes "
                f"but tensor '{ext.tensor}' needs bytes up to {end} (truncated copy?); "
                "copy the file again"
            )
    return sorted(files.items())


def external_data_path(base: Path, shown: str, tensor: str, location: str) -> str:
    """The normalised relative path (``weights/ext.bin``) of a tensor's external data file under
    ``base`` (the model's folder), after checking it is a regular file reached without a symlink.

    The bundle path policy (:mod:`packager.agent.paths`) applies, since the file lands in the
    image's model layer at that path: relative, no ``..``, no absolute path, no symlinked
    component, resolved inside ``base``. ``./`` and doubled slashes, which onnxruntime reads the
    same way, are normalised first. Raises InputError naming ``shown`` (the model file), the
    tensor and the location.
    """

    def refuse(why: str, fix: str) -> InputError:
        return InputError(
            f"{shown}: tensor '{tensor}': external data location {location!r} {why}; {fix}"
        )

    resave = "re-save the model with a location relative to its folder"
    if location.startswith("/") or re.match(r"[A-Za-z]:[/\\]", location):
        raise refuse("is an absolute path", resave)
    if ".." in location.split("/"):
        raise refuse("leaves the model's folder ('..')", resave)
    rel = "/".join(p for p in location.split("/") if p not in ("", "."))
    try:
        target = check_inside(base, check_relpath(rel))
    except PathError as exc:
        if "symbolic link" in str(exc):
            raise refuse(f"is refused: {exc}", "copy the real file into the model's folder"
                         ) from exc
        raise refuse(f"is refused: {exc}", resave) from exc
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        raise InputError(
            f"{shown}: external data file '{location}' (tensor '{tensor}') "
            f"not found at {target}; copy it next to the model"
        ) from None
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror})", "check the file") from exc
    if not stat.S_ISREG(info.st_mode):
        raise refuse("is not a regular file", "copy the real file into the model's folder")
    return rel


def check_external_data(path: Path) -> None:
    """Apply the external data policy of :func:`external_data_path` to the ONNX model at
    ``path`` without reading or hashing the weights: for steps that hand the model to a loader
    (onnxruntime, the optimizer) before it is inspected. Raises InputError."""
    model = _parse(_read_model_bytes(path), str(path))
    _, _, externals = _weights(model)
    _external_files(path, str(path), externals)


def _digest(model_bytes: bytes, external: list[Path]) -> tuple[str, int]:
    h = hashlib.sha256(model_bytes)
    size = len(model_bytes)
    for file in external:
        # O_NOFOLLOW: the file was checked not to be a link; a link planted since is refused.
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InputError(
                f"{file}: cannot open the external data file ({exc.strerror})"
            ) from exc
        with open(fd, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    return f"sha256:{h.hexdigest()}", size


# --- activation estimate ------------------------------------------------------------------------


# Initializers larger than this go to shape inference as dims only: inference needs the values of
# small shape-like tensors (Reshape targets) but copying 100 MB of weights through it is slow.
_INFER_DATA_LIMIT = 4096


def _light_copy(model: ModelProto) -> ModelProto:
    """The model for shape inference: nodes in topological order (inference walks them in
    order), large initializers as dims only."""
    graph = model.graph
    nodes = list(graph.node)
    light_graph = GraphProto(
        name=graph.name,
        node=[nodes[i] for i in _topological(nodes)],
        input=graph.input,
        output=graph.output,
        value_info=graph.value_info,
        sparse_initializer=graph.sparse_initializer,
    )
    for t in graph.initializer:
        # From dims, not ByteSize(): measuring the serialized tensor costs as much as copying it.
        if _tensor_bytes(t, math.prod(t.dims)) <= _INFER_DATA_LIMIT or uses_external_data(t):
            light_graph.initializer.append(t)
            continue
        placeholder = TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)
        # Marked external so inference treats the values as unavailable, as for external data.
        placeholder.data_location = TensorProto.EXTERNAL
        placeholder.external_data.add(key="location", value="(not loaded)")
        light_graph.initializer.append(placeholder)
    return ModelProto(
        ir_version=model.ir_version,
        opset_import=model.opset_import,
        functions=model.functions,
        graph=light_graph,
    )


def _infer(model: ModelProto, notes: list[str]) -> ModelProto:
    """The light copy with inferred shapes; its nodes are in topological order."""
    model = _light_copy(model)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as first:  # any inference failure degrades to the stored shapes
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            notes.append(
                f"shape inference failed ({_first_line(first)}); activation estimate uses the "
                "shapes stored in the model"
            )
            return model
        notes.append(f"shape inference with data propagation failed ({_first_line(first)})")
        return inferred


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _outer_names(graph: GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (they keep outer tensors alive)."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            used |= _outer_names(sub)
        local.update(node.output)
    used.update(o.name for o in graph.output)
    return used - local


def _reads(node: NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for sub in _subgraphs(node):
        names |= _outer_names(sub)
    return names


def _topological(nodes: list[NodeProto]) -> list[int]:
    """Node indices in a topological order that keeps the file's order where it is valid."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    deps: list[set[int]] = []
    for i, node in enumerate(nodes):
        deps.append({producer[n] for n in _reads(node) if n in producer and producer[n] != i})
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    # A cycle cannot be ordered; walk the rest in file order rather than drop it.
    seen = set(order)
    order.extend(i for i in range(len(nodes)) if i not in seen)
    return order


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_NOTE_NAMES])
    more = len(items) - _NOTE_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _activation_estimate(model: ModelProto, notes: list[str]) -> int:
    """Peak bytes of live non-weight tensors, walking the main graph in topological order."""
    inferred = _infer(model, notes)
    graph = inferred.graph
    types: dict[str, TypeProto] = {}
    for v in (*graph.value_info, *graph.input, *graph.output):
        types[v.name] = v.type

    weights = {t.name for t in graph.initializer}
    weights |= {t.values.name for t in graph.sparse_initializer}
    nodes = list(graph.node)
    order = list(range(len(nodes)))  # _infer sorted them
    end_step = len(order)

    start: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for v in graph.input:
        if v.name not in weights:
            start[v.name] = 0
    for step, idx in enumerate(order):
        node = nodes[idx]
        for name in _reads(node):
            if name in start:
                last_use[name] = step
        # Constant outputs are weights (counted in weights_bytes), not activations.
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            continue
        for out in node.output:
            if out and out not in weights:
                start.setdefault(out, step)
    for v in graph.output:
        if v.name in start:
            last_use[v.name] = end_step

    folded = _constant_derived(nodes, order, weights)
    folded_bytes = 0
    dynamic: set[str] = set()
    unknown: list[str] = []
    delta = np.zeros(end_step + 2, dtype=np.int64)
    for name, begin in start.items():
        size = _type_bytes(types.get(name), dynamic)
        if size is None:
            unknown.append(name)
            continue
        if name in folded:
            folded_bytes += size
        finish = last_use.get(name, begin)
        delta[begin] += size
        delta[finish + 1] -= size
    if dynamic:
        notes.append(
            f"dynamic dims taken as 1 for the activation estimate: {_names(sorted(dynamic))}"
        )
    if unknown:
        notes.append(
            f"{len(unknown)} tensor(s) of unknown shape counted as 0 bytes in the activation "
            f"estimate: {_names(unknown)}"
        )
    if folded_bytes:
        notes.append(
            f"activations include {folded_bytes} bytes of tensors computed only from weights "
            "(e.g. ConstantOfShape, a reshaped weight); a runtime that folds constants holds "
            "them as weights instead"
        )
    return int(np.cumsum(delta).max(initial=0))


def _constant_derived(nodes: list[NodeProto], order: list[int], weights: set[str]) -> set[str]:
    """Outputs that depend on no graph input, i.e. what constant folding would precompute."""
    constant = set(weights)
    derived: set[str] = set()
    for idx in order:
        node = nodes[idx]
        if node.op_type.startswith("Random") or node.op_type == "Constant":
            if node.op_type == "Constant":
                constant.update(node.output)
            continue
        if _reads(node) <= constant:
            outs = {o for o in node.output if o}
            constant |= outs
            derived |= outs
    return derived


def _type_bytes(type_: TypeProto | None, dynamic: set[str]) -> int | None:
    if type_ is None or type_.WhichOneof("value") != "tensor_type":
        return None
    tt = type_.tensor_type
    dims = _dims(type_)
    if dims is None or tt.elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    count = 1
    for d in dims:
        if isinstance(d, int):
            count *= d
        else:
            dynamic.add(d if isinstance(d, str) else "?")
    return _element_bytes(tt.elem_type, count)
