"""The TensorRT engine runner, and the choice between it and the onnxruntime CPU fallback.

On a Jetson the runtime serves a TensorRT plan built on the device for its exact GPU, TensorRT
version and precision (the engine key, /work/brief/jetson.md; built by the first-boot unit into
/var/lib/edgepack/engines). The plan is loaded only when its ``.key.json`` equals the key in
runtime.json, the container's TensorRT and the GPU's SM match it, TensorRT deserializes it and a
warm-up inference runs; otherwise onnxruntime on the CPU serves the bundle's ONNX model (the
explicit fallback), and /v2/health/report and /metrics say which and why (``EngineStatus``).

TensorRT's own Python API, from the container (``tensorrt`` and NVIDIA's ``cuda-python`` are
imported only here and only when a plan is to be loaded; they are not pip requirements of the
image, the JetPack base provides them):
  - TensorRT >= 8.5: the name-based tensor API (``num_io_tensors``, ``get_tensor_name/mode/shape/
    dtype``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``); the only API in 10.
  - TensorRT 8.2 (JetPack 4): the bindings API (``num_bindings``, ``binding_is_input``,
    ``get_binding_shape``, ``set_binding_shape``, ``execute_async_v2``).
Device memory and the stream come from cuda-python's runtime module (``cudaMalloc``,
``cudaMemcpyAsync``, ``cudaStreamSynchronize``, ``cudaFree``); each call returns ``(err, ...)``,
and every ``err`` is checked.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import EngineConfig, RuntimeConfig
from .engine_key import EngineKeyError, check_plan, tensorrt_release
from .log import clip, event
from .model import (
    Array,
    ModelError,
    ServedModel,
    Signature,
    TensorSpec,
    file_digest,
    load_model,
)

RUNNER_TENSORRT = "tensorrt"
RUNNER_FALLBACK = "onnxruntime-cpu"
# The first TensorRT with the name-based tensor API (execute_async_v3); older ones use bindings.
NAME_BASED_API = (8, 5)
# TensorRT DataType names -> (Open Inference Protocol datatype, numpy dtype); what TensorRT can
# hold but a client cannot send (BF16, FP8, INT4) makes the plan invalid for this runtime.
DATATYPES: Mapping[str, tuple[str, np.dtype[Any]]] = {
    "FLOAT": ("FP32", np.dtype("<f4")),
    "HALF": ("FP16", np.dtype("<f2")),
    "INT8": ("INT8", np.dtype("i1")),
    "INT32": ("INT32", np.dtype("<i4")),
    "INT64": ("INT64", np.dtype("<i8")),
    "UINT8": ("UINT8", np.dtype("u1")),
    "BOOL": ("BOOL", np.dtype("?")),
}
# Device buffers are allocated in multiples of this (cudaMalloc's own alignment), and never empty.
_ALIGN = 256
# Reasons are one short line in the report, the metrics label and the log.
_REASON_CHARS = 240


class EngineError(Exception):
    """The plan cannot be loaded or a TensorRT/CUDA call failed (one-line message)."""


class InvalidArgument(Exception):
    """The request's shapes are outside the engine's optimization profile: the request's fault
    (the server answers 400 for exceptions of this name and readiness stays on)."""


@dataclass(frozen=True)
class EngineStatus:
    """What serves and why, in the words of jetson.md (``line``)."""

    runner: str  # RUNNER_TENSORRT | RUNNER_FALLBACK
    state: str  # "loaded" | "absent" | "invalid"
    plan: Path
    reason: str | None = None

    def line(self) -> str:
        if self.state == "loaded":
            return "engine: loaded"
        if self.state == "absent":
            return f"engine: absent, fallback: {RUNNER_FALLBACK}"
        return f"engine: invalid ({self.reason}), fallback: {RUNNER_FALLBACK}"

    def detail(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "state": self.state,
            "plan": str(self.plan),
            "reason": self.reason,
        }

    def labels(self) -> dict[str, str]:
        """The labels of the edgepack_engine_info gauge."""
        return {"engine": self.runner, "state": self.state, "status": self.line()}


# ---------------------------------------------------------------------------------------------
# CUDA through cuda-python


def _error_name(error: Any) -> str:
    return str(getattr(error, "name", error))


class Cuda:
    """The few cuda-python runtime calls the runner makes, each result's error checked."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.success = cudart.cudaError_t.cudaSuccess
        self.host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.device_to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def check(self, call: str, result: Any) -> Any:
        """The value(s) after ``err`` in a cuda-python result tuple; EngineError unless success."""
        if not isinstance(result, tuple) or not result:
            raise EngineError(
                f"{call}: unexpected result {clip(repr(result), 80)} from cuda-python"
            )
        error, *values = result
        if error != self.success:
            raise EngineError(f"{call} failed: {_error_name(error)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def sm(self) -> int:
        """The current device's compute capability as an int (87 for 8.7)."""
        device = self.check("cudaGetDevice", self.cudart.cudaGetDevice())
        properties = self.check(
            "cudaGetDeviceProperties", self.cudart.cudaGetDeviceProperties(device)
        )
        return int(properties.major) * 10 + int(properties.minor)

    def stream(self) -> Any:
        return self.check("cudaStreamCreate", self.cudart.cudaStreamCreate())

    def destroy_stream(self, stream: Any) -> None:
        self.check("cudaStreamDestroy", self.cudart.cudaStreamDestroy(stream))

    def synchronize(self, stream: Any) -> None:
        self.check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(stream))

    def malloc(self, nbytes: int) -> int:
        return int(self.check("cudaMalloc", self.cudart.cudaMalloc(nbytes)))

    def free(self, pointer: int) -> None:
        self.check("cudaFree", self.cudart.cudaFree(pointer))

    def to_device(self, pointer: int, host: Array, stream: Any) -> None:
        result = self.cudart.cudaMemcpyAsync(
            pointer, host.ctypes.data, host.nbytes, self.host_to_device, stream
        )
        self.check("cudaMemcpyAsync (host to device)", result)

    def to_host(self, host: Array, pointer: int, stream: Any) -> None:
        result = self.cudart.cudaMemcpyAsync(
            host.ctypes.data, pointer, host.nbytes, self.device_to_host, stream
        )
        self.check("cudaMemcpyAsync (device to host)", result)


