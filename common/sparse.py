"""Channel-skipping execution of a conv + BN pair: compute only the active channels.

A dynamic network that zeroes channels by masking still pays for them. These functions compute the
active output channels from the active input channels only (gathered weights), so the arithmetic done
equals the MACs that ``common.macs.dynamic_macs`` reports. Samples that share a mask are computed together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_rows(masks: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Group samples by identical channel masks. ``masks``: B x C (bool or 0/1). Returns a list of
    (sample indices, active channel indices), one entry per distinct mask."""
    binary = masks != 0
    unique, inverse = torch.unique(binary, dim=0, return_inverse=True)
    return [(torch.nonzero(inverse == g).flatten(), torch.nonzero(row).flatten()) for g, row in enumerate(unique)]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The inference-time BN as y = scale * x + shift (per channel)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def conv_bn_subset(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, out_index: Tensor,
                   in_index: Tensor | None = None) -> Tensor:
    """Output channels ``out_index`` of bn(conv(x)) in eval mode, reading only input channels ``in_index``.

    ``x`` has all of the conv's input channels (inactive ones may hold anything; they are not read).
    Returns a compact tensor B x len(out_index) x H' x W'. Only dense (groups == 1) convolutions take an
    ``in_index``; for a depthwise conv pass the same channels as ``out_index``.
    """
    weight = conv.weight[out_index]
    if conv.groups == 1:
        if in_index is not None:
            weight = weight[:, in_index]
            x = x[:, in_index]
        groups = 1
    elif conv.groups == conv.in_channels == conv.out_channels:
        x = x[:, out_index]
        groups = len(out_index)
    else:
        raise ValueError("conv_bn_subset supports dense and depthwise convolutions only")
    bias = conv.bias[out_index] if conv.bias is not None else None
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
    if bn is not None:
        scale, shift = bn_affine(bn)
        y = y * scale[out_index].view(1, -1, 1, 1) + shift[out_index].view(1, -1, 1, 1)
    return y


def scatter_channels(compact: Tensor, out_index: Tensor, channels: int) -> Tensor:
    """Place a compact B x k x H x W tensor into a zero tensor of ``channels`` channels at ``out_index``."""
    full = compact.new_zeros(compact.shape[0], channels, *compact.shape[2:])
    full[:, out_index] = compact
    return full
