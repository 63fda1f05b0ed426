"""MoRF / LeRF tile degradation test of the IBA paper (Schulz et al., ICLR 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._utils import (
    as_maps,
    as_targets,
    eval_mode,
    mixed_scores,
    model_device,
    stable_rank,
    tile_of_pixel,
    tile_relevance,
)


@dataclass
class DegradationCurves:
    """Result of `degradation_test`; P = number of recorded points (T + 1 by default, T = number of tiles).

    fractions:  [P] fraction of tiles replaced, from 0 to 1.
    morf, lerf: [B, P] target probability (normalised if requested) with the most / least relevant tiles
                replaced first.
    morf_auc, lerf_auc: [B] trapezoidal areas under the curves against `fractions`.
    score:      [B] AUC(LeRF) - AUC(MoRF) of the raw probability curves (higher is better: removing
                relevant tiles hurts more). Bounded in [-1, 1] whatever the image: the mean cannot blow up.
    degenerate: [B] bool, samples whose clean and fully degraded scores differ by less than `eps`; with
                `normalize` their curves are left as s - s_end instead of being divided by ~0.
    normalised_score: [B] IBA's normalised area (the raw area / (s_0 - s_end)), NaN for the images excluded
                by the rule |s_0 - s_end| < `min_span` (dividing by a small span makes one image dominate the
                mean: a span of 0.0026 gave one image a score of hundreds); `excluded` counts them.
    """

    fractions: Tensor
    morf: Tensor
    lerf: Tensor
    morf_auc: Tensor
    lerf_auc: Tensor
    score: Tensor
    degenerate: Tensor
    normalised_score: Tensor

    @property
    def excluded(self) -> int:
        """Images left out of `normalised_score` by the `min_span` rule."""
        return int(torch.isnan(self.normalised_score).sum())


def scaled_tile(tile_at_224: int, size: int) -> int:
    """Tile side that covers the same fraction of an image of side `size` as `tile_at_224` px does at 224 px.

    Rule: max(1, round_half_up(tile_at_224 * size / 224)). IBA's 8 and 14 px tiles at 224 px become
    1 and 2 px at 32 px (CIFAR: 32 x 32 = 1024 and 16 x 16 = 256 tiles; the 2 px setting keeps IBA's 256
    tiles of the 14 px setting exactly).
    """
    return max(1, math.floor(tile_at_224 * size / 224 + 0.5))


def degradation_test(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None,
    *,
    tile: int,
    points: int | None = None,
    normalize: bool = True,
    batch_size: int = 64,
    eps: float = 1e-3,
    min_span: float = 0.05,
) -> DegradationCurves:
    """Replace tiles in saliency order and record the softmax probability of the target.

    Definition: the H x W image is split into tile x tile tiles on a grid anchored at the top-left corner
    (ceil(H/tile) x ceil(W/tile) = T tiles; edge tiles are smaller when `tile` does not divide the size).
    Tile relevance = mean saliency over the tile's pixels. MoRF replaces tiles in descending relevance,
    LeRF in ascending relevance (ties in both: lower tile index first, row-major). A replaced tile takes,
    in each channel, the image's own spatial mean of that channel (IBA's baseline; IBA takes the mean of the
    normalised tensor, which is the same image since normalisation is per-channel affine). With m tiles
    replaced the score is s(m) = softmax(model(x_m))[target].

    Points: `points=None` records every m = 0..T; otherwise m = round_half_up(linspace(0, T, points)), which
    always includes 0 and T (IBA records 100 evenly spaced fractions).

    Normalisation (`normalize=True`), per sample: s -> (s - s_end) / (s_0 - s_end) with s_0 = s(0), the clean
    image, and s_end = s(T), the fully degraded image (identical for MoRF and LeRF). Both curves then run
    from 1 to 0. If |s_0 - s_end| < eps the division is meaningless; such samples keep s - s_end and are
    flagged in `degenerate`. `morf_auc` / `lerf_auc` are the areas of the (normalised) curves.

    Score: `score` = AUC(LeRF) - AUC(MoRF) of the raw probability curves, the unnormalised area between
    them, always in [-1, 1]; this is the figure to average. `normalised_score` divides it by s_0 - s_end
    (IBA's normalisation) for images with |s_0 - s_end| >= `min_span` and is NaN for the others (report
    `excluded` beside its nanmean).

    `saliency` (B x H x W or B x 1 x H x W) of another size is bilinearly resized to H x W. `targets` None
    means the prediction on the clean images. Images are evaluated `batch_size` at a time under no_grad in
    eval mode. Use `scaled_tile` to translate IBA's 224 px tile sizes to other resolutions.
    """
    if tile < 1:
        raise ValueError("tile must be >= 1")
    if min_span < 0:
        raise ValueError("min_span must be >= 0")
    if points is not None and points < 2:
        raise ValueError("points must be >= 2 (the curve needs both ends)")
    device = model_device(model, images.device)
    images = images.to(device)
    b, _, h, w = images.shape
    maps = as_maps(saliency, (h, w), device).reshape(b, h * w)
    if targets is None:
        with torch.no_grad(), eval_mode(model):
            target_idx = model(images).argmax(dim=1)
    else:
        target_idx = as_targets(targets, b, device)

    tile_index, num_tiles = tile_of_pixel(h, w, tile, device)
    relevance = tile_relevance(maps, tile_index, num_tiles)
    tile_index = tile_index.expand(b, h * w)

    if points is None:
        counts = torch.arange(num_tiles + 1, device=device)
    else:
        counts = torch.floor(torch.linspace(0, num_tiles, points, device=device, dtype=torch.float64) + 0.5)
        counts = counts.long()
    canvas = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    curves = []
    for descending in (True, False):
        # A pixel switches to the baseline when its tile does: pixel rank = its tile's rank.
        pixel_rank = stable_rank(relevance, descending=descending).gather(1, tile_index)
        curves.append(mixed_scores(model, canvas, images, pixel_rank, counts, target_idx, batch_size))
    morf, lerf = curves

    fractions = counts.float() / num_tiles
    raw_score = torch.trapezoid(lerf, fractions, dim=1) - torch.trapezoid(morf, fractions, dim=1)
    start, end = morf[:, :1], morf[:, -1:]
    span = start - end
    kept = span.abs()[:, 0] >= min_span
    normalised_score = torch.where(kept, raw_score / torch.where(kept, span[:, 0], torch.ones_like(span[:, 0])),
                                   torch.full_like(raw_score, float("nan")))
    degenerate = span.abs()[:, 0] < eps
    if normalize:
        span = torch.where(span.abs() < eps, torch.ones_like(span), span)
        morf, lerf = (morf - end) / span, (lerf - end) / span
    morf_auc = torch.trapezoid(morf, fractions, dim=1)
    lerf_auc = torch.trapezoid(lerf, fractions, dim=1)
    return DegradationCurves(fractions, morf, lerf, morf_auc, lerf_auc, raw_score, degenerate, normalised_score)
