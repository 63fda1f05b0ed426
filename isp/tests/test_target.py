"""The shared cost knob: target_mac_reduction -> p, channel groups refined so the target is reachable, and hard
gates calibrated by logit order so that the slim network's MACs (common.macs) land on the target."""

import pytest
import torch

from common.backbones import build_backbone
from common.macs import count_macs
from isp.config import IspSettings
from isp.model import (
    ChannelGates,
    PrunableMacs,
    calibrated_hard,
    group_sizes,
    groups_for_target,
    max_mac_reduction,
    prunable_sites,
    prunable_target_ratio,
)
from isp.slim import kept_indices, slim_copy


def _resnet20():
    model = build_backbone("resnet20")
    sites = prunable_sites(model)
    return model, sites, [s.channels for s in sites], PrunableMacs(model, sites, (3, 32, 32))


def test_target_maps_to_p_on_the_prunable_macs():
    _, _, _, macs = _resnet20()
    p = prunable_target_ratio(macs, 0.5)
    # removing (1 - p) of T_all removes exactly half of the whole model's MACs
    assert (1 - p) * macs.total == pytest.approx(0.5 * macs.model_macs)
    assert prunable_target_ratio(macs, 0.0) == 1.0
    with pytest.raises(ValueError, match="prunable layers"):
        prunable_target_ratio(macs, 0.999)


def test_groups_are_refined_only_where_the_target_needs_it():
    _, _, channels, macs = _resnet20()
    blocks = group_sizes(channels, 16)
    assert blocks == [16] * 9
    assert max_mac_reduction(macs, channels, blocks) == pytest.approx(0.406, abs=0.01)  # 16-channel sites whole
    assert groups_for_target(macs, channels, blocks, 0.3) == blocks  # reachable as it is
    refined = groups_for_target(macs, channels, blocks, 0.5)
    assert refined == [8, 8, 8, 16, 16, 16, 16, 16, 16]  # only the first stage splits, into halves
    assert max_mac_reduction(macs, channels, refined) >= 0.55


@pytest.mark.parametrize("target", [0.3, 0.5])
@pytest.mark.parametrize("block", [1, 16])
def test_calibrated_hard_gates_land_on_the_target(target, block):
    torch.manual_seed(int(10 * target) + block)
    model, _, channels, macs = _resnet20()
    groups = groups_for_target(macs, channels, group_sizes(channels, block), target)
    gates = ChannelGates(channels, groups=groups)
    with torch.no_grad():
        gates.theta.normal_(0.0, 2.0)  # a search that ended anywhere
    hard = calibrated_hard(gates, macs, prunable_target_ratio(macs, target) * macs.total)
    assert all(int(h.sum()) % g == 0 and h.sum() >= g for h, g in zip(hard, groups))
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    achieved = 1 - count_macs(slim) / count_macs(model)
    assert abs(achieved - target) <= 0.03  # the benchmark's tolerance
    # the kept set follows the logits: no closed group has a higher theta than an open one (beyond each
    # site's mandatory best group)
    sizes = [c // g for c, g in zip(channels, groups)]
    opened = [h[::g] for h, g in zip(hard, groups)]
    thetas = torch.split(gates.theta.detach(), sizes)
    extra_open = [t[o > 0.5] for t, o in zip(thetas, opened)]
    closed = torch.cat([t[o < 0.5] for t, o in zip(thetas, opened)])
    lowest_open = min(float(e.min()) for e in extra_open if len(e) > 1) if any(len(e) > 1 for e in extra_open) \
        else float("inf")
    assert len(closed) == 0 or float(closed.max()) <= lowest_open + 1e-6 or lowest_open == float("inf")


def test_settings_accept_the_shared_knobs_and_reject_bad_values():
    s = IspSettings.from_dict({"target_mac_reduction": 0.5, "precision": "fp32"})
    assert s.target_mac_reduction == 0.5 and s.precision == "fp32"
    assert IspSettings().target_mac_reduction is None and IspSettings().precision == "auto"
    for bad in (1.0, -0.1, "half", True):
        with pytest.raises(ValueError, match="target_mac_reduction"):
            IspSettings.from_dict({"target_mac_reduction": bad})
    with pytest.raises(ValueError, match="precision"):
        IspSettings.from_dict({"precision": "fp16"})
