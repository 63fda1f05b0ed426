"""The pathways on every common backbone, the target-layer rule, and gradients to P."""

import pytest
import torch

from common.backbones import build_backbone, list_backbones
from picnn.model import PicnnNet, TargetConv, default_target_filters, picnn_losses


def test_default_width_is_the_papers_filter_to_class_ratio():
    assert default_target_filters(10) == 128
    assert default_target_filters(100) == 1280


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_gets_a_128_filter_target_layer_and_trains_p(name):
    torch.manual_seed(0)
    model = PicnnNet(build_backbone(name, 10), 10)
    assert isinstance(model.target, TargetConv) and model.filters == 128
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    out = model.pathways(x, y)
    assert out.y1_logits.shape == out.y2_logits.shape == (2, 10)
    assert set(out.z.detach().unique().tolist()) <= {0.0, 1.0}
    loss, _, _ = picnn_losses(out, y, lam=2.0)
    loss.backward()
    assert model.correspondence.logits.grad.abs().sum() > 0
    torch.testing.assert_close(model(x), out.y1_logits)  # forward is the discrimination pathway


def test_matching_width_reuses_the_backbone_map_and_classifier():
    backbone = build_backbone("resnet20", 5)  # 64 channels = 12.8 x 5
    model = PicnnNet(backbone, 5)
    assert not model.added_target_conv and model.classifier is backbone.classifier
    assert model.unused_parameters() == []
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), backbone(x))


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
