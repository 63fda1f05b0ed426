"""Helpers shared by the explanation metrics. Not public API: import from `common.explain`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter (or buffer); `fallback` for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return fallback


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Restoring per module (not `model.train(flag)`) keeps deliberately frozen submodules, e.g. a BN kept in
    eval while the rest trains, exactly as the caller left them.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def as_targets(targets: Tensor | int | Sequence[int], batch: int, device: torch.device) -> Tensor:
    """Class indices as a long tensor of shape [batch]; a single index is broadcast to the batch."""
    t = torch.as_tensor(targets, device=device).long().reshape(-1)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"expected {batch} targets, got {t.numel()}")
    return t


def as_maps(saliency: Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """Saliency as float B x H x W on `device`, bilinearly resized to `size` if its spatial size differs.

    Accepts B x H x W or B x 1 x H x W (a channel-summed map), so a low-resolution Grad-CAM can be scored
    against full-resolution images directly.
    """
    maps = saliency.detach().to(device=device, dtype=torch.float32)
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"saliency must be B x H x W or B x 1 x H x W, got {tuple(saliency.shape)}")
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"saliency must be B x H x W or B x 1 x H x W, got {tuple(saliency.shape)}")
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps


def stable_rank(scores: Tensor, descending: bool) -> Tensor:
    """Rank (0 = first) of every entry of each row of a B x N tensor; ties are broken by lower index first."""
    order = torch.sort(scores, dim=1, descending=descending, stable=True).indices
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def steps_to_count(fraction: float, total: int) -> int:
    """ceil(fraction * total), with a tolerance so that e.g. 0.1 * 30 = 3.0000000000000004 gives 3, not 4."""
    return max(1, math.ceil(fraction * total - 1e-9))


def target_probabilities(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """Softmax probability of `targets` under `model` (one forward pass, caller handles grad and mode)."""
    logits = model(images)
    return torch.softmax(logits.float(), dim=1).gather(1, targets[:, None])[:, 0]


def mixed_scores(
    model: nn.Module,
    front: Tensor,
    back: Tensor,
    rank: Tensor,
    counts: Tensor,
    targets: Tensor,
    batch_size: int,
) -> Tensor:
    """Target probability of every image `where(rank < count, front, back)` for every count: B x len(counts).

    `front` / `back` are B x C x H x W, `rank` is B x (H*W) (the order in which pixels switch from `back` to
    `front`). All B * len(counts) images are built lazily and evaluated `batch_size` at a time under
    no_grad and eval mode, so memory stays at one chunk whatever the number of steps.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    b, _, h, w = front.shape
    n_steps = counts.numel()
    scores = torch.empty(b * n_steps, device=front.device)
    with torch.no_grad(), eval_mode(model):
        for start in range(0, b * n_steps, batch_size):
            pair = torch.arange(start, min(start + batch_size, b * n_steps), device=front.device)
            sample, step = pair // n_steps, pair % n_steps
            mask = (rank[sample] < counts[step][:, None]).view(-1, 1, h, w)
            images = torch.where(mask, front[sample], back[sample])
            scores[start : start + pair.numel()] = target_probabilities(model, images, targets[sample])
    return scores.view(b, n_steps)


def tile_of_pixel(h: int, w: int, tile: int, device: torch.device) -> tuple[Tensor, int]:
    """Index (row-major) of the tile x tile tile each pixel of an H x W grid falls in, flat [H*W], and the
    number of tiles; the grid is anchored at the top-left corner, edge tiles are smaller when `tile` does
    not divide the size."""
    if tile < 1:
        raise ValueError("tile must be >= 1")
    cols = math.ceil(w / tile)
    ys = torch.arange(h, device=device)[:, None] // tile
    xs = torch.arange(w, device=device)[None, :] // tile
    return (ys * cols + xs).reshape(h * w), math.ceil(h / tile) * cols


def tile_relevance(maps: Tensor, tile_index: Tensor, num_tiles: int) -> Tensor:
    """B x T mean saliency of every tile, from B x (H*W) maps and the pixel -> tile index of `tile_of_pixel`."""
    index = tile_index.expand_as(maps)
    sums = torch.zeros(maps.shape[0], num_tiles, device=maps.device).scatter_add_(1, index, maps)
    sizes = torch.zeros(maps.shape[0], num_tiles, device=maps.device).scatter_add_(1, index, torch.ones_like(maps))
    return sums / sizes
