"""Measurements of the selector objective itself (README, "loss along sigma")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from common.backbones import Backbone

from .rbf import area_penalty, rbf_bernoulli, sample_mask, smoothness_penalty
from .stages import kl_to_classifier


@torch.no_grad()
def loss_along_sigma(classifier: Backbone, predictor: Backbone, images: Tensor, sigmas: Sequence[float], *,
                     tau: float, lambda1: float, lambda2: float, samples: int = 4, batch: int = 128,
                     seed: int = 0) -> list[dict[str, float]]:
    """Eq. 8 for a centred RBF kernel of each ``sigma``: mean KL, R(m'), S(m') and the total over
    ``images`` and ``samples`` masks per image drawn by the selector's sampler at ``tau``."""
    classifier.eval()
    predictor.eval()
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        kl = area = smooth = 0.0
        count = 0
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            teacher = classifier(x)
            params = x.new_tensor([[height / 2, width / 2, float(sigma)]]).expand(len(x), 3)
            probs = rbf_bernoulli(params, height, width)
            for _ in range(samples):
                mask = sample_mask(probs, tau, generator)
                kl += float(kl_to_classifier(teacher, predictor(x * mask[:, None]))) * len(x)
                area += float(area_penalty(mask).sum())
                smooth += float(smoothness_penalty(mask).sum())
                count += len(x)
        row = {"sigma": float(sigma), "kl": kl / count, "R": area / count, "S": smooth / count}
        row["total"] = row["kl"] + lambda1 * row["R"] + lambda2 * row["S"]
        rows.append(row)
    return rows


def slim_from_widths(name: str, widths: Sequence[int], num_classes: int = 10,
                     input_size: tuple[int, int, int] = (3, 32, 32), weights: str | None = None) -> Backbone:
    """``name`` (optionally with pretrained ``weights``) with the first ``widths[i]`` channels kept at prunable
    site i: a network of the given shape for timing (which channels are kept does not change its speed)."""
    from common.backbones import build_backbone

    from .gates import prunable_sites
    from .slim import slim_copy

    model = build_backbone(name, num_classes, weights).eval()
    sites = prunable_sites(model, input_size)
    if len(widths) != len(sites):
        raise ValueError(f"{name} has {len(sites)} prunable sites, got {len(widths)} widths")
    for site, w in zip(sites, widths):
        if not 1 <= w <= site.channels:
            raise ValueError(f"site {site.name} has {site.channels} channels; cannot keep {w}")
    return slim_copy(model, [torch.arange(w) for w in widths], input_size).eval()


def speed_against_dense(models: dict[str, Backbone], images: Tensor, batch_sizes: Sequence[int] = (1, 128),
                        repeats: int = 20, compile: str | None = None) -> dict:
    """Every model in its fastest inference form (``common.deploy``: BN folded, channels_last, optional
    compiler), timed side by side, interleaved, median of ``repeats`` (``common.speed``); the first model is
    the reference of the ratios."""
    from common.deploy import deploy
    from common.speed import time_side_by_side

    forms = {name: deploy(model.eval(), example=images[:4], compile=compile) for name, model in models.items()}
    return time_side_by_side(forms, images, batch_sizes, min_repeats=repeats)