# ---------------------------------------------------------------------------------------------
# The two TensorRT APIs behind one small interface


@dataclass(frozen=True)
class IoTensor:
    name: str
    is_input: bool
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    type_name: str  # TensorRT's DataType name: "FLOAT", ...
    # The optimization profile 0's smallest shape for an input with dynamic dimensions.
    min_shape: tuple[int, ...] | None = None


def _type_name(data_type: Any) -> str:
    return str(getattr(data_type, "name", str(data_type).rsplit(".", 1)[-1]))


class NameBasedApi:
    """TensorRT >= 8.5: IO tensors by name, execute_async_v3 on a stream."""

    def __init__(self, trt: Any, engine: Any, context: Any) -> None:
        self.trt = trt
        self.engine = engine
        self.context = context

    def tensors(self) -> list[IoTensor]:
        found = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            is_input = self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            minimum = None
            if is_input and any(d < 0 for d in shape):
                profile = self.engine.get_tensor_profile_shape(name, 0)
                minimum = tuple(int(d) for d in profile[0])
            found.append(
                IoTensor(
                    name, is_input, shape, _type_name(self.engine.get_tensor_dtype(name)), minimum
                )
            )
        return found

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_input_shape(name, shape))

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def execute(self, addresses: Mapping[str, int], stream: Any) -> bool:
        for name, pointer in addresses.items():
            if not self.context.set_tensor_address(name, pointer):
                raise EngineError(f"TensorRT refused the device address of tensor {name!r}")
        return bool(self.context.execute_async_v3(int(stream)))


