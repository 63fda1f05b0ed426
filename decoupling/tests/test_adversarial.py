"""The path-based adversarial detector and the attacks."""

import numpy as np
import pytest
import torch

from common.backbones import build_backbone
from decoupling.adversarial import CLASSIFIERS, detection_auc, fgsm, pgd


def _codes(rng, n, on_bits, dims=40, noise=0.1):
    base = np.zeros(dims)
    base[on_bits] = 1
    flips = rng.random((n, dims)) < noise
    return np.where(flips, 1 - base, base)


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_detector_separates_a_planted_easy_case(classifier):
    rng = np.random.default_rng(0)
    clean = lambda n: _codes(rng, n, slice(0, 10), noise=0.03)  # noqa: E731
    adversarial = lambda n: _codes(rng, n, slice(10, 20), noise=0.03)  # noqa: E731
    assert detection_auc(clean(10), adversarial(10), clean(50), adversarial(50), classifier) > 0.95


def test_detector_is_at_chance_when_paths_do_not_differ():
    rng = np.random.default_rng(1)
    aucs = [detection_auc(*(_codes(rng, n, slice(0, 10), noise=0.3) for n in (20, 20, 50, 50)), "random_forest",
                          seed=s) for s in range(3)]
    assert 0.3 < np.mean(aucs) < 0.7


def test_attacks_stay_in_the_ball_and_raise_the_loss():
    torch.manual_seed(0)
    model = build_backbone("resnet20", 10).eval()
    x = torch.rand(4, 3, 16, 16)
    y = model(x).argmax(1)
    eps = 4 / 255
    loss = torch.nn.functional.cross_entropy
    for adv in (fgsm(model, x, y, eps), pgd(model, x, y, eps, step=1 / 255, steps=5)):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            assert loss(model(adv), y) > loss(model(x), y)
