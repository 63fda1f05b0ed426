"""bf16 keeps the accuracy of the published ResNet-20 (real data; skipped without it)."""

import os
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.deploy import deploy
from common.precision import cpu_has_native_bf16, resolve_precision
from common.speed import class_mixed_images
from common.training import evaluate_top1

WEIGHTS = "resnet20-12fca82f.th"


def _data_root() -> Path | None:
    root = os.environ.get("DATA_ROOT")
    ok = root and (Path(root) / "cifar10" / "test").is_dir() and (Path(root) / "weights" / WEIGHTS).is_file()
    return Path(root) if ok else None


@pytest.mark.data
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_pretrained_resnet20_keeps_its_accuracy_under_bf16():
    root = _data_root()
    if root is None:
        pytest.skip("DATA_ROOT with cifar10/ and weights/ is not available")
    model = build_backbone("resnet20", 10, root / "weights" / WEIGHTS).eval()
    data = load_dataset("cifar10", root, val_source="test-half")
    loader = BatchLoader(data.test, 500, train=False)  # the held-out test half (5,000 images)
    fp32 = evaluate_top1(model, loader)
    bf16 = evaluate_top1(model, loader, precision=resolve_precision("bf16", "cpu"))
    deployed = deploy(model, bf16=True, example=class_mixed_images(data.val, 32, seed=0))
    bf16_deployed = evaluate_top1(deployed, loader)
    assert fp32 > 90.0, fp32
    assert abs(bf16 - fp32) <= 0.2, (fp32, bf16)
    assert abs(bf16_deployed - fp32) <= 0.2, (fp32, bf16_deployed)
    with torch.no_grad():
        assert deployed.deploy_info.top1_agreement >= 0.9
