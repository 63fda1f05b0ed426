"""`python -m drib evaluate`: accuracy and MACs on the full test set, the IB verification and attribution
metrics on a fixed subset (the first N test images after a seeded shuffle; per-sample IBA is costly)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.data import BatchLoader, DatasetSplits
from common.explain import (
    degradation_test,
    deletion_curve,
    grad_cam,
    insertion_curve,
    scaled_tile,
    smooth_grad,
)
from common.macs import count_params
from common.run import progress

from .pipeline import TrainedDRIB
from .sparse_inference import sparse_forward
from .verification import ib_saliency, verify

IBA_TILES_AT_224 = (8, 14)  # IBA's degradation tiles on 224 px images


def attribution_subset(data: DatasetSplits, size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The documented evaluation subset: ``size`` test images drawn by a seeded permutation."""
    size = min(size, len(data.test))
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))[:size]
    subset = data.test.subset(order)
    return subset.images.float() / 255.0, subset.labels


@torch.no_grad()
def accuracy_and_macs(trained: TrainedDRIB, data: DatasetSplits, device: torch.device,
                      batch_size: int = 256) -> dict[str, float]:
    """Top-1 and per-sample MACs of the channel-skipping computation over the whole test set."""
    net = trained.net.eval()
    correct, macs = 0, []
    loader = BatchLoader(data.test, batch_size, train=False, device=device)
    for x, y in progress(loader, "test (channel skipping)", total=len(loader)):
        logits, sample_macs = sparse_forward(net, x)
        correct += int((logits.argmax(1) == y).sum())
        macs.append(sample_macs)
    all_macs = torch.cat(macs)
    dense = trained.net.dense_backbone_macs()
    mean = float(all_macs.mean())
    return {"top1": 100.0 * correct / len(data.test), "macs_mean": mean, "macs_std": float(all_macs.std()),
            "macs_dense": float(dense), "mac_reduction": (dense - mean) / dense,
            "mac_reduction_paper_formula": (dense - mean) / mean,
            "params": count_params(trained.net), "params_backbone": count_params(trained.net.backbone)}


def _curves(net, images: Tensor, maps: Tensor, targets: Tensor, tiles: list[int], points: int
            ) -> dict[str, float]:
    deletion = deletion_curve(net, images, maps, targets)
    insertion = insertion_curve(net, images, maps, targets)
    out = {"deletion_auc": float(deletion.auc.mean()), "insertion_auc": float(insertion.auc.mean())}
    for tile in tiles:
        curves = degradation_test(net, images, maps, targets, tile=tile, points=points)
        out[f"degradation_{tile}px_score"] = float(curves.score.mean())
        out[f"degradation_{tile}px_morf_auc"] = float(curves.morf_auc.mean())
        out[f"degradation_{tile}px_lerf_auc"] = float(curves.lerf_auc.mean())
    return out


def attribution_metrics(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, subset: int,
                        seed: int = 0, degradation_points: int = 50, compare: bool = True) -> dict[str, Any]:
    """Credibility and the attribution metrics of DRIB's IBA (and of Grad-CAM / SmoothGrad for comparison)
    on the fixed subset; targets are the model's predictions (the class being explained)."""
    net = trained.net.eval()
    images, _ = attribution_subset(data, subset, seed)
    images = images.to(device)
    with torch.no_grad():
        targets = net(images).argmax(1)
    cfg = trained.config.bottleneck
    check = verify(net, images, trained.stats, cfg, targets=targets, seed=seed)
    valid = ~torch.isnan(check["credibility"])
    metrics: dict[str, Any] = {
        "attribution_subset": len(images), "attribution_subset_seed": seed,
        "credibility": float(check["credibility"][valid].mean()) if valid.any() else math.nan,
        "credibility_chance": float(check["chance"].mean()),
        "bottleneck_bits_mean": float(check["bits"].mean()),
    }
    h = images.shape[-1]
    tiles = [scaled_tile(t, h) for t in IBA_TILES_AT_224]
    metrics["degradation_tiles_px"] = tiles
    maps = torch.cat([ib_saliency(net, images[i:i + 1], targets[i:i + 1], trained.stats, cfg, seed=seed)
                      for i in progress(range(len(images)), "IBA saliency", total=len(images))])
    metrics.update(_curves(net, images, maps, targets, tiles, degradation_points))
    if compare:
        for name, fn in (("gradcam", lambda: grad_cam(net, net.backbone.cam_layer(), images, targets)),
                         ("smoothgrad", lambda: smooth_grad(
                             net, images, targets, generator=torch.Generator(device=device).manual_seed(seed)))):
            for key, value in _curves(net, images, fn(), targets, tiles, degradation_points).items():
                metrics[f"{name}_{key}"] = value
    return metrics


def evaluate(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, subset: int = 200,
             seed: int = 0, compare: bool = True, degradation_points: int = 50) -> dict[str, Any]:
    metrics: dict[str, Any] = {"backbone": trained.meta["backbone"], "dataset": data.name}
    metrics.update(accuracy_and_macs(trained, data, device))
    if subset > 0:
        metrics.update(attribution_metrics(trained, data, device, subset, seed, degradation_points, compare))
    metrics["training"] = {k: trained.meta.get(k) for k in ("steps", "train_seconds", "selected_epoch",
                                                              "val_top1", "val_mac_fraction")}
    return metrics


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    from common.run import RunDir

    RunDir(run_dir).write_metrics(metrics)
