"""The two reparameterised samplers of PICNN and the Gumbel-softmax ablation.

Both samplers return the exact discrete sample in the forward pass and carry the gradient of the
probabilities they were drawn from: the "normalisation" terms (eta in Eq. 6, tau in Eq. 9) depend only on
the uniform noise and on which side of it the probability fell, so they are treated as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bernoulli_assignment(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Filter-cluster assignment z ~ Ber(p), elementwise (Eq. 5-7).

    z_i = p_i + eta_i with eta_i = 1 - p_i if p_i >= eps_i else -p_i, eps_i ~ U(0, 1) (Eq. 5, 6), so the
    forward value is exactly 1[p_i >= eps_i] (Eq. 7, Theorem 1) and dz/dp = 1.
    """
    eps = torch.rand(p.shape, device=p.device, dtype=p.dtype, generator=generator)
    hard = (p >= eps).to(p.dtype)
    eta = (hard - p).detach()  # Eq. 6: a constant once eps is drawn
    return p + eta


def pseudo_label(y1: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One-hot pseudo-label y~ ~ Cat(K, y1) for each row of the softmax prediction y1 (B x K), Eq. 8-10.

    y~[k] = 1 for the k with sum_{j<k} y1[j] < xi <= sum_{j<=k} y1[j], xi ~ U(0, 1) (Eq. 10, Theorem 2);
    y~ = y1 + tau with tau constant (Eq. 8, 9), so the gradient of anything indexed by y~ reaches y1.
    """
    if y1.dim() != 2:
        raise ValueError(f"y1 must be B x K softmax probabilities, got shape {tuple(y1.shape)}")
    xi = torch.rand(y1.shape[0], 1, device=y1.device, dtype=y1.dtype, generator=generator)
    cumulative = y1.detach().cumsum(dim=1)
    # First k whose cumulative sum reaches xi; the clamp guards against a last cumsum a rounding below 1.
    index = torch.searchsorted(cumulative, xi).clamp_(max=y1.shape[1] - 1)
    hard = torch.zeros_like(y1).scatter_(1, index, 1.0)
    tau = (hard - y1).detach()  # Eq. 9
    return y1 + tau


def gumbel_assignment(class_logits: Tensor, batch: int, temperature: float = 0.01) -> Tensor:
    """Ablation of Table 4: per sample, a Gumbel-softmax relaxation of "each filter joins its argmax class".

    class_logits: K x N, with log P = log_softmax(class_logits, dim=0). Returns B x K x N relaxed
    one-hot columns (each filter's column sums to 1), drawn independently for every sample.
    """
    logits = class_logits.unsqueeze(0).expand(batch, *class_logits.shape)
    return F.gumbel_softmax(logits, tau=temperature, hard=False, dim=1)
