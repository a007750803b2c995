"""STAND-INS for TensorRT's Python API and NVIDIA's cuda-python runtime module (``cuda.cudart``).

Neither TensorRT nor a GPU exists here. These stand-ins take their place in ``sys.modules`` for the
runner's tests and hold it to the call sequence of the real API version each one claims:

  - ``StandInCudart``: device memory is host bytearrays behind fake device pointers; every call
    returns cuda-python's ``(cudaError_t, value...)`` tuples; cudaMemcpyAsync and the engine's
    work are QUEUED on their stream and happen only at cudaStreamSynchronize (so a runner that
    reads outputs without synchronizing gets garbage); pointers must be live and large enough;
    freeing an unknown pointer or destroying a stream with work pending is a violation.
  - ``tensorrt_module(version, cudart)``: TensorRT >= 8.5 offers the name-based tensor API
    (``num_io_tensors``, ``get_tensor_*``, ``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``); 8.5/8.6 also keep the deprecated bindings API, which a runner must not
    use there (a call is a violation); 10.x has no bindings API at all (AttributeError). TensorRT
    8.2 has only the bindings API (``num_bindings``, ``binding_is_input``, ``get_binding_shape``,
    ``set_binding_shape``, ``execute_async_v2``).
  - The "engine" is real computation: a stand-in plan (``make_plan``) carries an ONNX model and
    the TensorRT version it was "built" with; executing runs that model through onnxruntime on
    the bytes in stand-in device memory. ``deserialize_cuda_engine`` returns None, as TensorRT
    does, for bytes that are not a plan of its own version.

Every departure from the real API's contract is appended to ``violations`` (and, where the real
API reports it, also answered with its error code or False); tests assert the list is empty.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

PLAN_MAGIC = b"STAND-IN TENSORRT PLAN\n"
_ORT_TYPES = {
    "tensor(float)": ("FLOAT", np.dtype("<f4")),
    "tensor(float16)": ("HALF", np.dtype("<f2")),
    "tensor(int8)": ("INT8", np.dtype("i1")),
    "tensor(int32)": ("INT32", np.dtype("<i4")),
    "tensor(int64)": ("INT64", np.dtype("<i8")),
    "tensor(uint8)": ("UINT8", np.dtype("u1")),
    "tensor(bool)": ("BOOL", np.dtype("?")),
    "tensor(double)": ("DOUBLE_UNSUPPORTED", np.dtype("<f8")),
}


# --------------------------------------------------------------------------------------------
# cuda-python's runtime module


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35  # what real cuda-python answers on a host without a driver
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


@dataclass
class DeviceProperties:
    major: int
    minor: int
    name: bytes = b"stand-in GPU"


class cudaStream_t:
    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.pending: list[tuple[str, Callable[[], None]]] = []
        self.alive = True

    def __int__(self) -> int:
        return self.handle


class StandInCudart(types.ModuleType):
    """A stand-in for ``cuda.cudart`` (cuda-python); see the module docstring."""

    def __init__(self, sm: int = 87) -> None:
        super().__init__("cuda.cudart")
        self.cudaError_t = cudaError_t
        self.cudaMemcpyKind = cudaMemcpyKind
        self.properties = DeviceProperties(sm // 10, sm % 10)
        self.memory: dict[int, bytearray] = {}  # live allocations: base pointer -> bytes
        self.streams: dict[int, cudaStream_t] = {}
        self.calls: list[str] = []  # the sequence of calls made, by name
        self.violations: list[str] = []
        self.fail_malloc_at: int | None = None  # the n-th cudaMalloc (0-based) fails
        self.device_error: cudaError_t | None = None  # cudaGetDevice fails (no GPU visible)
        self.mallocs = 0
        self._next = 0x7F00_0000_0000

    # -- helpers for the stand-in TensorRT
    def region(self, pointer: int, nbytes: int) -> tuple[bytearray, int] | None:
        """The allocation holding [pointer, pointer + nbytes), and the offset in it."""
        for base, data in self.memory.items():
            if base <= pointer and pointer + nbytes <= base + len(data):
                return data, pointer - base
        return None

    def stream_of(self, handle: Any) -> cudaStream_t | None:
        stream = self.streams.get(int(handle)) if handle is not None else None
        return stream if stream is not None and stream.alive else None

    def violate(self, message: str) -> None:
        self.violations.append(message)

    # -- cuda-python API
    def cudaGetDevice(self) -> tuple[cudaError_t, int]:
        self.calls.append("cudaGetDevice")
        if self.device_error is not None:
            return self.device_error, None
        return cudaError_t.cudaSuccess, 0

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, Any]:
        self.calls.append("cudaGetDeviceProperties")
        if device != 0:
            return cudaError_t.cudaErrorInvalidValue, None
        return cudaError_t.cudaSuccess, self.properties

    def cudaStreamCreate(self) -> tuple[cudaError_t, cudaStream_t]:
        self.calls.append("cudaStreamCreate")
        stream = cudaStream_t(0x5000 + len(self.streams) + 1)
        self.streams[stream.handle] = stream
        return cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        self.calls.append("cudaStreamSynchronize")
        live = self.stream_of(stream)
        if live is None:
            self.violate("cudaStreamSynchronize on a stream that is not live")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        work, live.pending = live.pending, []
        for _name, operation in work:
            operation()
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        self.calls.append("cudaStreamDestroy")
        live = self.stream_of(stream)
        if live is None:
            self.violate("cudaStreamDestroy of a stream that is not live")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if live.pending:
            self.violate("cudaStreamDestroy with work still queued (no synchronize)")
        live.alive = False
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:
        self.calls.append("cudaMalloc")
        index, self.mallocs = self.mallocs, self.mallocs + 1
        if index == self.fail_malloc_at:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        if not isinstance(size, int) or size <= 0:
            self.violate(f"cudaMalloc({size!r})")
            return cudaError_t.cudaErrorInvalidValue, 0
        pointer = self._next
        self._next += (size + 0xFFFF) & ~0xFFFF
        self.memory[pointer] = bytearray(size)
        return cudaError_t.cudaSuccess, pointer

    def cudaFree(self, pointer: int) -> tuple[cudaError_t]:
        self.calls.append("cudaFree")
        if pointer not in self.memory:
            self.violate(f"cudaFree of {pointer:#x}, which is not a live allocation")
            return (cudaError_t.cudaErrorInvalidValue,)
        if any(s.pending for s in self.streams.values() if s.alive):
            self.violate("cudaFree while work is queued on a stream")
        del self.memory[pointer]
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(
        self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any
    ) -> tuple[cudaError_t]:
        live = self.stream_of(stream)
        if live is None:
            self.violate("cudaMemcpyAsync on a stream that is not live")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.calls.append("cudaMemcpyAsync:HtoD")
            target = self.region(dst, count)
            if target is None or not isinstance(src, int) or src == 0:
                self.violate(f"cudaMemcpyAsync HtoD: {count} bytes do not fit at {dst:#x}")
                return (cudaError_t.cudaErrorInvalidValue,)
            data, offset = target

            def host_to_device() -> None:  # the host buffer is read when the copy runs
                data[offset : offset + count] = ctypes.string_at(src, count)

            live.pending.append(("HtoD", host_to_device))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            self.calls.append("cudaMemcpyAsync:DtoH")
            source = self.region(src, count)
            if source is None or not isinstance(dst, int) or dst == 0:
                self.violate(f"cudaMemcpyAsync DtoH: {count} bytes not at {src:#x}")
                return (cudaError_t.cudaErrorInvalidValue,)
            data, offset = source

            def device_to_host() -> None:
                chunk = bytes(data[offset : offset + count])
                ctypes.memmove(dst, chunk, count)

            live.pending.append(("DtoH", device_to_host))
        else:
            self.violate(f"cudaMemcpyAsync kind {kind!r}")
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)


def cuda_package(cudart: StandInCudart) -> types.ModuleType:
    """The stand-in ``cuda`` package as older cuda-python has it (``from cuda import cudart``)."""
    package = types.ModuleType("cuda")
    package.cudart = cudart  # type: ignore[attr-defined]
    return package


# --------------------------------------------------------------------------------------------
# TensorRT


def make_plan(onnx_path: Path, tensorrt_version: str, max_rows: int = 8) -> bytes:
    """A stand-in plan: the ONNX model, the version that "built" it and its profile's max rows."""
    header = json.dumps({"tensorrt": tensorrt_version, "max_rows": max_rows}).encode()
    return PLAN_MAGIC + header + b"\n" + onnx_path.read_bytes()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3])


