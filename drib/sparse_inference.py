"""Inference that really skips the unselected channels (theta'_l of Eq. 4).

Inside `channel_skipping(net)`, each gated conv + BN pair is swapped for a module that runs the decision,
groups the batch by chosen action pattern and computes, per group, only the selected output channels
from the active input channels (gathered weights, `common.sparse.conv_bn_subset`); the convs that consume
gated channels read only the active ones. Outputs equal the masked dense computation (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.sparse import conv_bn_subset, group_rows, scatter_channels

from .decision import DecisionGate
from .network import DynamicNetwork


class _InputSource:
    """Where a conv learns which of its input channels are active: the gate that produced them."""

    def __init__(self, gate: DecisionGate | None = None):
        self.gate = gate

    def active(self, batch: int, channels: int, device: torch.device) -> Tensor:
        if self.gate is None or self.gate.mask is None:
            return torch.ones(batch, channels, dtype=torch.bool, device=device)
        return self.gate.mask != 0


def _grouped(in_active: Tensor, out_active: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Samples sharing (input pattern, output pattern): (sample index, input channels, output channels)."""
    c_in = in_active.shape[1]
    groups = []
    for rows, channels in group_rows(torch.cat([in_active, out_active], dim=1)):
        groups.append((rows, channels[channels < c_in], channels[channels >= c_in] - c_in))
    return groups


def _subset_conv(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, in_active: Tensor,
                 out_active: Tensor, scale: Tensor | None) -> Tensor:
    """bn(conv(x)) * scale, computing per group only the active outputs from the active inputs."""
    out: Tensor | None = None
    for rows, in_index, out_index in _grouped(in_active, out_active):
        xs = x[rows]
        if conv.groups != 1:  # depthwise: a channel is computed iff it is active on both sides
            out_index = out_index[torch.isin(out_index, in_index)]
            in_index = None
        elif in_index.numel() == 0:  # nothing to read: the output is BN's shift alone
            xs, in_index = torch.zeros_like(xs[:, :1]), torch.zeros(1, dtype=torch.long, device=x.device)
        if out_index.numel() == 0:
            compact = None
        else:
            compact = conv_bn_subset(xs, conv, bn, out_index, in_index)
            if scale is not None:
                compact = compact * scale[rows][:, out_index, None, None]
        if out is None:
            h, w = _output_size(x, conv)
            out = x.new_zeros(x.shape[0], conv.out_channels, h, w)
        if compact is not None:
            out[rows] = scatter_channels(compact, out_index, conv.out_channels)
    assert out is not None
    return out


def _output_size(x: Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    sizes = []
    for i, dim in enumerate(x.shape[-2:]):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]  # type: ignore[index]
        sizes.append((dim + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


class _SkippingConv(nn.Module):
    """Replaces a conv (and absorbs its BN when ``bn`` is given, the BN then becomes an identity)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, gate: DecisionGate | None,
                 source: _InputSource, follow: DecisionGate | None = None):
        super().__init__()
        self.conv, self.bn, self.gate, self.source, self.follow = conv, bn, gate, source, follow

    def forward(self, x: Tensor) -> Tensor:
        b, device = x.shape[0], x.device
        in_active = self.source.active(b, self.conv.in_channels, device)
        if self.gate is not None:  # a gated conv: decide on x_{l-1}, compute theta'_l only
            mask = self.gate.decide(x)
            return _subset_conv(x, self.conv, self.bn, in_active, mask != 0, mask)
        if self.follow is not None:  # depthwise conv carrying a gate's channels
            mask = self.follow.mask
            assert mask is not None
            return _subset_conv(x, self.conv, self.bn, mask != 0, mask != 0, mask)
        out_active = torch.ones(b, self.conv.out_channels, dtype=torch.bool, device=device)
        return _subset_conv(x, self.conv, None, in_active, out_active, None)


class _SkippingLinear(nn.Module):
    def __init__(self, linear: nn.Linear, source: _InputSource):
        super().__init__()
        self.linear, self.source = linear, source

    def forward(self, x: Tensor) -> Tensor:
        in_active = self.source.active(x.shape[0], self.linear.in_features, x.device)
        out = x.new_empty(x.shape[0], self.linear.out_features)
        for rows, index in group_rows(in_active):
            out[rows] = F.linear(x[rows][:, index], self.linear.weight[:, index], self.linear.bias)
        return out


def _swap(net: DynamicNetwork, old: nn.Module, new: nn.Module, undo: list) -> None:
    parent = net._parent_of(old)
    for name, child in parent.named_children():
        if child is old:
            setattr(parent, name, new)
            undo.append((parent, name, old))
            return
    raise KeyError("module not found in its parent")


@contextlib.contextmanager
def channel_skipping(net: DynamicNetwork) -> Iterator[DynamicNetwork]:
    """Run ``net`` with channel-skipping modules in place of the gated convs (eval mode only)."""
    if net.training:
        raise RuntimeError("channel-skipping inference needs eval mode (BN folded with running statistics)")
    undo: list = []
    consumers: dict[int, _InputSource] = {}
    gated_convs = {id(g.site.conv): g for g in net.gated}
    for g in net.gated:
        if g.site.consumer is not None:
            consumers[id(g.site.consumer)] = _InputSource(g.gate)
    try:
        for g in net.gated:
            source = consumers.get(id(g.site.conv), _InputSource())
            _swap(net, g.site.conv, _SkippingConv(g.site.conv, g.site.bn, g.gate, source), undo)
            _swap(net, g.site.bn, nn.Identity(), undo)
            for conv, bn in zip(g.follower_convs, g.site.followers):
                _swap(net, conv, _SkippingConv(conv, bn, None, _InputSource(), follow=g.gate), undo)
                _swap(net, bn, nn.Identity(), undo)
        for g in net.gated:
            consumer = g.site.consumer
            if consumer is None or id(consumer) in gated_convs:
                continue
            source = consumers[id(consumer)]
            if isinstance(consumer, nn.Conv2d):
                _swap(net, consumer, _SkippingConv(consumer, None, None, source), undo)
            elif isinstance(consumer, nn.Linear):
                _swap(net, consumer, _SkippingLinear(consumer, source), undo)
        yield net
    finally:
        for parent, name, old in reversed(undo):
            setattr(parent, name, old)


@torch.no_grad()
def sparse_forward(net: DynamicNetwork, images: Tensor) -> tuple[Tensor, Tensor]:
    """Logits computed with channel skipping, and the per-sample MACs of that computation."""
    was_training = net.training
    net.eval()
    try:
        with channel_skipping(net):
            logits = net(images)
        return logits, net.per_sample_macs(net.masks())
    finally:
        net.train(was_training)
