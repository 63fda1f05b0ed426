"""Improved SemHash (paper Eq. 3-5): a binary architecture encoding vector that SGD can train.

Training (Eq. 3-4): s~ = G(s) + alpha with alpha ~ N(0, 1); v1 = sigma'(s~) (real, differentiable),
v2 = 1(s~ > 0) (binary). A random half of the samples use z = v2, the rest z = v1; the gradient of z is
always the gradient of v1 (straight-through for the binary half).
Inference (Eq. 5): z = 1(G(s) > 0), no noise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def saturating_sigmoid(x: Tensor) -> Tensor:
    """Eq. 4: sigma'(x) = max(0, min(1, 1.2 sigmoid(x) - 0.1)); exactly 0 or 1 outside |x| < ~2.4."""
    return torch.clamp(1.2 * torch.sigmoid(x) - 0.1, 0.0, 1.0)


def random_half_rows(batch: int, device: torch.device | str = "cpu") -> Tensor:
    """A bool vector of length ``batch`` with half of its entries True (for odd batches a fair coin decides
    who gets the extra one), at random positions."""
    extra = int(torch.randint(0, 2, ()).item()) if batch % 2 else 0
    chosen = torch.randperm(batch, device=device)[: batch // 2 + extra]
    rows = torch.zeros(batch, dtype=torch.bool, device=device)
    rows[chosen] = True
    return rows


def improved_semhash(logits: Tensor, training: bool, *, noise: Tensor | None = None,
                     hard_rows: Tensor | None = None) -> Tensor:
    """The architecture encoding vector z (B x N) from the controller's real output ``logits`` (B x N).

    ``noise`` and ``hard_rows`` (bool B: samples that use the binary v2) are drawn when not given; tests
    pass them to check Eq. 3-4 exactly.
    """
    if not training:
        return (logits > 0).to(logits.dtype)  # Eq. 5
    if noise is None:
        noise = torch.randn_like(logits)
    noisy = logits + noise
    v1 = saturating_sigmoid(noisy)
    v2 = (noisy > 0).to(logits.dtype)
    if hard_rows is None:
        hard_rows = random_half_rows(logits.shape[0], logits.device)
    # Forward value v2, backward gradient of v1.
    straight_through = v1 + (v2 - v1).detach()
    return torch.where(hard_rows[:, None], straight_through, v1)
