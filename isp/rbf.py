"""RBF-style explanatory masks (paper Eq. 1, 4-7, 9; supplementary Eq. 12, 14).

Coordinates: pixel (i, j) of an M x N image sits at (z, t) = (i + 0.5, j + 0.5), the origin being the top-left
corner of the frame, so a centre of (M/2, N/2) is the exact middle of the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Softplus can underflow to 0; an RBF with sigma = 0 would divide by zero.
MIN_SIGMA = 1e-3


def pixel_grid(height: int, width: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(z, t) coordinates of every pixel centre, each H x W."""
    z = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    t = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    return torch.meshgrid(z, t, indexing="ij")


def rbf_bernoulli(params: Tensor, height: int, width: int) -> Tensor:
    """Eq. 4: f_BP(z, t; c_z, c_t, sigma) = exp(-((z - c_z)^2 + (t - c_t)^2) / (2 sigma^2)).

    params: B x 3 rows (c_z, c_t, sigma). Returns the Bernoulli parameter of every pixel, B x H x W.
    """
    if params.dim() != 2 or params.shape[1] != 3:
        raise ValueError(f"RBF parameters must be B x 3 (c_z, c_t, sigma), got {tuple(params.shape)}")
    z, t = pixel_grid(height, width, params.device)
    c_z, c_t = params[:, 0, None, None], params[:, 1, None, None]
    sigma = params[:, 2, None, None].clamp_min(MIN_SIGMA)
    return torch.exp(-((z - c_z) ** 2 + (t - c_t) ** 2) / (2 * sigma**2))


def rbf_mass_outside_frame(params: Tensor, height: int, width: int) -> Tensor:
    """The part of the kernel of Eq. 4 that the frame does not hold, per sample, in pixels: its whole-plane mass
    2 pi sigma^2 less the sum of its Bernoulli parameters over the H x W pixels, floored at 0 (the pixel sum of
    a kernel narrower than a pixel can exceed the integral). For sigma >= 1 px the pixel sum of a kernel far from
    the edges equals 2 pi sigma^2 to float precision: ~0 there, growing as the kernel moves out of the frame."""
    sigma = params[:, 2].clamp_min(MIN_SIGMA)
    inside = rbf_bernoulli(params, height, width).flatten(1).sum(1)
    return (2 * math.pi * sigma**2 - inside).clamp_min(0.0)


def centre_nonlinearity(u: Tensor, size: int, margin: float = 2.0) -> Tensor:
    """Supplementary Sec. 3: c = r tanh(u / r) + size / 2 with r = size / 2 - margin.

    For 32 px and margin 2 this is 14 tanh(u / 14) + 16: centres stay in the central 28 x 28 frame and tanh is
    in its active range while |u| <= 14 (ImageNet: margin 4 gives 108 tanh(u / 108) + 112).
    """
    half_range = size / 2 - margin
    if half_range <= 0:
        raise ValueError(f"centre margin {margin} leaves no room in a {size}-pixel image")
    return half_range * torch.tanh(u / half_range) + size / 2


def sigma_nonlinearity(u: Tensor) -> Tensor:
    """Supplementary Sec. 3: sigma = softplus(u), always positive."""
    return F.softplus(u)


def sample_random_rbf_params(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                             device: torch.device | str = "cpu", sigma_max: float | None = None) -> Tensor:
    """The predictor's random kernels (Sec. 3.5): c_z ~ U[0, M], c_t ~ U[0, N], sigma ~ U[0, sigma_max] with
    the paper's sigma_max = 2 max(M, N) unless given."""
    if sigma_max is None:
        sigma_max = 2.0 * max(height, width)
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    u = torch.rand(batch, 3, generator=generator).to(device)
    scale = torch.tensor([height, width, sigma_max], dtype=torch.float32, device=device)
    return u * scale


def bernoulli_mask(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A hard mask m' ~ prod Bernoulli(probs) (Eq. 5, 7): 1 keeps the pixel, 0 removes it."""
    u = torch.rand(probs.shape, generator=generator).to(probs.device)
    return (u < probs).to(probs.dtype)


def logistic_noise(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Tensor:
    """g1 - g2 for two independent Gumbel(0, 1) draws, i.e. Logistic(0, 1) = log u - log(1 - u)."""
    u = torch.rand(shape, generator=generator).clamp_(1e-6, 1 - 1e-6).to(device)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(probs: Tensor, tau: float = 1.0, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
    """Eq. 14, a differentiable relaxed sample of Bernoulli(probs) at temperature tau.

    m = sigmoid((logit(p) + g) / tau) with g Logistic(0, 1) (the binary Concrete of Maddison et al.). As
    tau -> 0, P(m > 1/2) = p exactly. The paper writes log(p) + a single Gumbel draw, whose limit would be
    Bernoulli(1 - exp(-p)) instead; see README, deviations. ``noise`` (same shape as ``probs``) replaces the
    draw, so a relaxed and a hard mask can share it (``hard_mask_from_noise``).
    """
    logits = _logits(probs)
    if noise is None:
        noise = logistic_noise(logits.shape, logits.device, generator)
    return torch.sigmoid((logits + noise) / tau)


def _logits(probs: Tensor) -> Tensor:
    eps = 1e-6
    p = probs.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def hard_mask_from_noise(probs: Tensor, noise: Tensor) -> Tensor:
    """The tau -> 0 limit of ``gumbel_sigmoid`` for the same noise: 1[logit(p) + g > 0] ~ Bernoulli(p)."""
    return (_logits(probs) + noise > 0).to(probs.dtype)


def sample_mask(probs: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """The one mask sampler shared by the predictor's training masks (Eq. 6-7) and the selector's objective
    (Eq. 8, 14): a relaxed Bernoulli sample at ``tau`` > 0, a hard Bernoulli sample at ``tau`` = 0. Sharing
    it is what makes the predictor's estimate valid for the masks the selector is scored with."""
    if tau < 0:
        raise ValueError(f"mask temperature must be >= 0 (0 = hard Bernoulli), got {tau}")
    if tau == 0:
        return bernoulli_mask(probs, generator)
    return gumbel_sigmoid(probs, tau, generator)


def mask_input(images: Tensor, mask: Tensor) -> Tensor:
    """Eq. 1: keep the pixels where m = 1 and set the others to 0 (black in [0, 1] pixel space)."""
    if mask.dim() == 3:
        mask = mask[:, None]
    return images * mask


