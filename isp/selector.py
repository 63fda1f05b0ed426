"""The selector f_sel(x; beta) (paper Sec. 3.4-3.5, Fig. 2; supplementary Sec. 2.1 and 3).

A U-Net whose encoder is the classifier's own backbone (frozen; its scales come from
``Backbone.feature_stages()``) and whose decoder is trained: a feature filter with a class embedding on the
deepest scale (supplementary Eq. 13), upsampling blocks (conv + pixel shuffle, concatenation with the
pass-through scale, three bottleneck blocks), then a head. The RBF head predicts (c_z, c_t, sigma) with a conv
whose kernel covers the whole map; the REAL-X head predicts one independent Bernoulli logit per pixel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.backbones import Backbone

from .rbf import centre_nonlinearity, rbf_bernoulli, sigma_nonlinearity

SELECTOR_KINDS = ("rbf", "realx")


def forward_with_stages(backbone: Backbone, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits of ``backbone`` and the outputs of its U-Net encoder scales (shallow to deep), in one pass."""
    captured: list[Tensor] = []
    handles = [stage.register_forward_hook(lambda _m, _i, out: captured.append(out))
               for stage in backbone.feature_stages()]
    try:
        logits = backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


class FeatureFilter(nn.Module):
    """Supplementary Eq. 13: Z_ij = X_ij sigmoid(X_ij^T C_y), C a learned class embedding (classes x channels)."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, channels)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        class_vector = self.embedding(target)[:, :, None, None]
        return features * torch.sigmoid((features * class_vector).sum(1, keepdim=True))


class Bottleneck(nn.Module):
    """He et al. bottleneck (1x1 reduce, 3x3, 1x1 expand) with a projection shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        mid = max(1, out_channels // reduction)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class UpsampleBlock(nn.Module):
    """(input channels, pass-through channels, output channels): x2 upsampling by conv + pixel shuffle,
    concatenation with the encoder's pass-through scale, then three bottleneck blocks."""

    def __init__(self, in_channels: int, pass_channels: int, out_channels: int, bottlenecks: int = 3):
        super().__init__()
        self.upsample = nn.Sequential(nn.Conv2d(in_channels, out_channels * 4, 3, padding=1), nn.PixelShuffle(2))
        widths = [out_channels + pass_channels] + [out_channels] * bottlenecks
        self.bottlenecks = nn.Sequential(*(Bottleneck(a, b) for a, b in itertools.pairwise(widths)))

    def forward(self, x: Tensor, passthrough: Tensor) -> Tensor:
        up = self.upsample(x)
        if up.shape[-2:] != passthrough.shape[-2:]:
            raise ValueError(f"upsampled map {tuple(up.shape[-2:])} does not match the pass-through scale "
                             f"{tuple(passthrough.shape[-2:])}; the encoder scales must halve in size")
        return self.bottlenecks(torch.cat([up, passthrough], 1))


class RBFHead(nn.Module):
    """Conv with a kernel as large as its input map -> (u_z, u_t, u_sigma), then tanh / softplus
    (supplementary Sec. 3). The sigma bias starts near a third of the image size for stable early training.

    Size-agnostic (a deviation, README): a map of another size than the one the head was built for (a 64 x 64
    mosaic of 32 x 32 images) is average-pooled to the kernel's size, the parameters are computed in the
    built-for frame and scaled to the input's (centres per axis, sigma by the geometric mean of the two
    ratios). At the built-for size nothing changes.
    """

    def __init__(self, channels: int, map_size: tuple[int, int], image_size: tuple[int, int],
                 centre_margin: float = 2.0, sigma_bias: float | None = None):
        super().__init__()
        self.image_size = image_size
        self.centre_margin = centre_margin
        self.conv = nn.Conv2d(channels, 3, kernel_size=map_size)
        if sigma_bias is None:  # paper: 10 for 32 px, 80 for 224 px
            sigma_bias = 10.0 * max(image_size) / 32
        with torch.no_grad():
            self.conv.bias[2] = sigma_bias

    def forward(self, x: Tensor) -> Tensor:
        kernel = tuple(self.conv.kernel_size)
        size = tuple(x.shape[-2:])
        if size != kernel:
            x = nn.functional.adaptive_avg_pool2d(x, kernel)
        u = self.conv(x).flatten(1).float()  # centres and sigma in fp32 under a bf16 policy
        height, width = self.image_size
        c_z = centre_nonlinearity(u[:, 0], height, self.centre_margin)
        c_t = centre_nonlinearity(u[:, 1], width, self.centre_margin)
        sigma = sigma_nonlinearity(u[:, 2])
        if size != kernel:
            rz, rt = size[0] / kernel[0], size[1] / kernel[1]
            c_z, c_t, sigma = c_z * rz, c_t * rt, sigma * (rz * rt) ** 0.5
        return torch.stack([c_z, c_t, sigma], 1)


class RealXHead(nn.Module):
    """REAL-X (supplementary Eq. 2, 8-10): an independent Bernoulli logit per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)[:, 0]


@dataclass
class DecoderShape:
    """Channels and sizes the decoder is built for (read from one encoder pass)."""

    stage_channels: list[int]
    stage_sizes: list[tuple[int, int]]
    image_size: tuple[int, int]
    num_classes: int


class SelectorDecoder(nn.Module):
    """Trainable part of the selector. ``code`` is what the pruning loss compares (Eq. 10, C_x):
    (c_z, c_t, sigma) for the RBF selector, the per-pixel logits for REAL-X."""

    def __init__(self, shape: DecoderShape, kind: str = "rbf", centre_margin: float = 2.0,
                 sigma_bias: float | None = None):
        super().__init__()
        if kind not in SELECTOR_KINDS:
            raise ValueError(f"unknown selector kind {kind!r}; choose one of {SELECTOR_KINDS}")
        if len(shape.stage_channels) < 2:
            raise ValueError("the selector needs at least two encoder scales")
        self.kind = kind
        self.shape = shape
        channels = shape.stage_channels
        self.feature_filter = FeatureFilter(shape.num_classes, channels[-1])
        # Deep to shallow: block k upsamples to scale k and keeps its width (paper: (64,32,32), (32,16,16)).
        self.up_blocks = nn.ModuleList(
            UpsampleBlock(channels[k + 1], channels[k], channels[k]) for k in reversed(range(len(channels) - 1))
        )
        last = channels[0]
        if kind == "rbf":
            self.head: nn.Module = RBFHead(last, shape.stage_sizes[0], shape.image_size, centre_margin, sigma_bias)
        else:
            self.head = RealXHead(last)

    def code(self, stages: list[Tensor], target: Tensor) -> Tensor:
        x = self.feature_filter(stages[-1], target)
        for block, passthrough in zip(self.up_blocks, reversed(stages[:-1])):
            x = block(x, passthrough)
        return self.head(x)

    def probabilities(self, code: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Per-pixel Bernoulli parameters of the explanatory mask, B x H x W (Eq. 5 or supplementary Eq. 2);
        ``size``: the images' H x W when they differ from the size the decoder was built for."""
        code = code.float()  # the map is always fp32 (common.precision)
        size = tuple(self.shape.image_size) if size is None else tuple(size)
        if self.kind == "rbf":
            return rbf_bernoulli(code, *size)
        probs = torch.sigmoid(code)
        if tuple(probs.shape[-2:]) != size:  # encoder's first scale is smaller than the image
            probs = nn.functional.interpolate(probs[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return probs


def decoder_shape(backbone: Backbone, image_size: tuple[int, int], num_classes: int) -> DecoderShape:
    """Probe ``backbone`` once to read the channels and sizes of its encoder scales."""
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            _, stages = forward_with_stages(backbone, torch.zeros(1, 3, *image_size, device=param.device))
    finally:
        backbone.train(was_training)
    return DecoderShape([s.shape[1] for s in stages], [tuple(s.shape[-2:]) for s in stages], tuple(image_size),
                        num_classes)


class Selector(nn.Module):
    """Encoder (a classifier backbone, frozen, not owned: it is not saved with the selector) + decoder."""

    def __init__(self, encoder: Backbone, decoder: SelectorDecoder):
        super().__init__()
        self.decoder = decoder
        object.__setattr__(self, "encoder", encoder)  # keep it out of state_dict and parameters()

    def forward(self, images: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(classifier logits, explanation code). ``target`` defaults to the classifier's predicted class."""
        logits, stages = forward_with_stages(self.encoder, images)
        if target is None:
            target = logits.argmax(1)
        return logits, self.decoder.code(stages, target)

    @torch.no_grad()
    def saliency(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        """The native explanation: Bernoulli map B x H x W (Eq. 5), higher = more relevant."""
        was_training = self.encoder.training, self.decoder.training
        self.encoder.eval()
        self.decoder.eval()
        try:
            _, code = self(images, targets)
            return self.decoder.probabilities(code, tuple(images.shape[-2:]))
        finally:
            self.encoder.train(was_training[0])
            self.decoder.train(was_training[1])
