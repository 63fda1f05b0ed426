"""The pathways on every common backbone, the target-layer rule (the paper's added conv by default, the
last stage at no added MACs as a setting), gradients to P."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import picnn
from common.backbones import build_backbone, list_backbones
from common.macs import count_macs
from picnn.config import PicnnSettings
from picnn.losses import picnn_losses
from picnn.model import PicnnNet, TargetConv, default_target_filters, resolve_target

from .conftest import TinyBackbone


def test_default_width_of_an_added_layer_is_the_papers_filter_to_class_ratio():
    assert default_target_filters(10) == 128
    assert default_target_filters(100) == 1280


def test_target_rule():
    assert resolve_target(64, 10) == (128, True)  # the paper's: an added conv of round(12.8 K) filters
    assert resolve_target(64, 100) == (1280, True)
    assert resolve_target(64, 10, 64) == (64, True)  # an asked-for width is an added layer, even the backbone's
    assert resolve_target(64, 10, target_layer="last_stage") == (64, False)
    assert resolve_target(64, 10, 64, "last_stage") == (64, False)
    with pytest.raises(ValueError, match="at least one filter"):
        resolve_target(64, 10, 0)
    with pytest.raises(ValueError, match="not filters=128"):
        resolve_target(64, 10, 128, "last_stage")
    with pytest.raises(ValueError, match="fewer than the 100 classes"):
        resolve_target(64, 100, target_layer="last_stage")
    with pytest.raises(ValueError, match="target_layer must be one of"):
        resolve_target(64, 10, target_layer="last")


def test_default_cifar10_picnn_and_its_control_have_the_added_128_filter_layer():
    """The paper's configuration by default, from the settings (the CPU recipe included) to the network."""
    recipe = json.loads((Path(picnn.__file__).parent / "configs" / "resnet20_cifar10_cpu.json").read_text())
    for values in ({}, recipe["settings"]):
        settings = PicnnSettings.from_dict(values)
        control = dataclasses.replace(settings, lam=0.0)
        nets = [PicnnNet(build_backbone("resnet20", 10), 10, s.filters, s.target_layer) for s in (settings, control)]
        for net in nets:
            assert net.added_target_conv and isinstance(net.target, TargetConv) and net.filters == 128
            assert net.target.conv.out_channels == 128 and net.classifier.in_features == 128
        # the control is the same architecture: the same parameter names and shapes
        assert [(n, p.shape) for n, p in nets[0].named_parameters()] == \
            [(n, p.shape) for n, p in nets[1].named_parameters()]
        assert count_macs(nets[0]) == count_macs(nets[1]) > count_macs(nets[0].backbone)


@pytest.mark.parametrize("name", list_backbones())
def test_the_last_stage_target_costs_the_backbones_macs_and_trains_p(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, 10).eval()
    model = PicnnNet(backbone, 10, target_layer="last_stage").eval()
    assert not model.added_target_conv and model.filters == backbone.feature_channels
    assert model.classifier is backbone.classifier and model.unused_parameters() == []
    assert count_macs(model) == count_macs(backbone)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    torch.testing.assert_close(model(x), backbone(x))  # the pretrained network, unchanged
    model.train()
    out = model.pathways(x, y)
    assert out.y1_logits.shape == out.y2_logits.shape == (2, 10)
    assert set(out.z.detach().unique().tolist()) <= {0.0, 1.0}
    loss, _, _ = picnn_losses(out, y, lam=2.0)
    loss.backward()
    assert model.correspondence.logits.grad.abs().sum() > 0


def test_the_default_adds_a_target_conv_and_its_macs():
    backbone = build_backbone("resnet20", 10)
    model = PicnnNet(backbone, 10)
    assert isinstance(model.target, TargetConv) and model.filters == 128
    assert model.unused_parameters() == list(backbone.classifier.parameters())
    # 3x3 conv 64 -> 128 on the 8 x 8 map, and a classifier 128 -> 10 instead of 64 -> 10.
    assert count_macs(model) - count_macs(backbone) == 64 * 128 * 9 * 64 + (128 - 64) * 10
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    torch.testing.assert_close(model.eval()(x), model.pathways(x, y).y1_logits)
    # +11.6% on ResNet-20 and +3.8% on ResNet-56 (the figures of the README and the recipes)
    for name, percent in (("resnet20", 11.64), ("resnet56", 3.76)):
        plain = build_backbone(name, 10)
        added = count_macs(PicnnNet(plain, 10)) - count_macs(plain)
        assert round(100 * added / count_macs(plain), 2) == percent


def test_a_backbone_narrower_than_k_gets_an_added_layer_of_the_papers_ratio():
    model = PicnnNet(TinyBackbone(num_classes=20, width=16), 20)
    assert model.added_target_conv and model.filters == default_target_filters(20) == 256


def test_label_index_uses_the_true_class_and_gumbel_masks_are_soft_one_hot():
    torch.manual_seed(0)
    model = PicnnNet(build_backbone("resnet20", 10), 10)
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 9])
    out = model.pathways(x, y, cluster_index="label")
    assert torch.equal(out.cluster.argmax(1), y)
    gumbel = model.pathways(x, y, assignment="gumbel", gumbel_temperature=0.01)
    assert ((gumbel.z > 0.99) | (gumbel.z < 0.01)).float().mean() > 0.95
    with pytest.raises(ValueError, match="assignment"):
        model.pathways(x, y, assignment="argmax")
