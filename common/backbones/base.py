"""The uniform interface every backbone offers, so methods never need per-backbone code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# The pretrained CIFAR ResNets in shared/data/weights were trained with these statistics; we use them
# for every backbone so that one normalisation convention holds across the project.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, with the statistics stored as buffers that travel with the weights."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@dataclass(eq=False)
class GateSite:
    """One convolution whose output channels a method may gate or prune.

    name: qualified module name of ``conv`` inside the backbone.
    conv, bn: the convolution and the BatchNorm that follows it. A channel mask is applied to ``bn``'s
        output, so a masked channel is exactly zero downstream (masking the conv output would not be:
        BN adds its shift).
    internal: True when the output channels stay inside one block (a ResNet block's first conv, a VGG
        conv, a MobileNetV2 expansion). Only these can be removed without touching a residual stream.
    consumer: the convolution (or linear layer) that reads these channels, or None when a residual add
        intervenes. Needed to skip the matching input channels of the next layer.
    followers: BatchNorms after depthwise convolutions that carry the same channels and must see the same
        mask (MobileNetV2: the depthwise conv between expansion and projection).
    """

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    internal: bool
    consumer: nn.Module | None = None
    followers: tuple[nn.BatchNorm2d, ...] = field(default_factory=tuple)

    @property
    def channels(self) -> int:
        return self.conv.out_channels


class Backbone(nn.Module):
    """Base class: pixels in [0, 1] in, logits out.

    Subclasses build ``self.normalize`` first, implement ``forward_features`` (ending in
    ``self.feature_out``, an identity whose output is the last feature map: Grad-CAM's default layer)
    and ``forward_head`` (pooling and classifier), and list their gate sites and feature stages.
    """

    classifier: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.feature_out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(pooled)

    def gate_sites(self) -> list[GateSite]:
        raise NotImplementedError

    def feature_stages(self) -> list[nn.Module]:
        """Modules whose outputs are the encoder scales of a U-Net, shallow to deep."""
        raise NotImplementedError

    def cam_layer(self) -> nn.Module:
        """The module whose output is the last feature map (after its activation)."""
        return self.feature_out

    def last_conv(self) -> nn.Conv2d:
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1]

    @property
    def feature_channels(self) -> int:
        return self.classifier.in_features

    def module_name(self, module: nn.Module) -> str:
        for name, candidate in self.named_modules():
            if candidate is module:
                return name
        raise KeyError("module is not part of this backbone")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU. ``shortcut(in_planes, planes, stride)`` builds
    the shortcut used when the block changes resolution or width (option A or B); otherwise identity."""

    def __init__(self, in_planes: int, planes: int, stride: int,
                 shortcut: Callable[[int, int, int], nn.Module]):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_planes, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
    return conv, nn.BatchNorm2d(out_ch)
