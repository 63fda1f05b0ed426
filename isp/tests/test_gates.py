"""Channel gates, the prunable MAC count T(v) and the resource loss R_res."""

import math

import pytest
import torch

from common.backbones import build_backbone
from common.macs import count_macs
from isp.losses import resource_loss
from isp.model import ChannelGates, GateInjector, PrunableMacs, group_sizes, prunable_sites
from isp.slim import kept_indices, slim_copy

# ResNet-20 on 32x32: blocks of stage k have C = 16, 32, 64 channels on 32, 16, 8 px maps.
R20_BLOCK_CONV = {16: 16 * 16 * 9 * 32 * 32, 32: 32 * 32 * 9 * 16 * 16, 64: 64 * 64 * 9 * 8 * 8}


def test_resource_loss_is_log_of_excess_ratio():
    target = 2.0
    assert resource_loss(torch.tensor(3.0), target).item() == pytest.approx(math.log(1.5))
    assert resource_loss(torch.tensor(1.0), target).item() == 0.0
    x = torch.tensor(5.0, requires_grad=True)
    resource_loss(x, target).backward()
    assert x.grad.item() == pytest.approx(1 / 5)


def test_prunable_macs_hand_count_resnet20():
    model = build_backbone("resnet20")
    sites = prunable_sites(model)
    assert len(sites) == 9  # conv1 of every block; the residual-stream conv2 outputs are never gated
    macs = PrunableMacs(model, sites, (3, 32, 32))
    # Every gated channel of a block touches its conv1 (output) and conv2 (input): two convs per block in
    # T_all, exactly as in T(v) (the trap in the reference code counted one conv in T(v) and two in T_all).
    stage_first_conv1 = {  # the first block of stages 2 and 3 reads the narrower stream with stride 2
        "layer2.0.conv1": 16 * 32 * 9 * 16 * 16, "layer3.0.conv1": 32 * 64 * 9 * 8 * 8}
    expected_total = 0
    for site in sites:
        c = site.channels
        expected_total += stage_first_conv1.get(site.name, R20_BLOCK_CONV[c]) + R20_BLOCK_CONV[c]
    assert macs.total == expected_total
    ones = [torch.ones(s.channels) for s in sites]
    assert macs(ones).item() == pytest.approx(expected_total)
    # Close 6 of the 16 channels of the first block: its conv1 and conv2 both shrink to 10/16.
    values = [v.clone() for v in ones]
    values[0][:6] = 0
    assert macs(values).item() == pytest.approx(expected_total - 2 * R20_BLOCK_CONV[16] * 6 / 16)
    # Everything the gates cannot touch: stem conv (3 -> 16) and the classifier (64 -> 10).
    assert macs.fixed == 3 * 16 * 9 * 32 * 32 + 64 * 10
    assert macs.model_macs == count_macs(model)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_prunable_macs_of_hard_gates_match_the_slim_model(name):
    torch.manual_seed(0)
    model = build_backbone(name)
    sites = prunable_sites(model)
    macs = PrunableMacs(model, sites, (3, 32, 32))
    hard = [(torch.rand(s.channels) < 0.6).float() for s in sites]
    for h in hard:
        h[0] = 1.0
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    assert macs(hard).item() + macs.fixed == pytest.approx(count_macs(slim), rel=1e-9)


def test_gates_start_open_and_sample_with_the_right_probability():
    gates = ChannelGates([4000], bias=3.0, tau=0.4)
    assert torch.all(gates.open_probability()[0] > 0.999)  # sigmoid(3 / 0.4): start from the whole model
    with torch.no_grad():
        gates.theta.copy_(torch.linspace(-6, 2, 4000))
    low_tau = ChannelGates([4000], bias=3.0, tau=0.01)
    low_tau.load_state_dict(gates.state_dict())
    draws = torch.stack([low_tau.sample(torch.Generator().manual_seed(s))[0] for s in range(50)])
    freq = (draws > 0.5).float().mean(0)
    expected = torch.sigmoid(gates.theta.detach() + 3.0)  # P(theta + b + logistic > 0)
    # 50 draws per gate, pooled over 400-gate bins: 5 standard errors.
    freq_bins, exp_bins = freq.view(10, 400).mean(1), expected.view(10, 400).mean(1)
    se = torch.sqrt(exp_bins * (1 - exp_bins) / 20000) + 1e-3
    assert torch.all((freq_bins - exp_bins).abs() < 5 * se)


