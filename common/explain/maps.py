"""Post-processing of saliency maps."""

from __future__ import annotations

import torch
from torch import Tensor


def saliency_to_unit(maps: Tensor) -> Tensor:
    """Per-sample min-max rescaling to [0, 1].

    For sample b, `out[b] = (maps[b] - min(maps[b])) / (max(maps[b]) - min(maps[b]))`, min and max taken over
    every non-batch dimension. A constant map (max == min) becomes all zeros rather than NaN, since it
    carries no ranking information. Shape, device and floating dtype are preserved (integer maps become
    float32).
    """
    values = maps if maps.is_floating_point() else maps.float()
    flat = values.reshape(values.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return scaled.reshape(values.shape)
