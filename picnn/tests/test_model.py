"""The pathways on every common backbone, the target-layer rule (no added MACs by default), gradients to P."""

import pytest
import torch

from common.backbones import build_backbone, list_backbones
from common.macs import count_macs
from picnn.losses import picnn_losses
from picnn.model import PicnnNet, TargetConv, default_target_filters, resolve_target

from .conftest import TinyBackbone


def test_default_width_of_an_added_layer_is_the_papers_filter_to_class_ratio():
    assert default_target_filters(10) == 128
    assert default_target_filters(100) == 1280


def test_target_rule():
    assert resolve_target(64, 10) == (64, False)  # the backbone's last stage
    assert resolve_target(64, 100) == (1280, True)  # narrower than K: a layer of 12.8 K filters is added
    assert resolve_target(64, 10, 128) == (128, True)  # asked for
    assert resolve_target(64, 10, 64) == (64, False)
    with pytest.raises(ValueError, match="at least one filter"):
        resolve_target(64, 10, 0)


@pytest.mark.parametrize("name", list_backbones())
def test_default_target_is_the_last_stage_at_the_backbones_cost_and_trains_p(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, 10).eval()
    model = PicnnNet(backbone, 10).eval()
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


def test_an_asked_for_width_adds_a_target_conv_and_its_macs():
    backbone = build_backbone("resnet20", 10)
    model = PicnnNet(backbone, 10, filters=128)
    assert isinstance(model.target, TargetConv) and model.filters == 128
    assert model.unused_parameters() == list(backbone.classifier.parameters())
    # 3x3 conv 64 -> 128 on the 8 x 8 map, and a classifier 128 -> 10 instead of 64 -> 10.
    assert count_macs(model) - count_macs(backbone) == 64 * 128 * 9 * 64 + (128 - 64) * 10
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    torch.testing.assert_close(model.eval()(x), model.pathways(x, y).y1_logits)


def test_a_backbone_narrower_than_k_gets_an_added_layer():
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