class BindingsApi:
    """TensorRT 8.2: IO tensors by binding index, execute_async_v2 with a bindings list."""

    def __init__(self, trt: Any, engine: Any, context: Any) -> None:
        self.trt = trt
        self.engine = engine
        self.context = context
        if engine.has_implicit_batch_dimension:
            raise EngineError("the plan has an implicit batch dimension (not built from ONNX)")
        # With several optimization profiles each has its own set of bindings; profile 0's come
        # first, and execute_async_v2 takes the list for all of them.
        self.count = int(engine.num_bindings)
        self.per_profile = self.count // max(1, int(engine.num_optimization_profiles))
        self.index = {engine.get_binding_name(i): i for i in range(self.per_profile)}

    def tensors(self) -> list[IoTensor]:
        found = []
        for name, index in self.index.items():
            is_input = bool(self.engine.binding_is_input(index))
            shape = tuple(int(d) for d in self.engine.get_binding_shape(index))
            minimum = None
            if is_input and any(d < 0 for d in shape):
                profile = self.engine.get_profile_shape(0, index)
                minimum = tuple(int(d) for d in profile[0])
            found.append(
                IoTensor(
                    name, is_input, shape, _type_name(self.engine.get_binding_dtype(index)), minimum
                )
            )
        return found

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self.context.set_binding_shape(self.index[name], shape))

    def output_shape(self, name: str) -> tuple[int, ...]:
        if not self.context.all_binding_shapes_specified:
            raise EngineError("TensorRT: not every input shape is specified")
        return tuple(int(d) for d in self.context.get_binding_shape(self.index[name]))

    def execute(self, addresses: Mapping[str, int], stream: Any) -> bool:
        bindings = [0] * self.count
        for name, pointer in addresses.items():
            bindings[self.index[name]] = pointer
        return bool(self.context.execute_async_v2(bindings, int(stream)))


def tensorrt_version(trt: Any) -> str:
    """major.minor.patch of the imported ``tensorrt`` ("8.6.2.3" -> "8.6.2"), as the engine key
    holds it (engine_key.tensorrt_release)."""
    raw = str(getattr(trt, "__version__", ""))
    try:
        return tensorrt_release(raw)
    except EngineKeyError:
        raise EngineError(f"cannot read the TensorRT version {clip(raw, 40)!r}") from None


# ---------------------------------------------------------------------------------------------
# The served engine


