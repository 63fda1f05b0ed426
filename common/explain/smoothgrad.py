"""SmoothGrad (Smilkov et al., 2017), a baseline DRIB compares against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._utils import as_targets, eval_mode, model_device


def smooth_grad(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int | Sequence[int] | None = None,
    *,
    samples: int = 50,
    noise: float = 0.15,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean absolute input gradient of the target logit over Gaussian-perturbed copies, summed over channels.

    Definition, per image x_b (C x H x W) with target t_b and y = the **logit** of t_b:

        sigma_b = noise * (max(x_b) - min(x_b))            (Smilkov's noise level sigma / (x_max - x_min))
        map[b]  = (1 / samples) * sum_{i=1..samples} sum_c | d y(x_b + eps_i) / d x[c] |,
                  eps_i ~ N(0, sigma_b^2 I), drawn independently per image and sample

    The noisy inputs are not clipped to [0, 1] (as in the paper and captum's NoiseTunnel). This equals
    captum's `NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", stdevs=sigma)` summed over
    channels, in distribution.

    Args:
        targets: class per image; None means the model's prediction on the clean images.
        samples: number of noisy copies per image.
        noise: noise standard deviation as a fraction of each image's value range (0.15 = 15%).
        batch_size: noisy copies evaluated per forward / backward pass.
        generator: optional torch.Generator for reproducible noise (noise is drawn on its device).

    Returns:
        B x H x W float tensor, non-negative, detached, on the model's device. The model runs in eval mode
        (training flags restored); gradients are taken with `torch.autograd.grad` w.r.t. the noisy inputs,
        so parameters' `.grad` are left untouched.
    """
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be >= 1")
    device = model_device(model, images.device)
    images = images.to(device)
    b = images.shape[0]
    with eval_mode(model):
        if targets is None:
            with torch.no_grad():
                target_idx = model(images).argmax(dim=1)
        else:
            target_idx = as_targets(targets, b, device)
        flat = images.reshape(b, -1)
        sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))
        total = torch.zeros(b, *images.shape[-2:], device=device)
        noise_device = generator.device if generator is not None else device
        for start in range(0, b * samples, batch_size):
            sample = torch.arange(start, min(start + batch_size, b * samples), device=device) // samples
            eps = torch.randn((sample.numel(), *images.shape[1:]), generator=generator, device=noise_device).to(
                device=device, dtype=images.dtype
            )
            noisy = (images[sample] + eps * sigma[sample].view(-1, 1, 1, 1)).requires_grad_(True)
            with torch.enable_grad():
                logits = model(noisy)
                score = logits.gather(1, target_idx[sample][:, None]).sum()
                (grad,) = torch.autograd.grad(score, noisy)
            total.index_add_(0, sample, grad.abs().sum(dim=1).to(total.dtype))
    return total / samples
