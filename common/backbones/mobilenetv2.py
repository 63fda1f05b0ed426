"""MobileNetV2 for 32x32 inputs in the variant ISP uses (last feature map 8x8).

Definition (state it next to every MAC figure): stride-1 3x3 stem with 32 channels; inverted residual
stages (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,1) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1);
every block has its 1x1 expansion conv (also when t = 1) and a 1x1-conv + BN shortcut when a stride-1
block changes width; 1x1 conv to 1280 channels; 8x8 average pool; linear 1280 -> classes. Scales
(32, 32x32), (96, 16x16), (1280, 8x8) as in the ISP supplementary. 304.1 M MACs at 32x32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, GateSite, conv_bn

ISP_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 1), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        hidden = expansion * in_planes
        self.conv1, self.bn1 = conv_bn(in_planes, hidden, 1)
        self.conv2, self.bn2 = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.conv3, self.bn3 = conv_bn(hidden, out_planes, 1)
        self.shortcut: nn.Module | None = None
        if stride == 1:
            self.shortcut = nn.Identity() if in_planes == out_planes else nn.Sequential(
                *conv_bn(in_planes, out_planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.shortcut is not None else out


class MobileNetV2(Backbone):
    def __init__(self, num_classes: int = 10, stages: tuple = ISP_STAGES):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, 32, 3, 1)
        blocks, in_planes, self._stage_ends = [], 32, []
        for expansion, out_planes, n, stride in stages:
            for i in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1))
                in_planes = out_planes
            self._stage_ends.append(len(blocks) - 1)
        self.layers = nn.Sequential(*blocks)
        self.conv2, self.bn2 = conv_bn(in_planes, 1280, 1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        return self.feature_out(F.relu(self.bn2(self.conv2(out))))

    def gate_sites(self) -> list[GateSite]:
        sites = []
        for block in self.layers:
            prefix = self.module_name(block)
            # The hidden (expanded) channels pass through the depthwise conv, whose BN must see the same mask.
            sites.append(GateSite(f"{prefix}.conv1", block.conv1, block.bn1, internal=True, consumer=block.conv3,
                                  followers=(block.bn2,)))
        return sites

    def feature_stages(self) -> list[nn.Module]:
        # Outputs at 32 channels (32x32), 96 channels (16x16) and the 1280-channel head (8x8).
        return [self.layers[self._stage_ends[2]], self.layers[self._stage_ends[4]], self.feature_out]