class TensorRTModel:
    """A deserialized plan served like model.Model: same signature, ``run`` and ``warm_up``.

    Runs are serialized (one execution context, one stream); device buffers grow to the largest
    request seen and are freed by ``close``. Raises EngineError when the plan cannot be served.
    """

    platform = "tensorrt_plan"

    def __init__(
        self,
        trt: Any,
        cuda: Cuda,
        plan: bytes,
        *,
        name: str,
        version: str,
        path: Path,
        digest: str,
        dla_core: int | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.digest = digest
        self.cuda = cuda
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity in bytes)
        self._stream: Any = None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("TensorRT could not deserialize the plan (see the log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context")
        major, minor, _ = (int(part) for part in tensorrt_version(trt).split("."))
        api_class = NameBasedApi if (major, minor) >= NAME_BASED_API else BindingsApi
        self.api: NameBasedApi | BindingsApi = api_class(trt, self.engine, self.context)
        self.tensors = self.api.tensors()
        self.signature = Signature(
            tuple(self._spec(t) for t in self.tensors if t.is_input),
            tuple(self._spec(t) for t in self.tensors if not t.is_input),
        )
        self._min_shapes = {t.name: t.min_shape for t in self.tensors if t.min_shape}
        self._stream = cuda.stream()

    def _spec(self, tensor: IoTensor) -> TensorSpec:
        if tensor.type_name not in DATATYPES:
            raise EngineError(
                f"tensor {tensor.name!r} has TensorRT type {tensor.type_name}, "
                "which the runtime cannot serve"
            )
        datatype, dtype = DATATYPES[tensor.type_name]
        # A plan keeps no dimension names: a batch axis is declared in runtime.json (batch_axis).
        first: int | None = tensor.shape[0] if tensor.shape and tensor.shape[0] >= 0 else None
        return TensorSpec(tensor.name, datatype, tensor.shape, dtype, first)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self._buffers.get(name, (0, 0))
        if nbytes <= capacity:
            return pointer
        if pointer:
            del self._buffers[name]
            self.cuda.free(pointer)
        capacity = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        pointer = self.cuda.malloc(capacity)
        self._buffers[name] = (pointer, capacity)
        return pointer

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        """Run the engine on host arrays; returns the ``outputs`` named, as host arrays.

        Raises InvalidArgument for shapes outside the optimization profile, EngineError when
        TensorRT or CUDA fail.
        """
        with self._lock:
            if self._stream is None:
                raise EngineError("the engine is closed")
            hosts: dict[str, Array] = {}
            for spec in self.signature.inputs:
                array = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
                if not self.api.set_input_shape(spec.name, tuple(array.shape)):
                    raise InvalidArgument(
                        f"input {spec.name!r} shape {list(array.shape)} is outside the "
                        "engine's optimization profile"
                    )
                hosts[spec.name] = array
            results: dict[str, Array] = {}
            for spec in self.signature.outputs:
                shape = self.api.output_shape(spec.name)
                if any(d < 0 for d in shape):
                    raise EngineError(f"TensorRT left the shape of {spec.name!r} unresolved")
                results[spec.name] = np.empty(shape, dtype=spec.dtype)
            addresses: dict[str, int] = {}
            for name, array in {**hosts, **results}.items():
                addresses[name] = self._buffer(name, array.nbytes)
            for name, array in hosts.items():
                if array.nbytes:
                    self.cuda.to_device(addresses[name], array, self._stream)
            if not self.api.execute(addresses, self._stream):
                # What was queued must finish before the buffers are reused.
                self.cuda.synchronize(self._stream)
                raise EngineError("TensorRT's enqueue of the inference failed")
            for name in outputs:
                if results[name].nbytes:
                    self.cuda.to_host(results[name], addresses[name], self._stream)
            # The copies are asynchronous: ``hosts`` and ``results`` stay referenced until here.
            self.cuda.synchronize(self._stream)
            return [results[name] for name in outputs]

    def warm_up(self) -> None:
        """One inference on zeros at the profile's smallest shapes (other dynamic dims = 1)."""
        feeds = {}
        for spec in self.signature.inputs:
            minimum = self._min_shapes.get(spec.name)
            shape = minimum or tuple(1 if d < 0 else d for d in spec.shape)
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        self.run(feeds, [spec.name for spec in self.signature.outputs])

    def close(self) -> None:
        """Free the device buffers and the stream; TensorRT's objects go in reverse order."""
        with self._lock:
            if self._stream is None:
                return
            stream, self._stream = self._stream, None
            try:
                self.cuda.synchronize(stream)
            finally:
                buffers, self._buffers = self._buffers, {}
                problems = []
                for pointer, _ in buffers.values():
                    try:
                        self.cuda.free(pointer)
                    except EngineError as exc:
                        problems.append(str(exc))
                self.cuda.destroy_stream(stream)
                self.context = None
                self.engine = None
                self.runtime = None
                if problems:
                    raise EngineError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Choosing what serves


def _read_regular(path: Path) -> bytes:
    """The file's bytes; OSError for a missing file, a symlink or anything not a regular file."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file")
        return file.read()


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cuda-python's runtime module); ImportError when the container lacks them."""
    # Not installed on build hosts (no stubs either): the JetPack container provides them.
    import tensorrt  # type: ignore[import-not-found, unused-ignore]

    try:  # cuda-python >= 12.6 names the module cuda.bindings.runtime; older, cuda.cudart
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        from cuda import cudart  # type: ignore[import-not-found, unused-ignore]
    return tensorrt, cudart


class _Invalid(Exception):
    pass


