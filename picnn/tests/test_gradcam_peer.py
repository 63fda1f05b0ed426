"""PICNN's class-cluster Grad-CAM (Grad-CAM summed over a class's cluster of filters only, Fig. 7) against a
peer: captum's LayerGradCam with the per-channel terms kept (attr_dim_summation=False), restricted to the same
channels, summed and rectified. On a tiny net (no data) and on the pretrained ResNet-20 (needs the weights)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.backbones import build_backbone
from common.data.paths import resolve_data_root
from picnn.explain import class_cluster_saliency, cluster_grad_cams
from picnn.model import PicnnNet

from .conftest import TinyBackbone

captum_attr = pytest.importorskip("captum.attr")
WEIGHTS = Path("weights") / "resnet20-12fca82f.th"


def _peer_cluster_cam(model: PicnnNet, images: torch.Tensor, targets: torch.Tensor, channels: torch.Tensor,
                      size: tuple[int, int] | None) -> torch.Tensor:
    """captum's per-channel Grad-CAM terms alpha_k A_k, kept for the channels in ``channels`` (B x N bool)."""
    terms = captum_attr.LayerGradCam(model, model.target_layer).attribute(
        images, target=targets, attr_dim_summation=False)  # B x N x h x w
    cam = torch.relu((terms * channels[:, :, None, None].float()).sum(dim=1, keepdim=True))
    if size is not None:
        cam = captum_attr.LayerAttribution.interpolate(cam, size, interpolate_mode="bilinear")
    return cam[:, 0].detach()


def _check_against_peer(model: PicnnNet, images: torch.Tensor, targets: torch.Tensor) -> None:
    model.eval()
    clusters = model.correspondence.argmax_clusters()[targets]  # B x N: each image's target-class cluster
    assert clusters.any(dim=1).all() and (~clusters).any(dim=1).all()  # a proper subset for every image
    ours = cluster_grad_cams(model, images, targets)
    scale = float(ours["all"].max())
    assert scale > 0
    for key, channels in (("cluster", clusters), ("complement", ~clusters)):
        peer = _peer_cluster_cam(model, images, targets, channels, tuple(images.shape[-2:]))
        torch.testing.assert_close(ours[key], peer, atol=1e-5 * scale, rtol=1e-4)
    # The saliency handed to the benchmark is the cluster map, at the layer's resolution too.
    native = class_cluster_saliency(model)(images, targets)
    torch.testing.assert_close(native, ours["cluster"])
    # The subset matters: the cluster map is not the all-filter map.
    assert (ours["cluster"] - ours["all"]).abs().max() > 1e-3 * scale


def test_cluster_grad_cam_matches_captum_on_a_tiny_net():
    torch.manual_seed(0)
    model = PicnnNet(TinyBackbone(num_classes=4, width=16), 4, target_layer="last_stage")
    with torch.no_grad():  # a P whose argmax clusters give every class a proper subset of the 16 filters
        model.correspondence.logits.copy_(torch.nn.functional.one_hot(torch.arange(16) % 4, 4).T * 3.0)
    images, targets = torch.rand(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])
    _check_against_peer(model, images, targets)


def _cifar_images(root: Path, per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first test image of each CIFAR-10 class folder, or None when the images are absent."""
    folder = root / "cifar10" / "test"
    if not folder.is_dir():
        return None
    from PIL import Image

    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.png"))[:per_class]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0, torch.tensor(labels)


@pytest.mark.data
def test_cluster_grad_cam_matches_captum_on_the_pretrained_resnet20():
    root = resolve_data_root(None)
    if not (root / WEIGHTS).is_file():
        pytest.skip(f"DATA_ROOT holds no {WEIGHTS}")
    torch.manual_seed(0)
    model = PicnnNet(build_backbone("resnet20", 10, root / WEIGHTS), 10, target_layer="last_stage")  # 64 filters
    assert not model.added_target_conv
    real = _cifar_images(root)
    if real is None:  # the weights without the images: smooth seeded noise
        images = torch.nn.functional.interpolate(torch.rand(10, 3, 8, 8), size=(32, 32), mode="bilinear")
        targets = torch.arange(10)
    else:
        images, targets = real
    _check_against_peer(model, images, targets)
