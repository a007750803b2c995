"""PyTorch -> ONNX: load a saved module, TorchScript file or ExportedProgram and export it with
the dynamo exporter, weights inline.

torch is an optional extra (``edgepack[optimize]``) and is imported only inside these functions,
so the rest of edgepack starts without it.

Model files are untrusted (README, "Security model"), and in the pinned torch (2.13.0) loading
ANY of the three PyTorch file kinds runs code from the file, so each is loaded only with the
builder's explicit word (``--trust-model-code``, packager.models.trust, where the refusal is
written once). What torch does, read in
``.venv/lib/python3.11/site-packages/torch``:

- ``torch-pickle``: ``torch.load(weights_only=False)`` unpickles, and a pickle's ``__reduce__``
  calls any Python callable (``os.system``). ``weights_only=True`` cannot load a whole module.
- ``exported-program`` (``torch.export.load``, ``export/__init__.py:283``): ``load_pt2``
  (``export/pt2_archive/_package.py:1080``) unpickles every weight or constant whose entry in the
  file's own JSON config says ``use_pickle`` with ``torch.load(..., weights_only=False)``
  (``_package.py:891``, ``:949``), opaque constants with ``pickle.loads`` (``:978``), torchbind
  objects with ``torch._C._pickle_load_obj`` (``:972``), and ``dlopen``s an AOTInductor shared
  library for every ``data/aotinductor/`` entry (``_load_aoti``, ``:1040``, ``:1151``); the
  pre-2.8 archive form falls back from ``weights_only=True`` to ``False`` when the first fails
  (``_export/serde/serialize.py:436-441``); and every symbolic shape expression in the graph is
  parsed with ``sympy.sympify`` (``serialize.py:2412``), which is ``eval`` (measured:
  ``sympify('__import__("os").system(...)')`` runs the command). Graph targets resolve to any
  ``torch.*`` attribute by name (``serialize.py:2344``), so running the program can call them.
- ``torchscript`` (``torch.jit.load``): the archive's pickles go through TorchScript's C++
  unpickler (TorchScript types only, no Python globals), but the file's TorchScript code runs:
  a module's ``__setstate__`` at load, ``forward`` when exported. TorchScript is not a sandbox:
  measured here, ``torch.from_file(path, shared=True, ...)`` plus an in-place op overwrites any
  file this process may write, from ``__setstate__`` during ``torch.jit.load`` itself.

ONNX is the format an untrusted PyTorch model can come in: onnxruntime runs only its operators.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packager.errors import InputError, UnsupportedError, UsageError
from packager.extras import require
from packager.models.info import element_count

# Re-exported for the PyTorch callers: the refusal is written once, in packager.models.trust.
from packager.models.trust import check_trusted

TorchKind = Literal["torch-pickle", "torchscript", "exported-program"]
# File names PyTorch sources go by (lower case): torch.save pickles (.pt, .pth), TorchScript
# archives (torch.jit.save: .pt, .ts, .jit, .torchscript) and exported programs (torch.export.save:
# .pt2). The kind comes from the contents (detect_kind), not from the suffix.
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".pt2", ".ts", ".jit", ".torchscript"})

# ONNX files must stay under protobuf's 2 GiB limit to hold their weights inline.
_INLINE_LIMIT = 2 * 1024**3 - 1
# The dynamo exporter's own default opset; 18 has every op the quantizers and converters need.
EXPORT_OPSET = 18
# The DTYPE an --input-shape may name: torch's own dtype names (torch.float32, ...) for the real
# and integer tensors a model's forward() takes. Checked as whole strings against this table
# before torch is imported: torch's namespace holds far more than dtypes (':nn' would name
# torch.nn), and complex or quantized tensors are no example input the exporter traces.
INPUT_DTYPES = (
    "float32", "float16", "bfloat16", "float64",
    "int8", "int16", "int32", "int64", "uint8", "bool",
)  # fmt: skip


# The largest example input the export allocates (elements): 1 GiB of float32, far past any
# edge model's input (a 4K RGB frame is 25 M), far below what crashes the allocator.
MAX_EXAMPLE_ELEMENTS = 2**28


@dataclass(frozen=True)
class InputSpec:
    """One model input as the user names it on the command line: ``x=1,3,224,224[:DTYPE]``.

    ``dtype`` is one of :data:`INPUT_DTYPES` (UsageError, exit 2, naming ``--input-shape``
    otherwise: see :func:`check_dtype`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic_axes: tuple[int, ...] = ()  # axes exported as symbolic dimensions

    def __post_init__(self) -> None:
        check_dtype(self.name, self.dtype)
        # The export allocates one example tensor of this shape: a bounded one, or an
        # allocator failure deep in torch (an internal error) instead of a line naming the flag.
        count = element_count(self.shape)
        if count is None or count > MAX_EXAMPLE_ELEMENTS:
            raise UsageError(
                f"--input-shape {self.name!r}: {'x'.join(map(str, self.shape))} is more than "
                f"{MAX_EXAMPLE_ELEMENTS} elements ({MAX_EXAMPLE_ELEMENTS * 4 // 2**30} GiB as "
                "float32), the most an example input for the export may have",
                hint="give the shape of one real input (batch 1)",
            )

    def dim_name(self, axis: int) -> str:
        return f"{self.name}_dim{axis}"


def check_dtype(name: str, dtype: str) -> str:
    """``dtype`` when it is one of :data:`INPUT_DTYPES` (the whole string); UsageError (exit 2)
    naming ``--input-shape`` and the allowed names otherwise."""
    if dtype not in INPUT_DTYPES:
        raise UsageError(
            f"--input-shape {name!r}: DTYPE {dtype!r} is not an input dtype; "
            f"use one of {', '.join(INPUT_DTYPES)} (NAME=D1,D2,...:DTYPE)"
        )
    return dtype


def require_torch() -> Any:
    """The ``torch`` module; ToolMissingError (exit 6) naming ``edgepack[optimize]`` without it."""
    return require("torch", "reading PyTorch models", "optimize")


def detect_kind(path: Path) -> TorchKind:
    """Which of the three PyTorch file kinds ``path`` is, from its name and archive entries."""
    if not path.is_file():
        raise InputError(f"{path}: PyTorch model file not found; check the path")
    if path.suffix == ".pt2":
        return "exported-program"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        # torch.save's legacy (pre-1.6) format is a bare pickle, not a zip archive.
        return "torch-pickle"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/serialized_exported_program.json") or "/models/" in n for n in names):
        return "exported-program"
    return "torch-pickle"


def load_torch_model(path: Path, kind: TorchKind, *, trusted: bool) -> Any:
    """Load the file; an ``nn.Module`` for pickles, an ``ExportedProgram`` for .pt2, a
    ``ScriptModule`` for TorchScript. ``trusted``: the builder's ``--trust-model-code``;
    without it InputError (exit 3) before torch reads a byte (:func:`check_trusted`)."""
    check_trusted(path, kind, trusted)
    torch = require_torch()
    try:
        if kind == "exported-program":
            return torch.export.load(str(path))
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        loaded = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many unrelated types for a bad file
        raise InputError(
            f"{path}: PyTorch could not read this {kind} file ({_first_line(exc)})",
            hint="save the model with torch.save(model), torch.jit.save or torch.export.save",
        ) from exc
    if not isinstance(loaded, torch.nn.Module):
        raise InputError(
            f"{path}: holds a {type(loaded).__name__}, not a torch.nn.Module "
            "(a state_dict has no architecture)",
            hint="save the whole module with torch.save(model) or export a .pt2 program",
        )
    return loaded.eval()


def export_onnx(
    model: Any, kind: TorchKind, inputs: tuple[InputSpec, ...], dest: Path, source: Path
) -> None:
    """Export ``model`` to ``dest`` with torch.onnx's dynamo exporter and inline weights."""
    torch = require_torch()
    if kind == "torchscript":
        if any(spec.dynamic_axes for spec in inputs):
            raise UnsupportedError(
                f"{source}: TorchScript is exported with fixed shapes; dynamic dimensions "
                "need the module (torch.save) or an ExportedProgram (.pt2) with dynamic shapes"
            )
        # The dynamo exporter refuses ScriptModules; torch converts them to an ExportedProgram.
        from torch._export.converter import TS2EPConverter

        model = TS2EPConverter(model, _example_args(torch, inputs, source)).convert()
    program_kwargs: dict[str, Any] = {}
    if isinstance(model, torch.export.ExportedProgram):
        # The program carries its own example inputs and dynamic shapes.
        args: tuple[Any, ...] = ()
    else:
        args = _example_args(torch, inputs, source)
        dynamic = [
            {axis: torch.export.Dim(spec.dim_name(axis)) for axis in spec.dynamic_axes} or None
            for spec in inputs
        ]
        if any(d is not None for d in dynamic):
            program_kwargs["dynamic_shapes"] = tuple(dynamic)
    input_names = [spec.name for spec in inputs] if inputs else None
    try:
        # The exporter reports progress on stdout, which must stay clean for --json.
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=input_names,
                opset_version=EXPORT_OPSET,
                verbose=False,
                **program_kwargs,
            )
    except Exception as exc:
        raise UnsupportedError(
            f"{source}: torch.onnx (dynamo) could not export the model: {_first_line(exc)}"
        ) from exc
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise UnsupportedError(f"{source}: torch.onnx returned no program")
    proto = program.model_proto
    inline = proto.ByteSize() < _INLINE_LIMIT
    with contextlib.redirect_stdout(io.StringIO()):
        program.save(str(dest), external_data=not inline)


def _example_args(torch: Any, inputs: tuple[InputSpec, ...], source: Path) -> tuple[Any, ...]:
    if not inputs:
        raise InputError(
            f"{source}: a PyTorch module needs its input shapes",
            hint="pass --input-shape NAME=1,3,224,224 for each input, in forward() order",
        )
    tensors = []
    for spec in inputs:
        # torch.export specialises size-1 dimensions, so a dynamic axis is traced at size 2.
        shape = [
            2 if (axis in spec.dynamic_axes and d == 1) else d for axis, d in enumerate(spec.shape)
        ]
        dtype = getattr(torch, spec.dtype)  # one of INPUT_DTYPES, all torch dtypes (InputSpec)
        generator = torch.Generator().manual_seed(0)
        if dtype.is_floating_point:
            tensors.append(torch.rand(shape, dtype=dtype, generator=generator))
        else:
            tensors.append(torch.zeros(shape, dtype=dtype))
    return tuple(tensors)


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    # torch.onnx's errors are a report; the cause is the line after "Exception summary".
    marker = text.find("## Exception summary")
    if marker >= 0:
        text = text[marker + len("## Exception summary") :]
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