@dataclass
class _Tensor:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    type_name: str
    dtype: np.dtype[Any]


@dataclass
class Recorder:
    """What the stand-in saw: calls by name and violations of the real API's contract."""

    calls: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


class _Engine:
    def __init__(self, trt: Any, onnx_bytes: bytes, max_rows: int, recorder: Recorder) -> None:
        self.trt = trt
        self.recorder = recorder
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.max_rows = max_rows
        self.io: list[_Tensor] = []
        for node, is_input in [(n, True) for n in self.session.get_inputs()] + [
            (n, False) for n in self.session.get_outputs()
        ]:
            type_name, dtype = _ORT_TYPES[node.type]
            shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
            self.io.append(_Tensor(node.name, is_input, shape, type_name, dtype))
        self.by_name = {t.name: t for t in self.io}
        self.contexts: list[Any] = []

    def profile(self, tensor: _Tensor) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        low = tuple(1 if d < 0 else d for d in tensor.shape)
        high = tuple(
            (self.max_rows if i == 0 else 64) if d < 0 else d for i, d in enumerate(tensor.shape)
        )
        return low, low, high

    def in_profile(self, tensor: _Tensor, shape: Sequence[int]) -> bool:
        low, _, high = self.profile(tensor)
        return len(shape) == len(low) and all(
            lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)
        )

    def output_shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output shapes as TensorRT infers them from the input shapes (here: by a run on
        zeros through onnxruntime)."""
        feeds = {
            name: np.zeros(shape, dtype=self.by_name[name].dtype)
            for name, shape in input_shapes.items()
        }
        outputs = [t.name for t in self.io if not t.is_input]
        return {
            name: tuple(value.shape)
            for name, value in zip(outputs, self.session.run(outputs, feeds), strict=True)
        }

    def compute(
        self,
        cudart: StandInCudart,
        input_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
    ) -> Callable[[], None]:
        """The work queued on the stream: read the inputs from device memory, run the model,
        write the outputs to device memory."""
        out_shapes = self.output_shapes(input_shapes)

        def run() -> None:
            feeds = {}
            for name, shape in input_shapes.items():
                tensor = self.by_name[name]
                nbytes = int(np.prod(shape)) * tensor.dtype.itemsize
                region = cudart.region(addresses[name], nbytes)
                assert region is not None, f"input {name} freed before the engine ran"
                data, offset = region
                raw = bytes(data[offset : offset + nbytes])
                feeds[name] = np.frombuffer(raw, dtype=tensor.dtype).reshape(shape)
            outputs = list(out_shapes)
            for name, value in zip(outputs, self.session.run(outputs, feeds), strict=True):
                raw = np.ascontiguousarray(value, dtype=self.by_name[name].dtype).tobytes()
                region = cudart.region(addresses[name], len(raw))
                assert region is not None, f"output {name} freed before the engine ran"
                data, offset = region
                data[offset : offset + len(raw)] = raw

        return run

    def check_addresses(
        self,
        cudart: StandInCudart,
        input_shapes: dict[str, tuple[int, ...]],
        addresses: dict[str, int],
        api: str,
    ) -> bool:
        ok = True
        out_shapes = self.output_shapes(input_shapes)
        for tensor in self.io:
            pointer = addresses.get(tensor.name)
            shape = input_shapes.get(tensor.name) or out_shapes[tensor.name]
            nbytes = max(1, int(np.prod(shape)) * tensor.dtype.itemsize)
            if not pointer:
                self.recorder.violations.append(f"{api}: no address for tensor {tensor.name!r}")
                ok = False
            elif cudart.region(pointer, nbytes) is None:
                self.recorder.violations.append(
                    f"{api}: {tensor.name!r} needs {nbytes} bytes at {pointer:#x}, "
                    "which is not live device memory of that size"
                )
                ok = False
        return ok


def tensorrt_module(version: str, cudart: StandInCudart) -> types.ModuleType:
    """A stand-in ``tensorrt`` module of the API generation of ``version`` (see the module
    docstring). ``module.recorder`` holds the calls and violations."""
    parsed = _version(version)
    name_based = parsed[:2] >= (8, 5)
    bindings = parsed[0] < 10
    recorder = Recorder(calls=cudart.calls)  # one timeline of TensorRT and CUDA calls
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.recorder = recorder  # type: ignore[attr-defined]
    DataType = enum.Enum(
        "DataType",
        ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "INT64", "DOUBLE_UNSUPPORTED"],
    )
    TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    trt.DataType = DataType  # type: ignore[attr-defined]
    if name_based:
        trt.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]

    def call(name: str) -> None:
        recorder.calls.append(name)

    def deprecated(name: str) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            recorder.violations.append(
                f"{name} called on TensorRT {version}: deprecated, use the name-based tensor API"
            )
            raise AssertionError(f"stand-in TensorRT {version}: {name} is deprecated")

        return method

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class Dims(tuple[int, ...]):
        pass

    class NameBasedContext:
        def __init__(self, engine: _Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
            call("set_input_shape")
            tensor = self.engine.by_name.get(name)
            if tensor is None or not tensor.is_input:
                recorder.violations.append(f"set_input_shape on {name!r}, not an input")
                return False
            if not self.engine.in_profile(tensor, shape):
                return False
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def get_tensor_shape(self, name: str) -> Dims:
            call("context.get_tensor_shape")
            tensor = self.engine.by_name[name]
            if tensor.is_input:
                return Dims(self.shapes.get(name, tensor.shape))
            if set(self.shapes) != {t.name for t in self.engine.io if t.is_input}:
                return Dims(tuple(-1 for _ in tensor.shape))  # TensorRT cannot infer it yet
            return Dims(self.engine.output_shapes(self.shapes)[name])

        def set_tensor_address(self, name: str, pointer: int) -> bool:
            call("set_tensor_address")
            if name not in self.engine.by_name:
                recorder.violations.append(f"set_tensor_address on unknown tensor {name!r}")
                return False
            if not isinstance(pointer, int):
                recorder.violations.append(f"set_tensor_address({name!r}, {pointer!r})")
                return False
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            call("execute_async_v3")
            live = cudart.stream_of(stream_handle) if isinstance(stream_handle, int) else None
            if live is None:
                recorder.violations.append("execute_async_v3 without a live stream handle (int)")
                return False
            missing = [t.name for t in self.engine.io if t.is_input and t.name not in self.shapes]
            if missing:
                recorder.violations.append(f"execute_async_v3 before set_input_shape of {missing}")
                return False
            if not self.engine.check_addresses(
                cudart, self.shapes, self.addresses, "execute_async_v3"
            ):
                return False
            live.pending.append(
                ("execute", self.engine.compute(cudart, dict(self.shapes), dict(self.addresses)))
            )
            return True

    class BindingsContext:
        def __init__(self, engine: _Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}

        def set_binding_shape(self, index: int, shape: Sequence[int]) -> bool:
            call("set_binding_shape")
            tensor = self.engine.io[index]
            if not tensor.is_input:
                recorder.violations.append(f"set_binding_shape on output binding {index}")
                return False
            if not self.engine.in_profile(tensor, shape):
                return False
            self.shapes[tensor.name] = tuple(int(d) for d in shape)
            return True

        @property
        def all_binding_shapes_specified(self) -> bool:
            return set(self.shapes) == {t.name for t in self.engine.io if t.is_input}

        def get_binding_shape(self, index: int) -> Dims:
            call("context.get_binding_shape")
            tensor = self.engine.io[index]
            if tensor.is_input:
                return Dims(self.shapes.get(tensor.name, tensor.shape))
            if not self.all_binding_shapes_specified:
                return Dims(tuple(-1 for _ in tensor.shape))
            return Dims(self.engine.output_shapes(self.shapes)[tensor.name])

        def execute_async_v2(self, bindings: Sequence[int], stream_handle: int) -> bool:
            call("execute_async_v2")
            live = cudart.stream_of(stream_handle) if isinstance(stream_handle, int) else None
            if live is None:
                recorder.violations.append("execute_async_v2 without a live stream handle (int)")
                return False
            if len(bindings) != len(self.engine.io):
                recorder.violations.append(
                    f"execute_async_v2 with {len(bindings)} bindings, engine has "
                    f"{len(self.engine.io)}"
                )
                return False
            if not self.all_binding_shapes_specified:
                recorder.violations.append("execute_async_v2 before every set_binding_shape")
                return False
            addresses = {t.name: int(p) for t, p in zip(self.engine.io, bindings, strict=True)}
            if not self.engine.check_addresses(cudart, self.shapes, addresses, "execute_async_v2"):
                return False
            live.pending.append(
                ("execute", self.engine.compute(cudart, dict(self.shapes), addresses))
            )
            return True

    class ICudaEngine:
        def __init__(self, engine: _Engine) -> None:
            self._engine = engine
            if not bindings:
                return
            # Deprecated in 8.5/8.6: present, but a runner for those versions must not use them.
            for method in (
                "get_binding_name",
                "binding_is_input",
                "get_binding_shape",
                "get_binding_dtype",
                "get_profile_shape",
            ):
                if name_based:
                    setattr(self, method, deprecated(method))

        # -- both generations
        def create_execution_context(self) -> Any:
            call("create_execution_context")
            context = (NameBasedContext if name_based else BindingsContext)(self._engine)
            if name_based and bindings:
                context.set_binding_shape = deprecated("set_binding_shape")  # type: ignore[attr-defined]
                context.execute_async_v2 = deprecated("execute_async_v2")  # type: ignore[attr-defined]
            return context

        @property
        def num_optimization_profiles(self) -> int:
            return 1

    if name_based:

        def num_io_tensors(self: ICudaEngine) -> int:
            return len(self._engine.io)

        def get_tensor_name(self: ICudaEngine, index: int) -> str:
            call("get_tensor_name")
            return self._engine.io[index].name

        def get_tensor_mode(self: ICudaEngine, name: str) -> Any:
            return (
                TensorIOMode.INPUT if self._engine.by_name[name].is_input else TensorIOMode.OUTPUT
            )

        def get_tensor_shape(self: ICudaEngine, name: str) -> Dims:
            return Dims(self._engine.by_name[name].shape)

        def get_tensor_dtype(self: ICudaEngine, name: str) -> Any:
            return DataType[self._engine.by_name[name].type_name]

        def get_tensor_profile_shape(self: ICudaEngine, name: str, profile: int) -> list[Dims]:
            tensor = self._engine.by_name[name]
            if not tensor.is_input or profile != 0:
                recorder.violations.append(f"get_tensor_profile_shape({name!r}, {profile})")
            return [Dims(s) for s in self._engine.profile(tensor)]

        ICudaEngine.num_io_tensors = property(num_io_tensors)  # type: ignore[attr-defined]
        for function in (
            get_tensor_name,
            get_tensor_mode,
            get_tensor_shape,
            get_tensor_dtype,
            get_tensor_profile_shape,
        ):
            setattr(ICudaEngine, function.__name__, function)
    else:

        def num_bindings(self: ICudaEngine) -> int:
            return len(self._engine.io)

        def has_implicit_batch_dimension(self: ICudaEngine) -> bool:
            return False

        def get_binding_name(self: ICudaEngine, index: int) -> str:
            call("get_binding_name")
            return self._engine.io[index].name

        def binding_is_input(self: ICudaEngine, index: int) -> bool:
            return self._engine.io[index].is_input

        def get_binding_shape(self: ICudaEngine, index: int) -> Dims:
            return Dims(self._engine.io[index].shape)

        def get_binding_dtype(self: ICudaEngine, index: int) -> Any:
            return DataType[self._engine.io[index].type_name]

        def get_profile_shape(self: ICudaEngine, profile: int, index: int) -> list[Dims]:
            tensor = self._engine.io[index]
            if not tensor.is_input or profile != 0:
                recorder.violations.append(f"get_profile_shape({profile}, {index})")
            return [Dims(s) for s in self._engine.profile(tensor)]

        ICudaEngine.num_bindings = property(num_bindings)  # type: ignore[attr-defined]
        ICudaEngine.has_implicit_batch_dimension = property(  # type: ignore[attr-defined]
            has_implicit_batch_dimension
        )
        for function in (
            get_binding_name,
            binding_is_input,
            get_binding_shape,
            get_binding_dtype,
            get_profile_shape,
        ):
            setattr(ICudaEngine, function.__name__, function)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            if not isinstance(logger, Logger):
                recorder.violations.append("Runtime() without a tensorrt.Logger")
            call("Runtime")
            self.DLA_core = -1

        def deserialize_cuda_engine(self, plan: bytes) -> ICudaEngine | None:
            call("deserialize_cuda_engine")
            if not isinstance(plan, bytes | bytearray | memoryview):
                recorder.violations.append("deserialize_cuda_engine takes the plan's bytes")
                return None
            data = bytes(plan)
            if not data.startswith(PLAN_MAGIC):
                return None  # TensorRT logs "Serialization assertion ... failed" and returns None
            header, _, onnx_bytes = data[len(PLAN_MAGIC) :].partition(b"\n")
            try:
                meta = json.loads(header)
            except ValueError:
                return None
            if meta.get("tensorrt") != version:
                return None  # "The engine plan file is not compatible with this version"
            return ICudaEngine(_Engine(trt, onnx_bytes, int(meta["max_rows"]), recorder))

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    return trt
