from __future__ import annotations

import pytest

from packager.optimize.prune import measure, prune_module
from packager.optimize.request import PruneOptions

torch = pytest.importorskip("torch")


def net() -> object:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 4)
    )


def test_l1_unstructured_sparsity_is_measured_and_permanent() -> None:
    model = net()
    assert measure(model).zero_weights == 0
    stats = prune_module(model, PruneOptions(l1_unstructured=0.5))
    assert stats.layers == 2 and stats.weights == 8 * 2 * 9 + 4 * 8
    assert stats.sparsity == pytest.approx(0.5, abs=0.02)
    # prune.remove folded the masks: no reparametrisation left behind, plain parameters only.
    names = {name for name, _ in model.named_parameters()}  # type: ignore[attr-defined]
    assert not any(n.endswith("_orig") for n in names)
    assert not any(hasattr(m, "weight_mask") for m in model.modules())  # type: ignore[attr-defined]


def test_l2_structured_zeroes_whole_output_channels() -> None:
    model = net()
    stats = prune_module(model, PruneOptions(l2_structured=0.25))
    # 2 of the conv's 8 channels and 1 of the linear layer's 4 rows.
    assert stats.zeroed_channels == 3
    assert stats.zero_weights == 2 * 2 * 9 + 8
