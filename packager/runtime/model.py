"""The served model: an onnxruntime session and its signature in Open Inference Protocol terms."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .engine_key import sha256_file

Array = npt.NDArray[Any]

# onnxruntime's type strings -> (Open Inference Protocol datatype, numpy dtype). Little-endian
# explicitly: the binary tensor extension is little-endian whatever the host is.
DATATYPES: Mapping[str, tuple[str, np.dtype[Any]]] = {
    "tensor(float)": ("FP32", np.dtype("<f4")),
    "tensor(float16)": ("FP16", np.dtype("<f2")),
    "tensor(double)": ("FP64", np.dtype("<f8")),
    "tensor(int8)": ("INT8", np.dtype("i1")),
    "tensor(int16)": ("INT16", np.dtype("<i2")),
    "tensor(int32)": ("INT32", np.dtype("<i4")),
    "tensor(int64)": ("INT64", np.dtype("<i8")),
    "tensor(uint8)": ("UINT8", np.dtype("u1")),
    "tensor(uint16)": ("UINT16", np.dtype("<u2")),
    "tensor(uint32)": ("UINT32", np.dtype("<u4")),
    "tensor(uint64)": ("UINT64", np.dtype("<u8")),
    "tensor(bool)": ("BOOL", np.dtype("?")),
}


# A dynamic first dimension is a batch axis only when its symbolic name (ONNX dim_param) says so,
# whole name, any case: the names exporters and model zoos give a batch (PyTorch's dynamic_axes
# examples "batch_size"/"batch", the ONNX Model Zoo's "N", Keras' "batch"). Any other dynamic
# first dimension may be time (a time-major RNN), tokens or boxes, along which requests must not
# be concatenated; the build declares such a model's batch axis explicitly (runtime.json
# "batch_axis": 0, from `edgepack build --batch-axis 0`).
BATCH_DIM_NAMES = re.compile(r"n|b|bs|nbatch|batch|batches|batch_?size|batch_?dim", re.IGNORECASE)


def is_batch_dim(dim: object) -> bool:
    """True when ``dim`` (a dimension as onnx/onnxruntime report it: int, str or None) is a
    symbolic dimension named as a batch (BATCH_DIM_NAMES)."""
    return isinstance(dim, str) and BATCH_DIM_NAMES.fullmatch(dim) is not None


class ModelError(Exception):
    """The model cannot be loaded or uses a type the runtime cannot serve (one-line message)."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output in Open Inference Protocol terms, with its little-endian dtype."""

    name: str
    datatype: str  # "FP32", ...
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    dtype: np.dtype[Any]
    # The first dimension as the model declares it: a symbolic name, a size or None (unknown).
    first_dim: int | str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.datatype} {format_shape(self.shape)})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, each in the session's order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)

    @property
    def batchable(self) -> bool:
        """True when every tensor's first dimension is dynamic, so requests can be stacked."""
        tensors = self.inputs + self.outputs
        return all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)

    def unnamed_batch_axis(self) -> tuple[TensorSpec, ...]:
        """The tensors whose first dimension is not named as a batch (``is_batch_dim``): empty
        when the model itself declares its first axis a batch axis on every input and output."""
        return tuple(t for t in self.inputs + self.outputs if not is_batch_dim(t.first_dim))


