"""RBF masks, output non-linearities and the Gumbel-sigmoid relaxation."""

import math

import pytest
import torch

from isp.losses import area_penalty, smoothness_penalty
from isp.rbf import (
    bernoulli_mask,
    centre_nonlinearity,
    gumbel_sigmoid,
    hard_mask_from_noise,
    logistic_noise,
    rbf_bernoulli,
    rbf_mass_outside_frame,
    sample_mask,
    sample_random_rbf_params,
    sigma_nonlinearity,
)


def test_rbf_bernoulli_equals_eq4_at_given_points():
    params = torch.tensor([[10.0, 20.0, 4.0], [3.5, 30.25, 11.0]])
    probs = rbf_bernoulli(params, 32, 32)
    assert probs.shape == (2, 32, 32)
    for b, (c_z, c_t, sigma) in enumerate(params.tolist()):
        for i, j in [(0, 0), (9, 19), (10, 20), (31, 5), (3, 30)]:
            z, t = i + 0.5, j + 0.5  # pixel centres
            expected = math.exp(-((z - c_z) ** 2 + (t - c_t) ** 2) / (2 * sigma**2))
            assert probs[b, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_rbf_peak_is_one_at_a_pixel_centre_and_decays_with_distance():
    probs = rbf_bernoulli(torch.tensor([[16.5, 8.5, 3.0]]), 32, 32)[0]
    assert probs[16, 8].item() == pytest.approx(1.0)
    assert probs[16, 8] > probs[16, 10] > probs[16, 14] > probs[16, 20]


def test_rbf_rejects_wrong_parameter_shape():
    with pytest.raises(ValueError, match="B x 3"):
        rbf_bernoulli(torch.zeros(4, 2), 32, 32)


def test_centre_nonlinearity_keeps_centres_inside_the_frame():
    u = torch.tensor([-1e6, -100.0, -14.0, 0.0, 14.0, 100.0, 1e6])
    c = centre_nonlinearity(u, 32)
    assert torch.all(c >= 2.0) and torch.all(c <= 30.0)
    assert c[3].item() == pytest.approx(16.0)  # u = 0 is the image centre
    assert c[4].item() == pytest.approx(14 * math.tanh(1.0) + 16)  # 14 tanh(u / 14) + 16
    imagenet = centre_nonlinearity(u, 224, margin=4.0)
    assert torch.all(imagenet >= 4.0) and torch.all(imagenet <= 220.0)
    assert imagenet[4].item() == pytest.approx(108 * math.tanh(14 / 108) + 112)


def test_centre_nonlinearity_is_in_its_active_range_inside_the_frame():
    u = torch.linspace(-14, 14, 9, requires_grad=True)
    centre_nonlinearity(u, 32).sum().backward()
    assert torch.all(u.grad > 1 - math.tanh(1.0) ** 2 - 1e-6)  # slope never below 0.42 for |u| <= 14


def test_sigma_is_softplus_and_positive():
    u = torch.tensor([-50.0, -1.0, 0.0, 10.0])
    sigma = sigma_nonlinearity(u)
    assert torch.all(sigma > 0)
    assert sigma[2].item() == pytest.approx(math.log(2.0))
    assert sigma[3].item() == pytest.approx(10.0, abs=1e-4)


def test_random_rbf_parameters_are_uniform_on_the_paper_ranges():
    g = torch.Generator().manual_seed(0)
    params = sample_random_rbf_params(20000, 32, 24, generator=g)
    upper = torch.tensor([32.0, 24.0, 64.0])
    assert torch.all(params >= 0) and torch.all(params <= upper)
    # Uniform on [0, a]: mean a/2, sd a/sqrt(12); 5 standard errors.
    se = upper / math.sqrt(12) / math.sqrt(len(params))
    assert torch.all((params.mean(0) - upper / 2).abs() < 5 * se)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_gumbel_sigmoid_at_low_temperature_matches_bernoulli_frequency(p):
    g = torch.Generator().manual_seed(1)
    n = 40000
    samples = gumbel_sigmoid(torch.full((n,), p), tau=0.002, generator=g)
    assert ((samples > 0.01) & (samples < 0.99)).float().mean() < 0.02  # nearly binary
    freq = (samples > 0.5).float().mean().item()
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_gumbel_sigmoid_mean_at_tau_one_is_between_and_differentiable():
    probs = torch.full((20000,), 0.7, requires_grad=True)
    samples = gumbel_sigmoid(probs, tau=1.0, generator=torch.Generator().manual_seed(2))
    assert 0.0 < samples.min() and samples.max() < 1.0
    samples.mean().backward()
    assert probs.grad is not None and torch.all(probs.grad > 0)


def test_hard_bernoulli_mask_frequency():
    probs = torch.linspace(0.0, 1.0, 11).repeat(5000, 1)
    mask = bernoulli_mask(probs, generator=torch.Generator().manual_seed(3))
    freq = mask.mean(0)
    assert torch.all((freq - probs[0]).abs() < 5 * torch.sqrt(probs[0] * (1 - probs[0]) / 5000) + 1e-6)


def test_penalties_against_hand_counts():
    mask = torch.zeros(1, 3, 3)
    mask[0, 1, 1] = 1.0  # one kept pixel with four neighbours at 0
    assert area_penalty(mask).item() == pytest.approx(1 / 9)
    # four of the 12 neighbour pairs of a 3 x 3 grid differ: S is the mean over pairs, like R a fraction
    assert smoothness_penalty(mask).item() == pytest.approx(4 / 12)
    assert smoothness_penalty(torch.ones(2, 4, 4)).tolist() == [0.0, 0.0]
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    assert smoothness_penalty(checker[None].float()).item() == pytest.approx(1.0)  # every pair differs


def test_literal_eq14_form_would_not_sample_bernoulli_p():
    # Why gumbel_sigmoid uses logit(p) + Logistic noise: log(p) + one Gumbel draw gives Bernoulli(1 - e^-p).
    g = torch.Generator().manual_seed(4)
    n, p = 40000, 0.5
    gumbel = -torch.log(-torch.log(torch.rand(n, generator=g).clamp(1e-9, 1 - 1e-9)))
    freq = (torch.sigmoid((math.log(p) + gumbel) / 0.002) > 0.5).float().mean().item()
    assert abs(freq - (1 - math.exp(-p))) < 0.01 and abs(freq - p) > 0.09


def test_relaxed_masks_at_the_shared_temperature_match_hard_masks():
    # The predictor is trained on, and the selector scored with, relaxed masks at tau = 0.1: with the same
    # noise they are close to the hard Bernoulli mask, so R, S and the masked image barely differ.
    probs = rbf_bernoulli(torch.tensor([[16.0, 12.0, 6.0]]).repeat(400, 1), 32, 32)
    noise = logistic_noise(probs.shape, generator=torch.Generator().manual_seed(5))
    relaxed = gumbel_sigmoid(probs, tau=0.1, noise=noise)
    hard = hard_mask_from_noise(probs, noise)
    assert (relaxed - hard).abs().mean() < 0.03
    assert (area_penalty(relaxed) - area_penalty(hard)).abs().mean() < 0.02
    s_relaxed, s_hard = smoothness_penalty(relaxed), smoothness_penalty(hard)
    assert ((s_relaxed - s_hard).abs() / s_hard).mean() < 0.15  # relaxed edges are a little softer
    # and both are unbiased samples of the RBF Bernoulli map: E[m] = p
    assert (relaxed.mean(0) - probs[0]).abs().max() < 0.12
    assert (hard.mean(0) - probs[0]).abs().max() < 5 * 0.5 / 20
    # at tau = 1 (the paper's selector temperature) the relaxed mask is far from any hard mask
    assert (gumbel_sigmoid(probs, tau=1.0, noise=noise) - hard).abs().mean() > 0.1


def test_sample_mask_is_hard_at_zero_and_rejects_negative_temperatures():
    probs = torch.full((2000,), 0.3)
    hard = sample_mask(probs, 0.0, torch.Generator().manual_seed(6))
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert abs(hard.mean().item() - 0.3) < 5 * math.sqrt(0.21 / 2000)
    with pytest.raises(ValueError, match="temperature"):
        sample_mask(probs, -0.1)


def test_mass_outside_the_frame_is_the_plane_integral_less_the_pixel_sum():
    sigma = 4.0
    centred, edge, corner, beyond = rbf_mass_outside_frame(
        torch.tensor([[16.0, 16.0, sigma], [0.0, 16.0, sigma], [0.0, 0.0, sigma], [-40.0, 16.0, sigma]]), 32, 32)
    plane = 2 * math.pi * sigma**2
    assert float(centred) < 1e-3 * plane  # 4 sigma from every edge: the frame holds all of it
    assert float(edge) == pytest.approx(plane / 2, rel=0.02)  # centre on an edge: half outside
    assert float(corner) == pytest.approx(3 * plane / 4, rel=0.02)  # on a corner: three quarters
    assert float(beyond) == pytest.approx(plane, rel=1e-4)  # 10 sigma outside: all of it
