"""Writing ONNX models of any size: inline below protobuf's 2 GiB limit, external data above it.

Protobuf cannot serialize a message of 2 GiB or more (``2**31 - 1`` bytes is the most a message may
take: protobuf's documented "Protocol Buffers have a limit of 2GB" and the upb runtime's
``EncodeError: Failed to serialize proto``). The upb runtime raises that error from ``ByteSize()``
too, so the size check itself must expect it. Above the limit, ONNX's external-data format keeps
the weights in one file beside the model (https://onnx.ai/onnx/repo-docs/ExternalData.html).
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import onnx

# No protobuf stubs in the environment; the one name used here is an exception class.
from google.protobuf.message import EncodeError  # type: ignore[import-untyped,unused-ignore]
from onnx import ModelProto, TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# The largest serialized model protobuf writes (bytes). Tests lower it to exercise the external-data
# path with small models; everything that decides inline vs external reads it from here.
INLINE_LIMIT_BYTES = 2**31 - 1
# Tensors smaller than this stay inline even in an external-data model (onnx's own default).
EXTERNAL_MIN_TENSOR_BYTES = 1024


def data_file_name(model_file: str) -> str:
    """The external data file written beside ``model_file``: ``NAME.onnx.data``."""
    return f"{model_file}.data"


def serialized_size(model: ModelProto) -> int | None:
    """The model's serialized size in bytes, or None when protobuf cannot serialize it at all."""
    try:
        return int(model.ByteSize())
    except (EncodeError, ValueError):
        return None


def needs_external_data(model: ModelProto) -> bool:
    """True when ``model`` cannot be (or, per INLINE_LIMIT_BYTES, should not be) one file."""
    size = serialized_size(model)
    return size is None or size > INLINE_LIMIT_BYTES


def save_onnx(model: ModelProto, dest: Path) -> tuple[Path, ...]:
    """Write ``model`` to ``dest``, its weights in ``dest.name + '.data'`` when too large for one
    protobuf; returns the files written (the model first).

    The in-memory model's tensors point at the data file afterwards (onnx moves them out).
    """
    data = dest.with_name(data_file_name(dest.name))
    # onnx appends to an existing data file, so a stale one would grow and keep old bytes.
    data.unlink(missing_ok=True)
    if not needs_external_data(model):
        try:
            onnx.save(model, str(dest))
            return (dest,)
        except (EncodeError, ValueError):
            pass  # the size estimate was low (e.g. a field ByteSize() undercounts): go external
    onnx.save(
        model,
        str(dest),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=EXTERNAL_MIN_TENSOR_BYTES,
        convert_attribute=True,
    )
    return (dest, data) if data.exists() else (dest,)


def external_locations(model: ModelProto) -> list[str]:
    """The external data locations the model's tensors name, in first-use order, once each."""
    seen: dict[str, None] = {}
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            seen.setdefault(str(ExternalDataInfo(tensor).location), None)
    return list(seen)


def model_files(path: Path) -> tuple[Path, ...]:
    """The model file and every external data file it names (relative to its folder)."""
    model = onnx.load(str(path), load_external_data=False)
    return (path, *(path.parent / loc for loc in external_locations(model)))


def total_size(path: Path) -> int:
    """Bytes of the model file plus its external data files."""
    return sum(p.stat().st_size for p in model_files(path))


def copy_onnx(source: Path, dest: Path) -> tuple[Path, ...]:
    """Copy a model and its external data to ``dest``, the data renamed ``dest.name + '.data'``.

    The weights are copied as bytes, never parsed: only the small model protobuf is rewritten to
    name the new data file. Returns the files written (the model first).
    """
    model = onnx.load(str(source), load_external_data=False)
    locations = external_locations(model)
    if not locations:
        shutil.copyfile(source, dest)
        return (dest,)
    written = [dest]
    renamed: dict[str, str] = {}
    for index, location in enumerate(locations):
        rel = PurePosixPath(location.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{source}: external data location {location!r} leaves its folder")
        new = data_file_name(dest.name) if index == 0 else f"{dest.name}.{index}.data"
        shutil.copyfile(source.parent / rel, dest.with_name(new))
        renamed[location] = new
        written.append(dest.with_name(new))
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = renamed[entry.value]
    onnx.save(model, str(dest))
    return tuple(written)


def _tensors(model: ModelProto) -> list[TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))
