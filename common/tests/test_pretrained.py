"""The shipped CIFAR-10 ResNets must reproduce their published test accuracy exactly."""

import os
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.training import evaluate_top1

WEIGHTS = {"resnet20": ("resnet20-12fca82f.th", 91.73), "resnet56": ("resnet56-4bfd9763.th", 93.39)}


def _data_root() -> Path | None:
    root = os.environ.get("DATA_ROOT")
    return Path(root) if root and (Path(root) / "cifar10" / "test").is_dir() else None


@pytest.mark.data
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_pretrained_weights_reproduce_published_accuracy(name):
    root = _data_root()
    if root is None:
        pytest.skip("DATA_ROOT with cifar10/ is not available")
    file, published = WEIGHTS[name]
    model = build_backbone(name, 10, root / "weights" / file)
    data = load_dataset("cifar10", root, val_fraction=0.1)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    assert round(evaluate_top1(model, BatchLoader(data.test, 500, train=False)), 2) == published