def format_shape(shape: Sequence[int]) -> str:
    """(1, -1, 28) -> ``"[1,-1,28]"``, as error messages show a shape."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def _spec(node: Any, path: Path) -> TensorSpec:
    if node.type not in DATATYPES:
        raise ModelError(
            f"{path}: tensor {node.name!r} has type {node.type}, which the runtime cannot serve"
        )
    datatype, dtype = DATATYPES[node.type]
    # onnxruntime reports a dynamic dimension as a symbolic name (str) or None.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    first = node.shape[0] if node.shape else None
    if not isinstance(first, (int, str)):  # a tuple: CPython 3.8 (JetPack 5) has no int | str
        first = None
    return TensorSpec(node.name, datatype, shape, dtype, first)


def file_digest(path: Path) -> str:
    """Hex sha256 of the model file (:func:`.engine_key.sha256_file`: the same digest the
    engine key pins)."""
    return sha256_file(path)


class ServedModel(Protocol):
    """What the server serves: ``Model`` (onnxruntime) or tensorrt_runner.TensorRTModel."""

    name: str
    version: str
    path: Path
    digest: str  # hex sha256 of the ONNX model (the response cache's and the report's identity)
    signature: Signature
    platform: str  # the model metadata's "platform" (Triton's names)

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]: ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


class Model:
    """One loaded model. ``run`` is thread-safe: onnxruntime sessions allow concurrent runs."""

    platform = "onnxruntime_onnx"

    def __init__(self, session: Any, name: str, version: str, path: Path, digest: str) -> None:
        self.session = session
        self.name = name
        self.version = version
        self.path = path
        self.digest = digest
        self.signature = Signature(
            tuple(_spec(n, path) for n in session.get_inputs()),
            tuple(_spec(n, path) for n in session.get_outputs()),
        )

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        results: list[Array] = self.session.run(list(outputs), dict(inputs))
        return results

    def warm_up(self) -> None:
        """One inference on zeros (dynamic dimensions = 1) so the first client is not slow."""
        feeds = {
            spec.name: np.zeros(tuple(1 if d < 0 else d for d in spec.shape), dtype=spec.dtype)
            for spec in self.signature.inputs
        }
        self.run(feeds, [spec.name for spec in self.signature.outputs])

    def close(self) -> None:
        """Nothing to release before the process ends (the session frees itself)."""


# onnxruntime's ArenaExtendStrategy values (OrtArenaCfg's arena_extend_strategy).
ARENA_EXTEND_STRATEGIES: Mapping[str, int] = {"kNextPowerOfTwo": 0, "kSameAsRequested": 1}
_env_arena_lock = threading.Lock()
_env_arena_registered = False


def _use_same_as_requested_arena(ort: Any, options: Any) -> None:
    """Point the session at a process-wide CPU arena that grows by exactly what is requested.

    The CPU provider ignores provider options (an ``arena_extend_strategy`` there is silently
    dropped), so the strategy is set on an arena registered with onnxruntime's environment, which
    sessions use when ``session.use_env_allocators`` is "1". Registered once per process.
    """
    global _env_arena_registered
    with _env_arena_lock:
        if not _env_arena_registered:
            memory = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            strategy = ARENA_EXTEND_STRATEGIES["kSameAsRequested"]
            ort.create_and_register_allocator(
                memory, ort.OrtArenaCfg({"arena_extend_strategy": strategy})
            )
            _env_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def load_model(
    path: Path,
    name: str,
    version: str,
    *,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    cpu_mem_arena: bool = True,
    mem_pattern: bool = True,
    arena_extend_strategy: str = "kNextPowerOfTwo",
) -> Model:
    """The ONNX file on an onnxruntime CPU session, with the config's thread and memory options.

    ModelError (one line) for an unknown arena strategy, a missing file, a model onnxruntime
    cannot load, or a tensor type outside :data:`DATATYPES`.
    """
    # Imported here so that the config and protocol modules (and their tests) stay light.
    import onnxruntime as ort

    if arena_extend_strategy not in ARENA_EXTEND_STRATEGIES:
        raise ModelError(
            f"arena_extend_strategy must be one of {', '.join(ARENA_EXTEND_STRATEGIES)}"
            f" (got {arena_extend_strategy!r})"
        )
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (check model_path in the config)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.enable_cpu_mem_arena = cpu_mem_arena
    options.enable_mem_pattern = mem_pattern
    # kNextPowerOfTwo is the session arena's own default; only the other strategy needs the
    # environment's arena (and without an arena there is nothing to extend).
    if cpu_mem_arena and arena_extend_strategy != "kNextPowerOfTwo":
        _use_same_as_requested_arena(ort, options)
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        message = " ".join(str(exc).split())
        raise ModelError(f"{path}: onnxruntime cannot load the model: {message}") from None
    return Model(session, name, version, path, file_digest(path))
