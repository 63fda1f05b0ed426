"""Shared tiny fixtures: tests run on one thread with progress bars off."""

import os

import torch
from torch import Tensor, nn

from common.backbones import Backbone

os.environ.setdefault("ICNN_PROGRESS", "0")
torch.set_num_threads(1)


class TinyBackbone(Backbone):
    """Two 3x3 convs: the smallest network with the Backbone interface (for fast training tests)."""

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1)
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = torch.relu(self.conv1(self.normalize(x)))
        return self.feature_out(torch.relu(self.conv2(out)))
