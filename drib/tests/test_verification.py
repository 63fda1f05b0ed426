import math

import pytest
import torch

from common.backbones import build_backbone
from drib.config import DecisionSettings
from drib.model import DynamicNetwork
from drib.verification import bottleneck_site, credibility


def test_credibility_is_the_information_share_of_selected_channels():
    bits = torch.zeros(3, 2, 2)
    bits[0] = 1.0  # 4 bits
    bits[1, 0, 0] = 2.0  # 2 bits
    bits[2] = 0.5  # 2 bits
    assert credibility(bits, torch.tensor([1.0, 0, 0])) == pytest.approx(0.5)
    assert credibility(bits, torch.tensor([0, 2.0, 0.3])) == pytest.approx(0.5)
    assert credibility(bits, torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert math.isnan(credibility(torch.zeros(3, 2, 2), torch.ones(3)))


def test_bottleneck_site_selection():
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=2))
    assert bottleneck_site(net, "middle").site.name == "layer2.1.conv1"
    assert bottleneck_site(net, 0).site.name == "layer1.0.conv1"
    assert bottleneck_site(net, "layer3.2.conv1") is net.gated[-1]
    with pytest.raises(ValueError, match="choose one of"):
        bottleneck_site(net, "layer9.conv")
    with pytest.raises(ValueError, match="out of range"):
        bottleneck_site(net, 40)


def _bits(n: int = 40, c: int = 16, seed: int = 0) -> torch.Tensor:
    """Per-image channel bits where each image's informative channels differ (4 of 16 carry most bits)."""
    g = torch.Generator().manual_seed(seed)
    info = torch.rand(n, c, generator=g) * 0.2
    for i in range(n):
        info[i, torch.randperm(c, generator=g)[:4]] += 5.0
    return info


def test_credibility_accepts_selections_that_follow_the_information():
    from drib.verification import credibility_controls

    info = _bits()
    selected = torch.zeros_like(info, dtype=torch.bool)
    selected[torch.arange(len(info))[:, None], info.topk(6, dim=1).indices] = True  # covers the 4 informative
    static = torch.zeros(16, dtype=torch.bool)
    static[:6] = True
    _, summary = credibility_controls(info, selected, static)
    assert summary["credibility_accepted"] is True
    assert summary["credibility_own"] > 0.9 and summary["credibility_random"] == pytest.approx(6 / 16)
    assert summary["credibility_normalised"] == pytest.approx(1.0)  # equal to the oracle
    assert all(t["beats"] for t in summary["credibility_tests"].values())


def test_credibility_rejects_selections_that_ignore_the_image():
    from drib.verification import credibility_controls

    info = _bits()
    static = torch.zeros(16, dtype=torch.bool)
    static[:6] = True
    same = static.expand(len(info), 16).clone()  # every image gets the same selection, whatever its content
    _, summary = credibility_controls(info, same, static)
    assert summary["credibility_accepted"] is False
    assert not summary["credibility_tests"]["static"]["beats"] and not summary["credibility_tests"]["other"]["beats"]
    g = torch.Generator().manual_seed(1)
    random = torch.stack([torch.randperm(16, generator=g) < 6 for _ in range(len(info))])  # random, image-blind
    _, summary = credibility_controls(info, random, static)
    assert summary["credibility_accepted"] is False
    assert abs(summary["credibility_normalised"]) < 0.3


def test_in_the_loop_verification_replaces_low_credibility_decisions():
    from drib.bottleneck import FeatureStats
    from drib.config import BottleneckSettings
    from drib.verification import credibility_site, verified_forward, verified_predict

    torch.manual_seed(0)
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=3)).eval()
    with torch.no_grad():
        for g in net.gates:
            g.codebook.copy_((torch.rand_like(g.codebook) < 0.5).float())
    x = torch.rand(4, 3, 32, 32)
    site = credibility_site(net, "middle")
    c = site.gated.site.channels
    bits = torch.rand(4, c)
    dense = verified_forward(net, x, bits, 1.01, BottleneckSettings(verify_fallback="dense"))  # all below
    assert dense["replaced"].all()
    with torch.no_grad():
        plain = net(x)
    site.gated.gate.open = True
    with torch.no_grad():
        opened = net(x)
    site.gated.gate.open = False
    assert torch.allclose(dense["logits"], opened, atol=1e-5) and not torch.allclose(plain, opened)
    none = verified_forward(net, x, bits, 0.0, BottleneckSettings())  # nothing below 0: decisions adopted
    assert not none["replaced"].any() and torch.allclose(none["logits"], plain, atol=1e-5)
    shape = (c, 16, 16)
    stats = {k: FeatureStats(torch.zeros(shape if "bn1" in k else (32, 16, 16)),
                             torch.ones(shape if "bn1" in k else (32, 16, 16)),
                             torch.ones(shape if "bn1" in k else (32, 16, 16))) for k in site.keys}
    result = verified_predict(net, x, stats, BottleneckSettings(steps=1, copies=1, verify_threshold=1.0))
    assert result["replaced"].all() and result["macs"].shape == (4,)
