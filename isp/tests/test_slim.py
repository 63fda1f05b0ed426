"""Physical pruning: weight shapes and equality with the gated network."""

import pytest
import torch

from common.backbones import build_backbone
from isp.model import GateInjector, prunable_sites
from isp.slim import kept_indices, slim_copy, slim_vs_gated


def _randomise_bn(model):
    # Non-trivial BN statistics and shifts, so a wrongly kept channel or a missed follower BN shows up.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _random_hard(sites, seed=0):
    g = torch.Generator().manual_seed(seed)
    hard = [(torch.rand(s.channels, generator=g) < 0.5).float() for s in sites]
    for h in hard:
        if h.sum() == 0:
            h[0] = 1.0
    return hard


def test_resnet20_slim_weight_shapes():
    model = _randomise_bn(build_backbone("resnet20"))
    sites = prunable_sites(model)
    hard = _random_hard(sites)
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    for block, h in zip(slim.blocks(), hard):
        k = int(h.sum())
        assert block.conv1.weight.shape[0] == k and block.conv1.out_channels == k
        assert block.bn1.weight.shape == (k,) and block.bn1.running_mean.shape == (k,)
        assert block.conv2.weight.shape[1] == k and block.conv2.in_channels == k
        # the residual stream keeps its width
        assert block.conv2.weight.shape[0] == block.bn2.num_features == block.conv1.weight.shape[1] * (
            2 if block.conv1.stride[0] == 2 else 1)
    assert model.layer1[0].conv1.weight.shape[0] == 16  # the original is untouched
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg16"])
def test_slim_model_matches_gated_model(name):
    torch.manual_seed(0)
    model = _randomise_bn(build_backbone(name))
    sites = prunable_sites(model)
    hard = _random_hard(sites, seed=1)
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    assert slim_vs_gated(model, slim, sites, hard, x) < 1e-4
    # and the gating really matters: the ungated model computes something else
    with torch.no_grad():
        assert (model(x) - slim(x)).abs().max() > 1e-3


def test_mobilenetv2_depthwise_and_follower_bn_are_slimmed():
    model = build_backbone("mobilenetv2")
    sites = prunable_sites(model)
    hard = _random_hard(sites, seed=2)
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    block, k = slim.layers[3], int(hard[3].sum())
    assert block.conv1.out_channels == k
    assert block.conv2.weight.shape == (k, 1, 3, 3) and block.conv2.groups == k
    assert block.bn2.num_features == k
    assert block.conv3.in_channels == k


def test_slim_rejects_an_empty_site():
    model = build_backbone("resnet20")
    sites = prunable_sites(model)
    keep = [torch.arange(s.channels) for s in sites]
    keep[2] = torch.tensor([], dtype=torch.int64)
    with pytest.raises(ValueError, match="keep no channel"):
        slim_copy(model, keep, (3, 32, 32))


def test_injector_without_values_is_identity():
    model = build_backbone("resnet20").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with GateInjector(prunable_sites(model)):
            out = model(x)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_slim_model_matches_gated_model_with_channel_groups(name):
    from isp.model import ChannelGates, group_sizes

    torch.manual_seed(1)
    model = _randomise_bn(build_backbone(name))
    sites = prunable_sites(model)
    channels = [s.channels for s in sites]
    gates = ChannelGates(channels, groups=group_sizes(channels, 16))
    with torch.no_grad():
        gates.theta.normal_(-3.0, 2.0)
    hard = gates.hard()
    slim = slim_copy(model, kept_indices(hard), (3, 32, 32))
    assert all(m.out_channels % 16 == 0 for m in (s.conv for s in prunable_sites(slim)) if m.out_channels >= 16)
    x = torch.rand(2, 3, 32, 32)
    assert slim_vs_gated(model, slim, sites, hard, x) < 1e-4
