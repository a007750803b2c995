"""Calibration and evaluation sets: directories of ``.npy``/``.npz`` tensors or images, checked
against the model's input signature before anything is quantized.

Below both ``packager.models`` (the int8 TFLite converters calibrate with it) and
``packager.optimize`` (int8-static ONNX quantization and the accuracy gate); it knows models only
through their tensor signature (:class:`~packager.models.info.TensorInfo`).

Layout of a directory (files are read in sorted name order, so results are repeatable):

* ``*.npy`` - one array per file, for single-input models;
* ``*.npz`` - one array per model input, keyed by input name; in evaluation sets, keys named
  like a model output hold reference outputs and a ``label``/``labels`` key holds class labels;
* ``*.png``/``*.jpg``/... - images, turned into tensors by :class:`ImagePreprocessing`;
* ``labels.npy`` / ``labels.txt`` - optional integer labels, one per sample, in sample order.

An array may hold one sample (exactly the input's shape) or a stack of samples along a new
leading axis, or along axis 0 when the model's batch dimension is fixed at 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from packager.errors import InputError
from packager.models.info import TensorInfo

TENSOR_SUFFIXES = frozenset({".npy", ".npz"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp"})
LABEL_FILES = ("labels.npy", "labels.txt", "labels.csv")
LABEL_KEYS = ("label", "labels")

Feed = dict[str, NDArray[np.generic]]
Layout = Literal["NCHW", "NHWC"]
# The fewest calibration samples edgepack quantizes with, for ONNX int8-static and for the fully
# int8 TFLite converters alike: fewer give int8 ranges that describe a handful of inputs and clip
# real ones. TensorFlow's post-training integer quantization guide asks for "around 100-500"
# representative samples; 16 is the floor below which edgepack refuses (the stricter of the two
# floors it had, 16 for TFLite and 8 for ONNX).
MIN_CALIBRATION_SAMPLES = 16


@dataclass(frozen=True)
class ImagePreprocessing:
    """How image files become input tensors: ``((pixels * scale) - mean) / std``."""

    resize: tuple[int, int] | None = None  # (height, width); None: the model's input size
    layout: Layout = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0


@dataclass
class SampleSet:
    """Feeds for an onnxruntime session, each one model call, with where each came from."""

    directory: Path
    feeds: list[Feed] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # file name per feed
    labels: NDArray[np.int64] | None = None  # one per sample (batch rows concatenated)
    references: dict[str, list[NDArray[np.generic]]] = field(default_factory=dict)

    @property
    def sample_count(self) -> int:
        if not self.feeds:
            return 0
        first = next(iter(self.feeds[0]))
        return sum(int(feed[first].shape[0]) if feed[first].ndim else 1 for feed in self.feeds)


def load_samples(
    directory: Path,
    inputs: Sequence[TensorInfo],
    output_names: Sequence[str] = (),
    preprocessing: ImagePreprocessing | None = None,
    *,
    purpose: str,
) -> SampleSet:
    """Read every sample in ``directory`` and check it against ``inputs``; InputError otherwise."""
    if not directory.is_dir():
        raise InputError(f"{directory}: {purpose} directory not found; pass a directory of files")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    label_files = [p for p in files if p.name in LABEL_FILES]
    data_files = [p for p in files if p.name not in LABEL_FILES]
    usable = [p for p in data_files if p.suffix.lower() in TENSOR_SUFFIXES | IMAGE_SUFFIXES]
    if not usable:
        raise InputError(
            f"{directory}: no .npy, .npz or image files in this {purpose} directory",
            hint=f"expected {_signature(inputs)}",
        )
    samples = SampleSet(directory)
    labels: list[NDArray[np.int64]] = []
    for path in usable:
        suffix = path.suffix.lower()
        if suffix == ".npz":
            _add_npz(samples, path, inputs, output_names, labels)
        elif suffix == ".npy":
            _add_array(samples, path, inputs, _load_npy(path))
        else:
            _add_array(samples, path, inputs, load_image(path, inputs, preprocessing))
    if label_files:
        labels.append(_read_labels(label_files[0]))
    if labels:
        samples.labels = np.concatenate(labels).astype(np.int64)
        if len(samples.labels) != samples.sample_count:
            raise InputError(
                f"{directory}: {len(samples.labels)} labels for {samples.sample_count} samples; "
                "give exactly one label per sample"
            )
    return samples


def require_min_samples(samples: SampleSet, minimum: int = MIN_CALIBRATION_SAMPLES) -> None:
    """InputError unless ``samples`` holds at least ``minimum`` samples (batch rows)."""
    if samples.sample_count < minimum:
        raise InputError(
            f"{samples.directory}: {samples.sample_count} calibration sample(s), at least "
            f"{minimum} are needed for trustworthy INT8 ranges; add representative inputs"
        )


def iter_rows(feed: Feed) -> Iterator[Feed]:
    """Split a batched feed into single-row feeds (for models with a fixed batch of 1)."""
    first = next(iter(feed.values()))
    for i in range(first.shape[0]):
        yield {name: value[i : i + 1] for name, value in feed.items()}


def require_calibration(model: Path, calibration: Path | None, *, files: str = ".npy/.npz") -> Path:
    """``calibration``, or InputError when a fully int8 conversion of ``model`` has none."""
    if calibration is None:
        raise InputError(
            f"{model}: a fully int8 model needs representative inputs",
            hint=f"pass --calibration DIR with {files} samples of real inputs",
        )
    return calibration


def representative_rows(
    calibration: Path, inputs: Sequence[TensorInfo]
) -> list[tuple[NDArray[np.float32], ...]]:
    """Every calibration sample as one float32 array per input (in ``inputs`` order, batch 1,
    C-contiguous): what the int8 TFLite converters feed. InputError for a bad directory or fewer
    than :data:`MIN_CALIBRATION_SAMPLES` samples."""
    samples = load_samples(calibration, inputs, purpose="calibration")
    require_min_samples(samples)
    names = [t.name for t in inputs]
    return [
        tuple(np.ascontiguousarray(row[n], dtype=np.float32) for n in names)
        for feed in samples.feeds
        for row in iter_rows(feed)
    ]


# --- files --------------------------------------------------------------------------------------


def _load_npy(path: Path) -> NDArray[np.generic]:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc


def _add_npz(
    samples: SampleSet,
    path: Path,
    inputs: Sequence[TensorInfo],
    output_names: Sequence[str],
    labels: list[NDArray[np.int64]],
) -> None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc})") from exc
    missing = [t.name for t in inputs if t.name not in arrays]
    if missing:
        raise InputError(
            f"{path}: no array for input '{missing[0]}'; keys are {sorted(arrays)}",
            hint=f"expected {_signature(inputs)}",
        )
    per_input = {t.name: _split(path, t, arrays[t.name]) for t in inputs}
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1:
        raise InputError(f"{path}: inputs hold different numbers of samples ({sorted(counts)})")
    for i in range(counts.pop()):
        samples.feeds.append({name: chunks[i] for name, chunks in per_input.items()})
        samples.origins.append(path.name)
    for name in output_names:
        if name in arrays:
            samples.references.setdefault(name, []).append(arrays[name])
    for key in LABEL_KEYS:
        if key in arrays:
            labels.append(np.asarray(arrays[key]).reshape(-1).astype(np.int64))


def _add_array(
    samples: SampleSet, path: Path, inputs: Sequence[TensorInfo], array: NDArray[np.generic]
) -> None:
    if len(inputs) != 1:
        raise InputError(
            f"{path}: a bare array cannot feed a model with {len(inputs)} inputs; "
            f"use .npz files keyed by input name ({', '.join(t.name for t in inputs)})"
        )
    for chunk in _split(path, inputs[0], array):
        samples.feeds.append({inputs[0].name: chunk})
        samples.origins.append(path.name)


def _read_labels(path: Path) -> NDArray[np.int64]:
    try:
        if path.suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            raw = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=1)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: labels must be integers, one per sample ({exc})") from exc
    return np.asarray(raw).reshape(-1).astype(np.int64)


def load_image(
    path: Path, inputs: Sequence[TensorInfo], preprocessing: ImagePreprocessing | None
) -> NDArray[np.generic]:
    """One image as a [1, C, H, W] or [1, H, W, C] tensor, as ``preprocessing`` declares."""
    from PIL import Image, UnidentifiedImageError

    if len(inputs) != 1:
        raise InputError(f"{path}: images can only feed a single-input model")
    prep = preprocessing or ImagePreprocessing()
    target = inputs[0]
    if len(target.shape) != 4:
        raise InputError(
            f"{path}: images need a 4-D input, but '{target.name}' is {_describe(target)}"
        )
    channel_axis = 1 if prep.layout == "NCHW" else 3
    spatial = (2, 3) if prep.layout == "NCHW" else (1, 2)
    channels = target.shape[channel_axis]
    if not isinstance(channels, int) or channels not in (1, 3):
        raise InputError(
            f"{path}: input '{target.name}' {_describe(target)} has no 1- or 3-channel axis in "
            f"{prep.layout} layout; pass --layout NHWC or NCHW"
        )
    size = prep.resize or tuple(target.shape[a] for a in spatial)
    if not all(isinstance(d, int) for d in size):
        raise InputError(f"{path}: input '{target.name}' has dynamic height/width; pass --resize")
    height, width = (int(d) for d in size)  # type: ignore[arg-type]
    try:
        with Image.open(path) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise InputError(
            f"--mean/--std: give 1 or {channels} values for input '{target.name}', "
            f"got {mean.size} and {std.size}"
        )
    values = (pixels * np.float32(prep.scale) - mean) / std
    if prep.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values[None, ...])


# --- checking against the signature -------------------------------------------------------------


def _split(path: Path, tensor: TensorInfo, array: NDArray[np.generic]) -> list[NDArray[np.generic]]:
    """Cut ``array`` into feeds that match ``tensor``; InputError naming the expectation."""
    value = _cast(path, tensor, array)
    rank = len(tensor.shape)
    if value.ndim == rank and _matches(value.shape, tensor.shape):
        return [value]
    if value.ndim == rank + 1 and _matches(value.shape[1:], tensor.shape):
        return [value[i] for i in range(value.shape[0])]
    batch_one = rank > 0 and tensor.shape[0] == 1
    if value.ndim == rank and batch_one and _matches(value.shape[1:], tensor.shape[1:]):
        return [value[i : i + 1] for i in range(value.shape[0])]
    raise InputError(
        f"{path}: array of shape {list(value.shape)} does not match input '{tensor.name}' "
        f"{_describe(tensor)}",
        hint="save one sample per file, or a stack of samples along a new first axis",
    )


def _cast(path: Path, tensor: TensorInfo, array: NDArray[np.generic]) -> NDArray[np.generic]:
    try:
        expected = np.dtype(tensor.dtype)
    except TypeError:
        return array
    if array.dtype == expected:
        return array
    same_kind = (array.dtype.kind == "f" and expected.kind == "f") or (
        array.dtype.kind in "iu" and expected.kind in "iu"
    )
    # numpy saves float64 by default; narrowing it to the model's float type is what users mean.
    if same_kind or (array.dtype.kind in "iu" and expected.kind == "f"):
        return array.astype(expected)
    raise InputError(
        f"{path}: dtype {array.dtype} does not match input '{tensor.name}' {_describe(tensor)}"
    )


def _matches(shape: Sequence[int], expected: Sequence[object]) -> bool:
    if len(shape) != len(expected):
        return False
    return all(not isinstance(e, int) or e == s for s, e in zip(shape, expected, strict=True))


def _describe(tensor: TensorInfo) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in tensor.shape)
    return f"{tensor.dtype} [{dims}]"


def _signature(inputs: Sequence[TensorInfo]) -> str:
    return "; ".join(f"'{t.name}' {_describe(t)}" for t in inputs)
