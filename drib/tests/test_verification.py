import math

import pytest
import torch

from common.backbones import build_backbone
from drib.config import DecisionConfig
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
    net = DynamicNetwork(build_backbone("resnet20"), DecisionConfig(actions=2))
    assert bottleneck_site(net, "middle").site.name == "layer2.1.conv1"
    assert bottleneck_site(net, 0).site.name == "layer1.0.conv1"
    assert bottleneck_site(net, "layer3.2.conv1") is net.gated[-1]
    with pytest.raises(ValueError, match="choose one of"):
        bottleneck_site(net, "layer9.conv")
    with pytest.raises(ValueError, match="out of range"):
        bottleneck_site(net, 40)
