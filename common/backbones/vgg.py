"""VGG-16 with BatchNorm for 32x32 inputs, the variant of the pruning literature (network slimming,
DRIB's baseline): 13 convs, no final max-pool, 2x2 average pool, one 512 -> classes linear layer.
313.2 M MACs at 32x32."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, GateSite, conv_bn

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch, 3, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGG(Backbone):
    def __init__(self, config: tuple = VGG16_CONFIG, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(ConvBNReLU(in_ch, int(item)))
                in_ch = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.feature_out(self.features(self.normalize(x)))

    def conv_layers(self) -> list[ConvBNReLU]:
        return [m for m in self.features if isinstance(m, ConvBNReLU)]

    def gate_sites(self) -> list[GateSite]:
        layers = self.conv_layers()
        sites = []
        # The first conv reads the 3 image channels: it is the stem, not a gate site.
        for i, layer in enumerate(layers[1:], start=1):
            consumer = layers[i + 1].conv if i + 1 < len(layers) else self.classifier
            sites.append(GateSite(self.module_name(layer.conv), layer.conv, layer.bn, internal=True,
                                  consumer=consumer))
        return sites

    def feature_stages(self) -> list[nn.Module]:
        # The last conv block before each max-pool, and the final block.
        stages = []
        for i, module in enumerate(self.features):
            nxt = self.features[i + 1] if i + 1 < len(self.features) else None
            if isinstance(module, ConvBNReLU) and (nxt is None or isinstance(nxt, nn.MaxPool2d)):
                stages.append(module)
        return stages
