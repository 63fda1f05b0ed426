"""The cost command's study: Decoupling steps and cross-entropy steps timed side by side (shape and
arithmetic of the report only, never wall-clock figures)."""

import math

import pytest
import torch

from common.data import load_dataset
from decoupling.config import DecouplingSettings
from decoupling.cost import training_cost


@pytest.mark.slow
def test_training_cost_reports_both_steps_and_the_projected_epoch():
    data = load_dataset("digits")
    settings = DecouplingSettings.from_dict({"batch_size": 32, "precision": "fp32", "target_mac_reduction": 0.5,
                                             "mac_calibration_images": 64, "bn_recalibration_batches": 1}
                                            ).resolved("resnet20")
    report = training_cost("resnet20", None, data, settings, torch.device("cpu"), steps=2, warmup=1)
    assert report["timed_steps"] == 2 and report["batch_size"] == 32
    assert report["steps_per_epoch"] == len(data.train) // 32
    dec, ce, post = report["decoupling_step_s"], report["cross_entropy_step_s"], report["post_training_s"]
    assert min(dec, ce, post) > 0
    assert math.isclose(report["step_ratio"], dec / ce)
    n = report["steps_per_epoch"]
    assert math.isclose(report["epoch_ratio"], (n * dec + post) / (n * ce))
