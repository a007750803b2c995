"""``edgepack inspect`` for the PyTorch files ``build`` converts (``.pt``, ``.pth``, ``.pt2``):
tensors where the file records them (an exported program does; a pickled module does not: its
input shapes come from the calibration data), operators, parameters. Heavy: imports torch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from packager.digest import sha256_file
from packager.models.info import ModelInfo, TensorInfo, loaded_info
from packager.models.torch_export import detect_kind, load_torch_model


def _tensor(name: str, value: Any) -> TensorInfo | None:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    dims = tuple(int(d) if str(d).lstrip("-").isdigit() else str(d) for d in shape)
    return TensorInfo(name=name, dtype=str(dtype).removeprefix("torch."), shape=dims)


def _info(
    path: Path,
    notes: tuple[str, ...],
    *,
    inputs: tuple[TensorInfo, ...] = (),
    outputs: tuple[TensorInfo, ...] = (),
    histogram: Counter[str] | None = None,
    params: tuple[Any, ...] = (),
) -> ModelInfo:
    return loaded_info(
        path, "pytorch", sha256_file(path), (inputs, outputs), histogram or Counter(),
        ((int(p.numel()), int(p.numel() * p.element_size())) for p in params),
        producer="pytorch", notes=notes,
    )


def inspect_torch(path: Path) -> ModelInfo:
    """The inspector for ``.pt`` / ``.pth`` / ``.pt2`` (``packager.models.INSPECTORS``).
    InputError for unreadable files (``torch_export.load_torch_model``). A full torch.save
    pickle is not loaded: unpickling runs code from the file, and inspecting must not."""
    kind = detect_kind(path)
    if kind == "torch-pickle":
        return _info(path, (
            "PyTorch torch.save pickle: not unpickled here (that runs code from the file); "
            "build loads it, with a warning, to convert it",
            "torch.export.save (.pt2) records tensors and operators that inspect can show",
        ))
    loaded = load_torch_model(path, kind)
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []
    histogram: Counter[str] = Counter()
    notes: list[str] = [f"PyTorch {kind}"]
    if kind == "exported-program":
        module = loaded.module()
        for node in loaded.graph.nodes:
            value = node.meta.get("val")
            if node.op == "placeholder" and node.name in loaded.graph_signature.user_inputs:
                tensor = _tensor(node.name, value)
                if tensor is not None:
                    inputs.append(tensor)
            elif node.op == "call_function":
                histogram[str(getattr(node.target, "__name__", node.target))] += 1
            elif node.op == "output":
                for i, item in enumerate(node.args[0] if node.args else ()):
                    tensor = _tensor(f"output_{i}", getattr(item, "meta", {}).get("val"))
                    if tensor is not None:
                        outputs.append(tensor)
    else:
        module = loaded  # TorchScript: code in TorchScript's own interpreter, not Python
        for sub in module.modules():
            if not any(True for _ in sub.children()):
                histogram[getattr(sub, "original_name", type(sub).__name__)] += 1
        notes.append("input shapes are not stored in this file: --calibration samples give them")
    params = (*module.parameters(), *module.buffers())
    return _info(path, tuple(notes), inputs=tuple(inputs), outputs=tuple(outputs),
                 histogram=histogram, params=params)
