"""``edgepack inspect`` for the PyTorch files ``build`` converts (``.pt``, ``.pth``, ``.pt2``):
tensors where the file records them (an exported program does; a pickled module does not: its
input shapes come from the calibration data), operators, parameters. Never imports torch: every
PyTorch file kind runs code from itself when torch loads it."""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from packager.digest import sha256_file
from packager.errors import InputError
from packager.models.info import MAX_ELEMENTS, ModelInfo, TensorInfo, element_count, loaded_info
from packager.models.torch_export import detect_kind
from packager.models.trust import TRUST_FLAG


def _info(path: Path, notes: tuple[str, ...]) -> ModelInfo:
    return loaded_info(
        path, "pytorch", sha256_file(path), ((), ()), Counter(), (),
        producer="pytorch", notes=notes,
    )


def inspect_torch(path: Path) -> ModelInfo:
    """The inspector for ``.pt`` / ``.pth`` / ``.pt2`` (``packager.models.INSPECTORS``).

    Nothing is loaded with torch: loading any PyTorch file runs code from it (torch 2.13:
    packager.models.torch_export's docstring), and inspecting must not. A ``.pt2`` program's
    tensors, operators and parameters are read from the archive's JSON (``models/NAME.json``,
    ``data/weights/NAME_weights_config.json``: torch/_export/serde/schema.py's dataclasses,
    written by torch.export.save) with symbolic dimensions shown as their expression text, never
    evaluated; pickles and TorchScript are named with a note. InputError (exit 3) for an archive
    that is not a readable .pt2."""
    kind = detect_kind(path)
    if kind == "exported-program":
        return _inspect_program(path)
    what = (
        "PyTorch torch.save pickle: not unpickled here (that runs code from the file)"
        if kind == "torch-pickle"
        else "PyTorch TorchScript: not loaded here (torch.jit.load runs the file's code)"
    )
    return _info(path, (
        f"{what}; build and optimize load it only with {TRUST_FLAG}",
        "torch.export.save (.pt2) records tensors and operators that inspect can show",
    ))


# torch/_export/serde/schema.py ScalarType -> (numpy-style name, bytes per element).
_SCALAR_TYPES: dict[int, tuple[str, int]] = {
    1: ("uint8", 1), 2: ("int8", 1), 3: ("int16", 2), 4: ("int32", 4), 5: ("int64", 8),
    6: ("float16", 2), 7: ("float32", 4), 8: ("float64", 8), 9: ("complex32", 4),
    10: ("complex64", 8), 11: ("complex128", 16), 12: ("bool", 1), 13: ("bfloat16", 2),
    28: ("uint16", 2), 29: ("float8_e4m3fn", 1), 30: ("float8_e5m2", 1),
    31: ("float8_e4m3fnuz", 1), 32: ("float8_e5m2fnuz", 1), 33: ("float8_e8m0fnu", 1),
    34: ("uint32", 4), 35: ("uint64", 8),
}
# The largest JSON member read from a .pt2 archive (a graph of 100k nodes is ~50 MiB).
_MAX_JSON_BYTES = 256 * 1024 * 1024


def _read_json(path: Path, archive: zipfile.ZipFile, suffix: str) -> Any:
    names = [n for n in archive.namelist() if n.endswith(suffix)]
    if not names:
        raise InputError(f"{path}: no {suffix} in the .pt2 archive",
                         hint="save the program with torch.export.save")
    if len(names) > 1:
        # Two candidates (or one name twice): which one torch would load is not for inspect to
        # guess, and showing a decoy would be worse than showing nothing.
        raise InputError(f"{path}: {len(names)} members end in {suffix}; torch.export.save "
                         "writes one", hint="save the program with torch.export.save")
    info = archive.getinfo(names[0])
    if info.file_size > _MAX_JSON_BYTES:
        raise InputError(f"{path}: {names[0]} is {info.file_size} bytes, over the "
                         f"{_MAX_JSON_BYTES} bytes inspect reads")
    with archive.open(info) as member:
        data = member.read(_MAX_JSON_BYTES + 1)
    return json.loads(data)


def _int(value: Any, what: str) -> int:
    """``value`` when it is an int64 >= 0 (a size or a dtype, torch/_export/serde/schema.py);
    ValueError (InputError to the user) for anything else from the file: a float, Infinity,
    a bool, a string, a negative or 4,000-digit number."""
    if type(value) is not int or not 0 <= value <= MAX_ELEMENTS:
        raise ValueError(f"{what} is {repr(value)[:40]}, not an integer in [0, 2**63)")
    return value


def _dims(meta: Any) -> tuple[int | str | None, ...]:
    dims: list[int | str | None] = []
    for size in meta.get("sizes", ()):
        if "as_int" in size:
            dims.append(_int(size["as_int"], "a size"))
        else:  # a symbolic dimension: its text, never evaluated
            expr = size.get("as_expr", {})
            dims.append(str(expr.get("expr_str", "?")) if isinstance(expr, dict) else "?")
    return tuple(dims)


def _program_tensor(name: str, meta: Any) -> TensorInfo:
    dtype = _SCALAR_TYPES.get(_int(meta.get("dtype", 0), "a dtype"), ("unknown", 0))[0]
    return TensorInfo(name=name, dtype=dtype, shape=_dims(meta))


def _numel(meta: Any) -> int:
    """The element count of a tensor (0 with a symbolic dimension); ValueError over int64."""
    count = element_count(d if isinstance(d, int) else 0 for d in _dims(meta))
    if count is None:
        raise ValueError("a weight's shape has over 2**63 elements")
    return count


def _inspect_program(path: Path) -> ModelInfo:
    try:
        with zipfile.ZipFile(path) as archive:
            program = _read_json(path, archive, "/models/model.json")
            weights = _read_json(path, archive, "/data/weights/model_weights_config.json")
        graph = program["graph_module"]["graph"]
        signature = program["graph_module"]["signature"]
        values = graph["tensor_values"]

        def specs(key: str, role: str) -> tuple[TensorInfo, ...]:
            out = []
            for spec in signature[key]:
                tensor = spec.get(role, {}).get("arg", {}).get("as_tensor")
                if tensor is not None:
                    out.append(_program_tensor(tensor["name"], values[tensor["name"]]))
            return tuple(out)

        inputs = specs("input_specs", "user_input")
        outputs = specs("output_specs", "user_output")
        histogram: Counter[str] = Counter()
        for node in graph["nodes"]:
            target = str(node["target"])
            # torch.ops.aten.linear.default -> linear.default, OpOverload.__name__'s form
            parts = target.split(".")
            histogram[".".join(parts[-2:]) if target.startswith("torch.ops.") else parts[-1]] += 1
        params = []
        for entry in weights["config"].values():
            meta = entry.get("tensor_meta") or {}
            size = _SCALAR_TYPES.get(_int(meta.get("dtype", 0), "a dtype"), ("unknown", 0))[1]
            numel = _numel(meta)
            params.append((numel, numel * size))
    # RecursionError: JSON nested deeper than the parser's stack.
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError, AttributeError,
            RecursionError) as exc:
        raise InputError(
            f"{path}: not a readable torch.export program ({type(exc).__name__}: {exc})"[:300],
            hint="save it with torch.export.save",
        ) from exc
    return loaded_info(
        path, "pytorch", sha256_file(path), (inputs, outputs), histogram, params,
        producer="pytorch", notes=(
            "PyTorch exported-program, read from its JSON: not loaded with torch (that runs "
            f"code from the file; build and optimize load it only with {TRUST_FLAG})",
        ),
    )
