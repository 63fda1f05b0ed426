"""The baseline's CE fine-tuning resumes exactly where a kill left it, and selects on validation only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import benchmark.baseline as baseline
from common.backbones import build_backbone
from common.data import load_dataset
from common.method import Budget


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    # Small splits keep this test to a few seconds; the test set is emptied to prove it is never read.
    return type(data)(data.name, data.train.subset(range(96)), data.val.subset(range(64)),
                      data.test.subset([]), data.classes)


def _train(digits, work: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_backbone("resnet20", digits.num_classes)
    recipe = baseline.CrossEntropyRecipe(lr=0.05, batch_size=32)
    baseline.train_cross_entropy(model, digits, Budget(epochs=2, max_batches=3), work,
                                 device=torch.device("cpu"), seed=3, recipe=recipe)
    return model.state_dict()


def test_killed_training_resumes_to_the_same_weights(digits, tmp_path: Path, monkeypatch) -> None:
    uninterrupted = _train(digits, tmp_path / "a")
    monkeypatch.setattr(baseline, "CHECKPOINT_EVERY", 1)
    monkeypatch.setattr(baseline, "FINITE_CHECK_EVERY", 1)
    real_check = baseline.check_finite

    def killing_check(loss: torch.Tensor, where: str = "") -> torch.Tensor:
        if where.endswith("step 4"):
            raise KeyboardInterrupt
        return real_check(loss, where)

    monkeypatch.setattr(baseline, "check_finite", killing_check)
    with pytest.raises(KeyboardInterrupt):
        _train(digits, tmp_path / "b")
    monkeypatch.setattr(baseline, "check_finite", real_check)
    resumed = _train(digits, tmp_path / "b")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_nan_loss_raises_the_common_error(digits, tmp_path: Path, monkeypatch) -> None:
    from common.run import NonFiniteLossError

    monkeypatch.setattr(baseline, "FINITE_CHECK_EVERY", 1)
    model = build_backbone("resnet20", digits.num_classes)
    recipe = baseline.CrossEntropyRecipe(lr=1e30, batch_size=32)
    with pytest.raises(NonFiniteLossError):
        baseline.train_cross_entropy(model, digits, Budget(epochs=1, max_batches=3), tmp_path,
                                     device=torch.device("cpu"), seed=0, recipe=recipe)
