"""ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem, no max-pool, 1x1-conv projection shortcuts
(the usual CIFAR adaptation; 555.4 M MACs at 32x32)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, BasicBlock, GateSite, conv_bn


def projection_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option B: a strided 1x1 conv + BN when the block changes resolution or width."""
    return nn.Sequential(*conv_bn(in_planes, planes, 1, stride))


class ResNet18(Backbone):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 64, 3, 1)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, projection_shortcut),
                                        BasicBlock(planes, planes, 1, projection_shortcut)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(512, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.feature_out(out)

    def gate_sites(self) -> list[GateSite]:
        sites = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                prefix = self.module_name(block)
                sites.append(GateSite(f"{prefix}.conv1", block.conv1, block.bn1, internal=True,
                                      consumer=block.conv2))
                sites.append(GateSite(f"{prefix}.conv2", block.conv2, block.bn2, internal=False))
        return sites

    def feature_stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]
