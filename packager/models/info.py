"""What edgepack knows about a model after inspection; the input to fit checks and backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ModelFormat = Literal["onnx", "tflite", "keras", "pytorch"]
Dim = int | str | None  # a fixed size, a symbolic name ("batch"), or unknown


@dataclass(frozen=True)
class TensorInfo:
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