def test_hard_gates_keep_at_least_one_channel_per_site():
    gates = ChannelGates([3, 5], bias=3.0)
    with torch.no_grad():
        gates.theta.copy_(torch.tensor([-9.0, -8.0, -10.0, -9.0, 0.0, -9.0, -9.0, -9.0]))
    first, second = gates.hard()
    assert first.tolist() == [0.0, 1.0, 0.0]  # all closed: the largest logit survives
    assert second.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_gate_injector_zeroes_closed_channels_downstream_of_bn():
    model = build_backbone("resnet20").eval()
    sites = prunable_sites(model)
    seen = {}
    handle = model.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.setdefault("input", i[0]))
    values = [torch.ones(s.channels) for s in sites]
    values[0][[1, 4]] = 0.0
    injector = GateInjector(sites)
    injector.values = values
    with injector, torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    handle.remove()
    assert torch.all(seen["input"][:, [1, 4]] == 0)
    assert seen["input"][:, 0].abs().sum() > 0
    assert not injector._handles  # hooks removed on exit


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_grouped_gates_keep_multiples_of_the_block_and_count_macs_exactly(name):
    torch.manual_seed(3)
    model = build_backbone(name)
    sites = prunable_sites(model)
    channels = [s.channels for s in sites]
    groups = group_sizes(channels, 16)
    gates = ChannelGates(channels, groups=groups)
    assert len(gates.theta) == sum(c // g for c, g in zip(channels, groups)) < sum(channels)
    with torch.no_grad():
        gates.theta.normal_(-3.0, 2.0)
    # relaxed values: every channel of a group carries the group's value
    for values, g in zip(gates.sample(), groups):
        assert torch.equal(values.view(-1, g), values.view(-1, g)[:, :1].expand(-1, g))
    hard = gates.hard()
    kept = [int(h.sum()) for h in hard]
    assert all(k % g == 0 and k >= g for k, g in zip(kept, groups))
    assert all(k % 16 == 0 for k, c in zip(kept, channels) if c % 16 == 0)
    if name == "resnet20":  # every site in blocks of 16: the first stage's 16-channel sites stay whole
        assert groups == [16] * 9
    assert any(k < c for k, c in zip(kept, channels))
    macs = PrunableMacs(model, sites, (3, 32, 32))
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    # the regulariser's T(v) of the grouped gates is the slim network's MAC count (common.macs)
    assert macs(hard).item() + macs.fixed == pytest.approx(count_macs(slim), rel=1e-9)


def test_group_sizes_fall_back_to_a_common_divisor():
    assert group_sizes([16, 32, 64, 24, 10, 1], 16) == [16, 16, 16, 8, 2, 1]
    assert group_sizes([16, 32], 1) == [1, 1]
    with pytest.raises(ValueError, match="channel group"):
        group_sizes([16], 0)
    with pytest.raises(ValueError, match="does not divide"):
        ChannelGates([16, 12], groups=[16, 8])


def test_channel_group_setting_resolves_per_device():
    from isp.hardware import hardware_channel_block, resolve_channel_group

    assert resolve_channel_group("auto", "cpu") == hardware_channel_block("cpu") in (8, 16)
    assert resolve_channel_group("auto", "cuda") == 1
    assert resolve_channel_group(4, "cpu") == 4
    with pytest.raises(ValueError, match="channel_group"):
        resolve_channel_group(0, "cpu")
