"""CIFAR ResNets of He et al. (2016), option A: the architecture of the pretrained files in
shared/data/weights (akamaster/pytorch_resnet_cifar10). Depth 6n + 2, stages of 16/32/64 channels,
a parameter-free shortcut that subsamples by 2 and zero-pads the new channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, BasicBlock, GateSite, conv_bn


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::2, ::2] padded with zero channels on both sides (no parameters, no MACs)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))


class CifarResNet(Backbone):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv_bn(3, 16, 3, 1)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, ZeroPadShortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # Named `linear` to match the pretrained state dicts.
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        return self.linear

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.feature_out(out)

    def blocks(self) -> list[BasicBlock]:
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def gate_sites(self) -> list[GateSite]:
        sites = []
        for block in self.blocks():
            prefix = self.module_name(block)
            sites.append(GateSite(f"{prefix}.conv1", block.conv1, block.bn1, internal=True, consumer=block.conv2))
            sites.append(GateSite(f"{prefix}.conv2", block.conv2, block.bn2, internal=False))
        return sites

    def feature_stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]
