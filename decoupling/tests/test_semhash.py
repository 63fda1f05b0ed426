"""Improved SemHash, Eq. 3-5: exact forward/gradient with given noise, and statistics of the sampler."""

import math

import numpy as np
import pytest
import torch

from decoupling.semhash import improved_semhash, random_half_rows, saturating_sigmoid


def test_saturating_sigmoid_matches_eq4():
    x = torch.tensor([-10.0, -2.5, -1.0, 0.0, 1.0, 2.5, 10.0])
    expected = torch.clamp(1.2 / (1 + torch.exp(-x)) - 0.1, 0, 1)
    assert torch.allclose(saturating_sigmoid(x), expected)
    assert saturating_sigmoid(torch.tensor(0.0)) == pytest.approx(0.5)
    assert saturating_sigmoid(torch.tensor(-3.0)) == 0.0 and saturating_sigmoid(torch.tensor(3.0)) == 1.0


def test_inference_is_the_sign_of_the_controller_output():
    logits = torch.tensor([[-0.3, 0.0, 0.2, 5.0], [1e-4, -1e-4, -7.0, 0.5]])
    z = improved_semhash(logits, training=False)
    assert torch.equal(z, torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(z, improved_semhash(logits, training=False))  # no noise at inference


def test_training_forward_and_gradient_follow_eq3():
    logits = torch.tensor([[0.3, -0.2, 1.0], [0.5, -1.5, 0.1], [-0.4, 0.8, 2.0], [0.0, 0.2, -0.6]],
                          requires_grad=True)
    noise = torch.tensor([[0.1, 0.5, -2.0], [-0.9, 0.2, 0.3], [0.1, -1.0, 0.2], [0.4, -0.1, 0.3]])
    hard = torch.tensor([True, False, True, False])
    z = improved_semhash(logits, True, noise=noise, hard_rows=hard)
    s = (logits + noise).detach()
    v1 = torch.clamp(1.2 * torch.sigmoid(s) - 0.1, 0, 1)
    v2 = (s > 0).float()
    assert torch.allclose(z[hard], v2[hard]) and torch.allclose(z[~hard], v1[~hard])
    # Backward: dz/dlogits is the derivative of v1 for every sample, binary or not.
    weights = torch.randn_like(z)
    (z * weights).sum().backward()
    sig = torch.sigmoid(s)
    inside = ((1.2 * sig - 0.1) > 0) & ((1.2 * sig - 0.1) < 1)
    expected = weights * 1.2 * sig * (1 - sig) * inside
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_half_of_the_samples_are_binary():
    torch.manual_seed(0)
    for batch in (1, 2, 7, 64):
        rows = random_half_rows(batch)
        assert rows.sum().item() in (batch // 2, (batch + 1) // 2)
    # Each sample is binary with probability 1/2: binomial check over many draws.
    draws = torch.stack([random_half_rows(9) for _ in range(4000)]).float()
    rate = draws.mean(0)
    assert torch.all((rate - 0.5).abs() < 4 * math.sqrt(0.25 / 4000))


def test_sampled_noise_is_standard_normal():
    """With a fixed controller output y, the binary half fires with probability Phi(y) and the real half
    averages E[sigma'(y + N(0,1))] (Eq. 3-4): a statistical test of the reparameterisation."""
    torch.manual_seed(1)
    y = 0.3
    logits = torch.full((20000, 8), y)
    hard = torch.zeros(20000, dtype=torch.bool)
    hard[:10000] = True
    z = improved_semhash(logits, True, hard_rows=hard)
    binary, real = z[hard].flatten(), z[~hard].flatten()
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    phi = 0.5 * (1 + math.erf(y / math.sqrt(2)))
    assert abs(binary.mean().item() - phi) < 4 * math.sqrt(phi * (1 - phi) / binary.numel())
    grid = np.linspace(-8, 8, 20001)
    density = np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi)
    soft = np.clip(1.2 / (1 + np.exp(-(y + grid))) - 0.1, 0, 1)
    step = grid[1] - grid[0]  # fine uniform grid: a Riemann sum is exact to ~1e-8 here
    mean = float((soft * density).sum() * step)
    second = float((soft**2 * density).sum() * step)
    se = math.sqrt((second - mean**2) / real.numel())
    assert abs(real.mean().item() - mean) < 4 * se
    assert abs(real.var().item() - (second - mean**2)) < 0.05 * (second - mean**2)
