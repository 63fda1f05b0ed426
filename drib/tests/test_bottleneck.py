import itertools
import math

import pytest
import torch
from torch import nn

from drib.bottleneck import (
    FeatureStats,
    WelfordEstimator,
    attribute,
    capacity,
    check_cut,
    estimate_statistics,
    gaussian_kernel,
    restrict,
    smooth,
    to_heatmap,
)
from drib.config import BottleneckSettings


def test_capacity_is_zero_when_lambda_is_zero_and_features_pass_when_lambda_is_one():
    features = torch.randn(2, 4, 5, 5) * 3 + 1
    mean, std = torch.randn(4, 5, 5), torch.rand(4, 5, 5) + 0.5
    zero, one = torch.zeros_like(features), torch.ones_like(features)
    assert torch.allclose(capacity(features, zero, mean, std), torch.zeros_like(features), atol=1e-6)
    noise = torch.randn_like(features)
    assert torch.equal(restrict(features, one, mean, std, noise), features)
    assert torch.allclose(restrict(features, zero, mean, std, noise), mean + std * noise)
    # capacity grows with lambda (more of R passes) and is finite at lambda = 1
    lams = [capacity(features, torch.full_like(features, v), mean, std).mean() for v in (0.2, 0.6, 0.95, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(lams)) and math.isfinite(float(lams[-1]))


def test_capacity_equals_the_gaussian_kl_in_closed_form():
    r, lam = torch.tensor([1.5]), torch.tensor([0.7])
    mu_z, var_z = lam * r, (1 - lam) ** 2
    kl = 0.5 * (var_z + mu_z**2 - 1 - torch.log(var_z))
    assert torch.allclose(capacity(r, lam, torch.zeros(1), torch.ones(1)), kl)


def test_welford_matches_torch_mean_and_unbiased_std():
    data = torch.randn(37, 3, 4, 4) * 2 + 5
    est = WelfordEstimator()
    for chunk in data.split(10):
        est.update(chunk)
    assert torch.allclose(est.mean(), data.mean(0), atol=1e-5)
    assert torch.allclose(est.std(), data.std(0, unbiased=True), atol=1e-5)


def test_smoothing_keeps_constants_and_uses_iba_kernel_size():
    assert gaussian_kernel(1.0).numel() == 5 and torch.isclose(gaussian_kernel(1.0).sum(), torch.tensor(1.0))
    const = torch.full((3, 6, 6), 0.4)
    assert torch.allclose(smooth(const, 1.0), const)
    spike = torch.zeros(1, 7, 7)
    spike[0, 3, 3] = 1
    out = smooth(spike, 1.0)
    assert torch.isclose(out.sum(), torch.tensor(1.0)) and out[0, 3, 3] < 1 and out[0, 3, 4] > 0


def test_heatmap_spreads_bits_over_input_pixels():
    bits = torch.zeros(2, 4, 4)
    bits[0, 1, 2] = 8.0
    heat = to_heatmap(bits, (16, 16))
    assert heat.shape == (16, 16)
    assert torch.isclose(heat.sum(), torch.tensor(8.0), rtol=1e-4)


class PatchModel(nn.Module):
    """Toy task: class 1 iff the 4x4 patch at rows/cols 8..11 is bright; the rest of the image is clutter
    the model ignores. ``features`` is the layer carrying the bottleneck."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.features.weight.fill_(1 / 3)
            self.features.bias.zero_()

    def forward(self, x):
        f = self.features(x)
        evidence = f[:, :, 8:12, 8:12].mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-10 * evidence, 10 * evidence], dim=1)


def test_iba_heatmap_concentrates_on_the_planted_patch():
    torch.manual_seed(0)
    model = PatchModel()
    train = torch.rand(400, 3, 16, 16)
    # Most training images lack the patch, so the bottleneck's noise (drawn from the feature statistics)
    # reads as "no patch": dropping the patch's information costs the target class.
    train[:40, :, 8:12, 8:12] = 0.9 + 0.1 * torch.rand(40, 3, 4, 4)
    train[40:, :, 8:12, 8:12] = 0.1 * torch.rand(360, 3, 4, 4)
    stats = estimate_statistics(model, model.features, [(train, None)], samples=400)
    image = torch.rand(3, 16, 16)
    image[:, 8:12, 8:12] = 0.95
    result = attribute(model, model.features, image, 1, stats, BottleneckSettings(),
                       generator=torch.Generator().manual_seed(0))
    heat = result.heatmap
    inside = heat[7:13, 7:13].sum() / heat.sum()  # patch plus one pixel of smoothing margin
    assert inside > 0.6, float(inside)  # 36 of 256 pixels (14%) hold most of the information
    assert heat[:4, :4].mean() < 0.1 * heat[8:12, 8:12].mean()
    assert model.features.weight.grad is None  # parameters untouched


def test_element_mask_removes_channels_from_the_attribution():
    model = PatchModel()
    train = torch.rand(64, 3, 16, 16)
    stats = estimate_statistics(model, model.features, [(train, None)], samples=64)
    keep = torch.tensor([1, 0, 1, 0])
    result = attribute(model, model.features, torch.rand(3, 16, 16), 1, stats,
                       BottleneckSettings(steps=2, copies=2), element_mask=keep)
    assert torch.all(result.capacity_bits[keep == 0] == 0)
    assert result.capacity_bits[keep == 1].sum() > 0


def test_variance_terms_have_a_gradient_at_the_iba_start():
    # alpha_0 = 5: log((1 - sigmoid(5))^2) = -10.01, exactly where a [-10, 10] clamp would cut the gradient.
    # Elements with r = 0 (features at their mean) depend on alpha only through the variance terms.
    alpha = torch.full((1, 2, 3, 3), 5.0, requires_grad=True)
    lam, one_minus = torch.sigmoid(alpha), torch.sigmoid(-alpha)
    mean, std = torch.zeros(2, 3, 3), torch.ones(2, 3, 3)
    features = mean.clone()[None]
    capacity(features, lam, mean, std, one_minus).sum().backward()
    assert alpha.grad is not None and torch.all(alpha.grad.abs() > 1e-3), alpha.grad
    # and IBA actually moves such an element: after its steps lambda is well below the start
    model = PatchModel()
    stats = FeatureStats(torch.zeros(4, 16, 16), torch.ones(4, 16, 16), torch.ones(4, 16, 16))
    image = torch.zeros(3, 16, 16)  # features exactly at the mean: r = 0 everywhere
    result = attribute(model, model.features, image, 0, stats, BottleneckSettings(steps=3, copies=2))
    assert float(result.capacity_bits.max()) < 6.0  # the clamped version stays at 6.49 bits per element


def test_inactive_elements_carry_no_capacity():
    model = PatchModel()
    train = torch.rand(64, 3, 16, 16)
    train[:, :, :, :4] = 0.0  # the left 4 columns never vary: std 0 and always zero
    stats = estimate_statistics(model, model.features, [(train, None)], samples=64)
    assert torch.all(stats.active[:, :, :4] == 0) and torch.all(stats.active[:, :, 4:] == 1)
    result = attribute(model, model.features, torch.rand(3, 16, 16), 1, stats, BottleneckSettings(steps=2, copies=2))
    assert torch.all(result.capacity_bits[:, :, :4] == 0)
    assert result.capacity_bits[:, :, 4:].sum() > 0


class SkipToy(nn.Module):
    """x -> stem -> [branch conv] + identity -> head: the branch can be bypassed, the block output cannot."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.block = nn.Identity()  # the block output, i.e. the residual stream
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        out = self.block(torch.relu(self.branch(h) + h))
        return self.head(out.mean(dim=(2, 3)))


def test_a_bottleneck_on_a_bypassable_branch_is_refused():
    torch.manual_seed(0)
    toy = SkipToy().eval()
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="can be bypassed"):
        check_cut(toy, [toy.branch], images)
    check_cut(toy, [toy.block], images)  # the block output is a cut: accepted
    # what the refusal protects against: with the branch fully closed (lambda = 0, pure noise) the output
    # still depends on the image, so IBA there measures only what the branch adds to the shortcut
    stats = estimate_statistics(toy, toy.branch, [(torch.rand(64, 3, 8, 8), None)], samples=64)
    closed = BottleneckSettings(alpha_init=-60.0, steps=1, lr=1e-9, copies=1)
    outputs = []
    for image in images[:2]:
        def record(module, inputs, output):
            outputs.append(output.detach())
        handle = toy.head.register_forward_hook(record)
        attribute(toy, toy.branch, image, 0, stats, closed)
        handle.remove()
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_default_attribution_site_of_a_resnet_is_the_block_output_and_cannot_be_bypassed():
    from common.backbones import build_backbone
    from drib.config import DecisionSettings
    from drib.model import DynamicNetwork
    from drib.verification import attribution_site, credibility_site

    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=2)).eval()
    site = attribution_site(net, "middle")
    assert site.name == "layer2.1"
    with pytest.raises(ValueError, match="can be bypassed"):
        attribution_site(net, "layer2.1.bn1")
    cred = credibility_site(net, "middle")  # the gated BN plus the block's shortcut: a cut together
    assert [k.removeprefix("open:") for k in cred.keys] == ["backbone.layer2.1.bn1", "backbone.layer2.1.shortcut"]


@pytest.mark.parametrize("bad", [{"sigma": 0.0}, {"sigma": -1.0}, {"min_std": 0.0}, {"beta": float("nan")},
                                 {"lr": 0.0}, {"alpha_init": float("inf")}, {"verify_threshold": 2.0}])
def test_bad_bottleneck_settings_are_a_clear_error(bad):
    model = PatchModel()
    stats = FeatureStats(torch.zeros(4, 16, 16), torch.ones(4, 16, 16), torch.ones(4, 16, 16))
    with pytest.raises(ValueError, match="bottleneck\\."):
        attribute(model, model.features, torch.rand(3, 16, 16), 1, stats, BottleneckSettings(**bad))
