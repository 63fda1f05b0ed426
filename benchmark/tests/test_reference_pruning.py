"""The reference pruning rows: physically smaller at the target, L1 keeps the largest filters."""

from __future__ import annotations

import pytest
import torch

from benchmark.reference_pruning import prune_to_target
from common.backbones import build_backbone
from common.macs import count_macs, count_params


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_pruned_copy_hits_the_mac_target_and_is_physically_smaller(target: float) -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet20", 10).eval()
    pruned, achieved = prune_to_target(model, target, "l1", (3, 32, 32))
    dense = count_macs(model, (3, 32, 32))
    assert achieved == pytest.approx(target, abs=0.01)
    assert 1 - count_macs(pruned, (3, 32, 32)) / dense == pytest.approx(achieved)
    assert count_params(pruned) < count_params(model)
    # Only block-internal channels go: the residual stream keeps its width, the network still runs.
    widths = [(s.conv.out_channels, s.internal) for s in pruned.gate_sites()]
    original = [(s.conv.out_channels, s.internal) for s in model.gate_sites()]
    for (w, internal), (w0, _) in zip(widths, original):
        assert (w < w0) if internal else (w == w0)
    assert pruned(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_l1_keeps_the_filters_of_largest_norm_and_random_does_not() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet20", 10).eval()
    site = next(s for s in model.gate_sites() if s.internal)
    norms = site.conv.weight.detach().abs().sum(dim=(1, 2, 3))
    l1, _ = prune_to_target(model, 0.5, "l1", (3, 32, 32))
    kept = dict(l1.named_modules())[site.name].weight.detach()
    expected = site.conv.weight.detach()[norms.topk(kept.shape[0]).indices.sort().values]
    torch.testing.assert_close(kept, expected)
    rand, _ = prune_to_target(model, 0.5, "random", (3, 32, 32), seed=1)
    assert not torch.equal(dict(rand.named_modules())[site.name].weight.detach(), expected)


def test_unreachable_or_bad_target_is_a_clear_error() -> None:
    model = build_backbone("resnet20", 10).eval()
    with pytest.raises(ValueError, match="target_mac_reduction"):
        prune_to_target(model, 1.5, "l1", (3, 32, 32))
    with pytest.raises(ValueError, match="out of reach"):
        prune_to_target(model, 0.99, "l1", (3, 32, 32))
