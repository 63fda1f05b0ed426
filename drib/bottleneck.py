"""Per-sample Information Bottleneck Attribution (Schulz et al., ICLR 2020), DRIB's verification module.

At a layer with features R (C x h x w), with per-element mean mu and std sigma estimated on training data:
    lambda = smooth(sigmoid(alpha))                      alpha: C x h x w, learned per image
    Z      = lambda * R + (1 - lambda) * eps,            eps ~ N(mu, sigma^2)
    capacity = KL( N(lambda * r, (1 - lambda)^2) || N(0, 1) ),   r = (R - mu) / sigma   (per element, nats)
    loss   = CE(model with Z, target) + beta * mean(capacity)
The capacity is an upper bound of the information I(R; Z) each element lets through (the paper's Eq. 6
trade-off). After `steps` Adam steps the capacity map, in bits, is the attribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BottleneckConfig

LOG_VAR_LIMIT = 10.0  # IBA-paper-code clamps the log-variance to [-10, 10]; keeps lambda = 1 finite


class WelfordEstimator:
    """Running per-element mean and unbiased std of feature maps (Welford's algorithm, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, batch: Tensor) -> None:
        batch = batch.detach().to(torch.float64)
        for sample in batch:  # per sample keeps the update exact and simple
            self.n += 1
            if self._mean is None:
                self._mean = torch.zeros_like(sample)
                self._m2 = torch.zeros_like(sample)
            delta = sample - self._mean
            self._mean += delta / self.n
            self._m2 += delta * (sample - self._mean)  # type: ignore[operator]

    def mean(self) -> Tensor:
        if self._mean is None:
            raise RuntimeError("the estimator has seen no samples")
        return self._mean.float()

    def std(self) -> Tensor:
        if self._m2 is None or self.n < 2:
            raise RuntimeError("the estimator needs at least two samples for a standard deviation")
        return torch.sqrt(self._m2 / (self.n - 1)).float()


def gaussian_kernel(sigma: float) -> Tensor:
    """1-D Gaussian of IBA's size round(2 sigma) * 2 + 1, normalised to sum 1."""
    half = round(2 * sigma)
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(lam: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of each channel of a (B x) C x h x w map, reflection padding."""
    if sigma <= 0:
        return lam
    squeeze = lam.dim() == 3
    x = lam[None] if squeeze else lam
    kernel = gaussian_kernel(sigma).to(x)
    half = kernel.numel() // 2
    c = x.shape[1]
    pad_h, pad_w = min(half, x.shape[-2] - 1), min(half, x.shape[-1] - 1)
    k = kernel[half - pad_h: half + pad_h + 1] if pad_h < half else kernel
    x = F.conv2d(F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x,
                 (k / k.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    k = kernel[half - pad_w: half + pad_w + 1] if pad_w < half else kernel
    x = F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x,
                 (k / k.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x[0] if squeeze else x


def restrict(features: Tensor, lam: Tensor, mean: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """Z = lambda R + (1 - lambda) eps with eps = mu + sigma * noise (noise ~ N(0, 1))."""
    return lam * features + (1 - lam) * (mean + std * noise)


def capacity(features: Tensor, lam: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-element KL( N(lambda r, (1 - lambda)^2) || N(0, 1) ) in nats, r the standardised features.

    Zero at lambda = 0 (Z is pure noise from the prior); grows without bound as lambda -> 1 (the log-variance
    is clamped at -10, as in IBA's code, so lambda = 1 stays finite).
    """
    r = (features - mean) / std
    log_var = torch.log((1 - lam) ** 2).clamp(-LOG_VAR_LIMIT, LOG_VAR_LIMIT)
    return -0.5 * (1 + log_var - (lam * r) ** 2 - torch.exp(log_var))


@dataclass
class Attribution:
    """The result of one image: the capacity per feature element (bits, C x h x w) and the heatmap."""

    capacity_bits: Tensor
    heatmap: Tensor  # H x W, bits per input pixel


class _BottleneckHook:
    """Forward hook that swaps a module's output R for Z (and records the capacity)."""

    def __init__(self, mean: Tensor, std: Tensor, config: BottleneckConfig, generator: torch.Generator | None):
        self.mean, self.std, self.config, self.generator = mean, std, config, generator
        self.alpha: Tensor | None = None
        self.last_capacity: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self.alpha is None:
            return output
        lam = smooth(torch.sigmoid(self.alpha), self.config.sigma).expand_as(output)
        noise = torch.randn(output.shape, generator=self.generator, device=self.generator.device
                            if self.generator is not None else output.device).to(output)
        self.last_capacity = capacity(output, lam, self.mean, self.std)
        return restrict(output, lam, self.mean, self.std, noise)


def attribute(model: nn.Module, layer: nn.Module, image: Tensor, target: int, mean: Tensor, std: Tensor,
              config: BottleneckConfig | None = None, element_mask: Tensor | None = None,
              generator: torch.Generator | None = None) -> Attribution:
    """Per-sample IBA of one image (3 x H x W) for class ``target`` at the output of ``layer``.

    ``element_mask`` (C or C x h x w, 0/1) restricts the capacity that counts: elements outside it are
    ignored in the loss and the heatmap (DRIB: channels the dynamic module did not compute carry nothing).
    Only alpha is optimised; the model's parameters and their ``.grad`` are untouched; eval mode throughout.
    """
    config = config or BottleneckConfig()
    device = image.device
    mean, std = mean.to(device), std.to(device).clamp_min(config.min_std)
    hook_state = _BottleneckHook(mean, std, config, generator)
    handle = layer.register_forward_hook(hook_state, prepend=True)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        alpha = torch.full(mean.shape, config.alpha_init, device=device, requires_grad=True)
        hook_state.alpha = alpha
        optimiser = torch.optim.Adam([alpha], lr=config.lr)
        batch = image[None].expand(config.copies, *image.shape)
        labels = torch.full((config.copies,), int(target), dtype=torch.long, device=device)
        weight = torch.ones_like(mean) if element_mask is None else _broadcast_mask(element_mask, mean)
        for _ in range(config.steps):
            optimiser.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = model(batch)
                cap = hook_state.last_capacity
                assert cap is not None, "the bottleneck layer did not run in the forward pass"
                info = (cap * weight).sum(dim=(1, 2, 3)) / weight.sum().clamp_min(1)
                loss = F.cross_entropy(logits, labels) + config.beta * info.mean()
                (grad,) = torch.autograd.grad(loss, alpha)
            alpha.grad = grad
            optimiser.step()
        final = hook_state.last_capacity.detach().mean(dim=0) * weight  # type: ignore[union-attr]
    finally:
        handle.remove()
        for module, flag in flags:
            module.training = flag
    bits = final / math.log(2)
    return Attribution(bits, to_heatmap(bits, tuple(image.shape[-2:])))


def _broadcast_mask(mask: Tensor, like: Tensor) -> Tensor:
    mask = (mask != 0).to(like)
    return mask.view(-1, 1, 1).expand_as(like) if mask.dim() == 1 else mask.expand_as(like)


def to_heatmap(capacity_bits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bits per input pixel: sum over channels, spread over the input pixels each feature pixel covers
    (x h*w / H*W), bilinear upsampling to ``size``. The map sums to (about) the total bits."""
    per_position = capacity_bits.sum(dim=0)
    h, w = per_position.shape
    scaled = per_position * (h * w) / (size[0] * size[1])
    return F.interpolate(scaled[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def estimate_statistics(model: nn.Module, layer: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        samples: int) -> tuple[Tensor, Tensor]:
    """Per-element mean and std of ``layer``'s output over ``samples`` images (Welford, eval mode)."""
    estimator = WelfordEstimator()

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        remaining = samples - estimator.n
        if remaining > 0:
            estimator.update(output[:remaining])

    handle = layer.register_forward_hook(record, prepend=True)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
                if estimator.n >= samples:
                    break
    finally:
        handle.remove()
        for module, flag in flags:
            module.training = flag
    return estimator.mean(), estimator.std()
