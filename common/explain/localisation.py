"""Localisation scores of a saliency map against ground-truth boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from ._utils import as_maps, stable_rank


def _mask(boxes_mask: Tensor) -> Tensor:
    """B x H x W bool from B x H x W or B x 1 x H x W."""
    mask = boxes_mask.bool()
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"boxes_mask must be B x H x W or B x 1 x H x W, got {tuple(boxes_mask.shape)}")
    return mask


def bbox_score(saliency: Tensor, boxes_mask: Tensor) -> Tensor:
    """IBA's bounding-box score: the fraction of the n most salient pixels that lie inside the boxes.

    Per sample, n = number of True pixels of `boxes_mask` (the union of the object boxes). The n pixels
    with the highest saliency (ties: lower row-major index first) are selected and the score is
    |selected AND mask| / n, in [0, 1]. A sample with an empty mask gets NaN (the score is undefined).
    `saliency` of another spatial size is bilinearly resized to the mask's size. Returns float [B] on the
    mask's device.
    """
    mask = _mask(boxes_mask)
    b, h, w = mask.shape
    flat_mask = mask.reshape(b, h * w)
    maps = as_maps(saliency, (h, w), mask.device).reshape(b, h * w)
    n = flat_mask.sum(dim=1)
    selected = stable_rank(maps, descending=True) < n[:, None]
    hits = (selected & flat_mask).sum(dim=1).float()
    return torch.where(n > 0, hits / n.clamp_min(1), torch.nan)


def pointing_game(saliency: Tensor, boxes_mask: Tensor) -> Tensor:
    """Pointing game (Zhang et al., ECCV 2016) without tolerance: is the saliency maximum inside the boxes?

    Per sample: True iff the pixel with the largest saliency (first in row-major order among ties) is True
    in `boxes_mask`. Saliency of another size is bilinearly resized to the mask's size first. Returns
    bool [B]; an empty mask always gives False.
    """
    mask = _mask(boxes_mask)
    b, h, w = mask.shape
    maps = as_maps(saliency, (h, w), mask.device).reshape(b, h * w)
    peak = maps.argmax(dim=1)
    return mask.reshape(b, h * w).gather(1, peak[:, None])[:, 0]
