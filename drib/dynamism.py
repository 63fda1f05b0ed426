"""How much the decisions depend on the image, measured rather than counted (issue: decisions vs static twin).

Per gated layer, over a set of images (argmax decisions, as deployed):

* ``usage_perplexity``: exp(entropy) of the share of images per mask (1 = one mask for every image, m = all
  m rows used equally). Rows are counted by the channel set they keep (two rows with the same set are one);
* ``top_row_share``: share of images on the most used mask; ``rows_over_5pct``: masks serving >= 5% each;
* ``mask_difference``: expected share of the layer's channels on which two distinct random images' masks
  differ (exact over all pairs: channel c on for k of n images differs on k(n - k) of the n(n - 1)/2 pairs);
* ``dynamic_channel_share``: channels on for at least 5% of the images and off for at least 5%.

Over the whole network: the same figures over all gated channels (channel-weighted), and the class probe:
a logistic regression from the one-hot per-layer choices to the class, 5-fold stratified cross-validated
accuracy, beside the same probe on shuffled labels (mean of a few permutations) and the majority class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .model import DynamicNetwork

MIN_SHARE = 0.05  # a row "serves" images / a channel is "dynamic" at >= 5% of the images each way


@dataclass
class Decisions:
    """Per gated layer: each image's mask id (B, ids of distinct channel sets) and its on/off mask (B x C)."""

    names: list[str]
    ids: list[Tensor]
    masks: list[Tensor]


@torch.no_grad()
def collect_decisions(net: DynamicNetwork, images: Tensor, batch_size: int = 256) -> Decisions:
    """Argmax decisions of ``net`` on ``images`` (N x 3 x H x W in [0, 1]); the network's device is used."""
    device = next(net.parameters()).device
    parts: list[list[Tensor]] = [[] for _ in net.gated]
    for start in range(0, len(images), batch_size):
        masks = net.channel_masks(images[start:start + batch_size].to(device))
        for k, mask in enumerate(masks):
            parts[k].append((mask != 0).cpu())
    masks = [torch.cat(p) for p in parts]
    return Decisions([g.site.name for g in net.gated], [mask_ids(m) for m in masks], masks)


def mask_ids(masks: Tensor) -> Tensor:
    """An integer id per row of a B x C bool tensor, equal ids iff equal channel sets."""
    _, inverse = torch.unique(masks.to(torch.uint8), dim=0, return_inverse=True)
    return inverse


def usage(ids: Tensor) -> dict[str, float]:
    counts = torch.bincount(ids).double()
    share = counts[counts > 0] / counts.sum()
    entropy = float(-(share * share.log()).sum())
    return {"usage_perplexity": math.exp(entropy), "top_row_share": float(share.max()),
            "rows_used": len(share), "rows_over_5pct": int((share >= MIN_SHARE).sum())}


def pair_difference(masks: Tensor) -> Tensor:
    """Per channel, the share of the n(n - 1)/2 pairs of distinct images whose masks differ there."""
    n = masks.shape[0]
    if n < 2:
        return torch.zeros(masks.shape[1], dtype=torch.float64)
    on = masks.double().sum(0)
    return on * (n - on) / (n * (n - 1) / 2)


def dynamic_channels(masks: Tensor, min_share: float = MIN_SHARE) -> Tensor:
    """Channels on for at least ``min_share`` of the images and off for at least ``min_share`` (C bool)."""
    on = masks.double().mean(0)
    return (on >= min_share) & (1 - on >= min_share)


def class_probe(decisions: Decisions, labels: Tensor, folds: int = 5, shuffles: int = 3,
                seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy (%) of a logistic regression from the one-hot per-layer choices to the class,
    beside the same probe on shuffled labels and the majority class."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    y = labels.cpu().numpy()
    columns = [torch.nn.functional.one_hot(ids, int(ids.max()) + 1) for ids in decisions.ids]
    x = torch.cat(columns, dim=1).numpy().astype(np.float32)
    counts = np.bincount(y)
    folds = int(min(folds, counts[counts > 0].min()))
    majority = 100.0 * counts.max() / len(y)
    if folds < 2 or len(np.unique(y)) < 2:
        return {"probe_top1": float("nan"), "probe_shuffled_top1": float("nan"), "probe_majority": majority}

    def score(target: np.ndarray) -> float:
        split = StratifiedKFold(folds, shuffle=True, random_state=seed)
        model = LogisticRegression(max_iter=500)
        return 100.0 * float(cross_val_score(model, x, target, cv=split).mean())

    rng = np.random.default_rng(seed)
    shuffled = [score(rng.permutation(y)) for _ in range(shuffles)]
    return {"probe_top1": score(y), "probe_shuffled_top1": float(np.mean(shuffled)),
            "probe_shuffled_std": float(np.std(shuffled)), "probe_majority": majority, "probe_folds": folds}


def dynamism_metrics(decisions: Decisions, labels: Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """The per-layer and whole-network figures of the module docstring."""
    layers: dict[str, Any] = {}
    all_diff, all_dynamic = [], []
    for name, ids, masks in zip(decisions.names, decisions.ids, decisions.masks):
        diff, dynamic = pair_difference(masks), dynamic_channels(masks)
        all_diff.append(diff)
        all_dynamic.append(dynamic)
        layers[name] = {**usage(ids), "mask_difference": float(diff.mean()),
                        "dynamic_channel_share": float(dynamic.double().mean()),
                        "kept_share": float(masks.double().mean())}
    out: dict[str, Any] = {
        "images": int(decisions.masks[0].shape[0]),
        "layers": layers,
        "mask_difference": float(torch.cat(all_diff).mean()),
        "dynamic_filter_share": float(torch.cat(all_dynamic).double().mean()),
        "max_top_row_share": max(v["top_row_share"] for v in layers.values()),
        "min_rows_over_5pct": min(v["rows_over_5pct"] for v in layers.values()),
        "mean_usage_perplexity": sum(v["usage_perplexity"] for v in layers.values()) / len(layers),
        "definitions": {
            "usage_perplexity": "exp(entropy) of the share of images per distinct channel set",
            "top_row_share": "share of images on the most used channel set",
            "rows_over_5pct": "channel sets serving at least 5% of the images each",
            "mask_difference": "expected share of gated channels on which two distinct random images' masks differ",
            "dynamic_filter_share": "share of gated channels on for >= 5% of the images and off for >= 5%",
            "probe": "5-fold stratified CV accuracy (%) of a logistic regression from one-hot per-layer choices "
                     "to the class; shuffled: the same on permuted labels",
        },
    }
    if labels is not None:
        out.update(class_probe(decisions, labels, seed=seed))
        out["probe_over_shuffled"] = out["probe_top1"] - out["probe_shuffled_top1"]
    return out


def goal_met(metrics: dict[str, Any]) -> dict[str, bool]:
    """The issue's goal: top row <= 50% and >= 4 rows at >= 5% at every layer, mask difference >= 25%,
    probe >= 30 points over shuffled labels."""
    return {"top_row_at_most_50pct": metrics["max_top_row_share"] <= 0.5,
            "four_rows_over_5pct": metrics["min_rows_over_5pct"] >= 4,
            "mask_difference_at_least_25pct": metrics["mask_difference"] >= 0.25,
            "probe_30_points_over_shuffled": metrics.get("probe_over_shuffled", float("nan")) >= 30.0}
