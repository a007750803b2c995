"""Magnitude pruning of a PyTorch module with ``torch.nn.utils.prune``, made permanent so the
exported ONNX model holds plain (zero-filled) weight tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packager.models.torch_export import require_torch
from packager.optimize.request import PruneOptions


@dataclass(frozen=True)
class PruneStats:
    """Zeros counted in the prunable weights after pruning; ``sparsity`` is their share (0-1)."""

    layers: int  # parameters named ``weight`` with 2+ dimensions (Conv, Linear and alike)
    weights: int  # elements in those tensors
    zero_weights: int  # measured after pruning, not the requested amount
    zeroed_channels: int  # output channels that are entirely zero

    @property
    def sparsity(self) -> float:
        return self.zero_weights / self.weights if self.weights else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "layers": self.layers,
            "weights": self.weights,
            "zero_weights": self.zero_weights,
            "sparsity": self.sparsity,
            "zeroed_channels": self.zeroed_channels,
        }


def prunable(module: Any) -> list[tuple[Any, str]]:
    """(submodule, "weight") for every weight tensor of two or more dimensions."""
    found = []
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if weight is not None and getattr(weight, "dim", lambda: 0)() >= 2:
            found.append((sub, "weight"))
    return found


def prune_module(module: Any, options: PruneOptions) -> PruneStats:
    """Prune ``module`` in place; returns the sparsity measured afterwards."""
    torch = require_torch()
    # torch.nn.utils.prune has no type annotations.
    from torch.nn.utils import prune as torch_prune

    prune: Any = torch_prune

    targets = prunable(module)
    with torch.no_grad():
        for sub, name in targets:
            if options.l2_structured > 0:
                prune.ln_structured(sub, name, amount=options.l2_structured, n=2, dim=0)
            if options.l1_unstructured > 0:
                prune.l1_unstructured(sub, name, amount=options.l1_unstructured)
            if prune.is_pruned(sub):
                # Folds weight_orig * weight_mask into a plain parameter and drops the hooks.
                prune.remove(sub, name)
    return measure(module)


def measure(module: Any) -> PruneStats:
    """Count the zeros and all-zero output channels (dim 0) in ``module``'s prunable weights."""
    torch = require_torch()
    weights = zeros = channels = 0
    targets = prunable(module)
    with torch.no_grad():
        for sub, name in targets:
            tensor = getattr(sub, name)
            weights += int(tensor.numel())
            zeros += int((tensor == 0).sum())
            per_channel = tensor.reshape(tensor.shape[0], -1)
            channels += int((per_channel.abs().sum(dim=1) == 0).sum())
    return PruneStats(len(targets), weights, zeros, channels)