def _open_engine(config: RuntimeConfig, engine: EngineConfig, plan_path: Path) -> TensorRTModel:
    """The loaded, warmed-up engine for a plan whose key file matched; _Invalid(reason) when it
    cannot serve here."""
    expected = engine.key
    if not config.model_path.is_file() or file_digest(config.model_path) != expected.model_sha256:
        raise _Invalid(f"the key's model_sha256 is not the sha256 of {config.model_path.name}")
    try:
        trt, cudart = import_tensorrt()
    except ImportError as exc:
        raise _Invalid(f"TensorRT's Python API cannot be imported: {exc}") from None
    found = tensorrt_version(trt)
    if found != expected.tensorrt:
        raise _Invalid(f"the container's TensorRT is {found}, the plan is for {expected.tensorrt}")
    cuda = Cuda(cudart)
    sm = cuda.sm()
    if sm != expected.sm:
        raise _Invalid(f"this GPU is sm{sm}, the plan is for sm{expected.sm}")
    try:
        plan = _read_regular(plan_path)
    except OSError as exc:
        raise _Invalid(f"cannot read {plan_path.name}: {exc.strerror or exc}") from None
    model = TensorRTModel(
        trt,
        cuda,
        plan,
        name=config.model_name,
        version=config.model_version,
        path=plan_path,
        digest=expected.model_sha256,
        dla_core=expected.dla_core,
    )
    try:
        model.warm_up()
    except Exception as exc:
        try:
            model.close()
        except EngineError:
            pass
        raise _Invalid(f"warm-up inference failed: {exc}") from None
    return model


def choose_engine(
    config: RuntimeConfig, engine: EngineConfig
) -> tuple[TensorRTModel | None, EngineStatus]:
    """The TensorRT model and "loaded", or None and why not (absent / invalid)."""
    found = check_plan(engine.key, engine.engines_dir)
    plan_path = found.plan
    if found.state == "absent":
        return None, EngineStatus(RUNNER_FALLBACK, "absent", plan_path)
    if not found.ready:
        return None, _fallback_status(plan_path, found.reason)
    try:
        model = _open_engine(config, engine, plan_path)
    except (_Invalid, EngineError) as exc:
        return None, _fallback_status(plan_path, str(exc))
    except Exception as exc:  # TensorRT and cuda-python raise their own types
        return None, _fallback_status(plan_path, f"{type(exc).__name__}: {exc}")
    return model, EngineStatus(RUNNER_TENSORRT, "loaded", plan_path)


def _fallback_status(plan_path: Path, reason: str) -> EngineStatus:
    """The fallback's status for a plan that cannot serve; ``reason`` as one short line."""
    return EngineStatus(
        RUNNER_FALLBACK, "invalid", plan_path, clip(" ".join(reason.split()), _REASON_CHARS)
    )


def load_served_model(config: RuntimeConfig) -> tuple[ServedModel, EngineStatus | None]:
    """What the server serves: the engine when runtime.json has one and it loads, else the ONNX
    model on onnxruntime (the status says why; None without an engine section).

    Raises ModelError when the ONNX model cannot be loaded, or the engine cannot and
    engine.fallback is "none".
    """
    engine = config.engine
    status: EngineStatus | None = None
    if engine is not None:
        model, status = choose_engine(config, engine)
        fallback = model is None and engine.fallback != "none"
        event(
            "engine",
            logging.INFO if model is not None else logging.WARNING,
            message=status.line() if model is not None or fallback else "no fallback",
            state=status.state,
            plan=str(status.plan),
            reason=status.reason,
        )
        if model is not None:
            return model, status
        if engine.fallback == "none":
            why = f" ({status.reason})" if status.reason else ""
            raise ModelError(
                f"{status.plan}: engine {status.state}{why} and runtime.json's engine.fallback "
                "is none"
            )
    onnx = load_model(
        config.model_path,
        config.model_name,
        config.model_version,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        cpu_mem_arena=config.cpu_mem_arena,
        mem_pattern=config.mem_pattern,
        arena_extend_strategy=config.arena_extend_strategy,
    )
    return onnx, status


__all__ = [
    "EngineError",
    "EngineStatus",
    "InvalidArgument",
    "TensorRTModel",
    "choose_engine",
    "load_served_model",
]
