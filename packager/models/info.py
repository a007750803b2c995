"""What edgepack knows about a model after inspection; the input to fit checks and backends."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ModelFormat = Literal["onnx", "tflite", "keras", "pytorch"]
Dim = int | str | None  # a fixed size, a symbolic name ("batch"), or unknown


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: its name, numpy dtype spelling and shape (:data:`Dim` each)."""

    name: str
    dtype: str  # numpy spelling: "float32", "int8", "int64", "bool", ...
    shape: tuple[Dim, ...]

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelInfo:
    """What an inspector (``packager.models.INSPECTORS``) learnt of one model file: format,
    digest and size in bytes (file plus external data), I/O tensors, operator counts, the
    parameter count, and the weight and estimated peak activation sizes in bytes."""

    path: Path
    format: ModelFormat
    digest: str  # "sha256:<hex>" over the model file and its external-data files, in order
    size_bytes: int  # the model file plus external data
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opsets: dict[str, int]  # domain ("" is the default ONNX domain) -> version
    op_histogram: dict[str, int]  # operator type -> count, most frequent first
    param_count: int
    weights_bytes: int
    activation_bytes: int  # estimated peak of live intermediate tensors, dynamic dims taken as 1
    external_data: tuple[Path, ...] = ()
    ir_version: int | None = None
    producer: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0]

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "format": self.format,
            "digest": self.digest,
            "size_bytes": self.size_bytes,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "opsets": dict(self.opsets),
            "op_histogram": dict(self.op_histogram),
            "param_count": self.param_count,
            "weights_bytes": self.weights_bytes,
            "activation_bytes": self.activation_bytes,
            "external_data": [str(p) for p in self.external_data],
            "ir_version": self.ir_version,
            "producer": self.producer,
            "notes": list(self.notes),
        }


# The most elements one tensor can have: shapes are int64 in every format edgepack reads (ONNX's
# and TensorFlow's TensorShapeProto, torch.export's SymInt ``as_int``).
MAX_ELEMENTS = 2**63 - 1


def element_count(dims: Iterable[int]) -> int | None:
    """The element count of a tensor of shape ``dims`` (each >= 0), or None when it is over
    :data:`MAX_ELEMENTS`: a shape no framework holds, from a damaged or hostile model file. Stops
    at the first product over the limit, so a million dims of 2**62 cost a million small
    multiplications, not a product of 62 million bits (minutes of CPU)."""
    sizes = list(dims)
    if 0 in sizes:
        return 0
    count = 1
    for size in sizes:
        count *= size
        if count > MAX_ELEMENTS:
            return None
    return count


def by_frequency(counts: Mapping[str, int]) -> dict[str, int]:
    """An operator histogram as ``ModelInfo.op_histogram`` holds it: most frequent first, ties
    by name (so the same model always lists the same order)."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def loaded_info(
    path: Path,
    format: ModelFormat,
    digest: tuple[str, int],
    tensors: tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]],
    histogram: Mapping[str, int],
    weights: Iterable[tuple[int, int]],
    *,
    producer: str,
    notes: tuple[str, ...],
    opsets: Mapping[str, int] | None = None,
    activation_bytes: int = 0,
) -> ModelInfo:
    """The :class:`ModelInfo` of a model read through its framework (Keras, SavedModel, PyTorch)
    rather than parsed: ``digest`` is ``("sha256:<hex>", size in bytes)``
    (:func:`packager.digest.sha256_file`), ``tensors`` is ``(inputs, outputs)``, ``weights`` one
    ``(element count, bytes)`` per weight tensor (summed into ``param_count`` and
    ``weights_bytes``), ``histogram`` is ordered by :func:`by_frequency`; an unknown activation
    peak is 0."""
    counts = list(weights)
    return ModelInfo(
        path=path,
        format=format,
        digest=digest[0],
        size_bytes=digest[1],
        inputs=tensors[0],
        outputs=tensors[1],
        opsets=dict(opsets or {}),
        op_histogram=by_frequency(histogram),
        param_count=sum(count for count, _ in counts),
        weights_bytes=sum(size for _, size in counts),
        activation_bytes=activation_bytes,
        producer=producer,
        notes=notes,
    )
