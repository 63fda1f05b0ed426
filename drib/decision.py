"""The dynamic reasoning decision module of one gated conv layer (paper Sec. 3.1, Eq. 2-4, Algorithm 1).

For the input x_{l-1} of conv layer l:
    A(x_{l-1}) = Linear(GlobalAvgPool(ReLU(x_{l-1}))) -> probabilities p over m actions    (Eq. 2)
    training:  I = GumbelSoftmax(log p, tau), forward one-hot, backward soft (straight-through)   (Eq. 3)
    inference: i = argmax A(x_{l-1})                                                  (Algorithm 1, line 5)
    x_l = conv(x_{l-1}, theta'_l) * G_l[i], theta'_l = the filters j with G_l[i][j] != 0          (Eq. 4)
G_l (m x C_out) is the layer's learnable code book of candidate channel masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.precision import full_precision


def gumbel_softmax_select(logits: Tensor, tau: float, generator: torch.Generator | None = None
                          ) -> tuple[Tensor, Tensor]:
    """Eq. 3 with a straight-through hard sample: returns (hard, soft), the B x m one-hot sample and the
    relaxed softmax((log p + g) / tau) through which gradients flow. ``logits`` may be unnormalised.

    The argmax of log p + g with g ~ Gumbel(0, 1) is an exact sample of Categorical(p) (Gumbel-max trick),
    whatever tau is; tau only shapes the gradient.
    """
    log_p = F.log_softmax(logits, dim=-1)
    uniform = torch.rand(log_p.shape, generator=generator, device=log_p.device if generator is None
                         else generator.device).to(log_p.device, log_p.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    soft = F.softmax((log_p + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard, soft


class DecisionGate(nn.Module):
    """Head A (Eq. 2) and code book G_l of one gated conv; produces the per-sample channel mask G_l[i].

    ``decide`` runs on the conv's input and remembers the choice for the BN-output hook that applies it.
    """

    def __init__(self, in_channels: int, out_channels: int, actions: int = 40, codebook_max: float = 5.0,
                 prune_below: float = 0.05):
        super().__init__()
        # Wang et al.: no bias, rows L2-normalised after each update (see `project_`).
        self.head = nn.Linear(in_channels, actions, bias=False)
        self.codebook = nn.Parameter(torch.ones(actions, out_channels))
        self.codebook_max = codebook_max
        self.prune_below = prune_below
        self.tau = 1.0
        self.open = False  # True: pass every channel (used by the bottleneck verification)
        self.forced: Tensor | None = None  # B x C_out masks that replace the decision (in-the-loop verification)
        self.selection: Tensor | None = None  # B x m one-hot of the last forward
        self.mask: Tensor | None = None  # B x C_out, G_l[i] per sample
        self.probs: Tensor | None = None  # B x m softmax of A(x) of the last training forward (usage balance)
        self.project_()

    @property
    def actions(self) -> int:
        return self.codebook.shape[0]

    def action_logits(self, x: Tensor) -> Tensor:
        """A(x_{l-1}) before the softmax (Eq. 2)."""
        return self.head(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))

    def effective_codebook(self) -> Tensor:
        """G_l with entries below ``prune_below`` set to exactly 0 (skipped); the gradient is the identity, so
        a skipped entry can grow back, but one optimiser step of size ~lr does not revive it (no flicker)."""
        g = self.codebook
        return torch.where(g >= self.prune_below, g, g - g.detach())

    def decide(self, x: Tensor) -> Tensor:
        """Pick one action per sample and return its mask G_l[i] (B x C_out). Always in fp32 (outside any
        bf16 autocast): the Gumbel noise and the straight-through mask need it."""
        with full_precision(x.device):
            return self._decide(x.float())

    def _decide(self, x: Tensor) -> Tensor:
        logits = self.action_logits(x)
        if self.training:
            hard, soft = gumbel_softmax_select(logits, self.tau)
            self.probs = F.softmax(logits, dim=-1)
            # Straight-through, written so that the forward value is exactly G_l[i] (skipped channels are
            # exact zeros): the code book gets the selected row's gradient, the head gets it through `soft`.
            codebook = self.effective_codebook()
            self.mask = hard @ codebook + (soft - soft.detach()) @ codebook.detach()
            self.selection = hard
        else:
            self.selection = F.one_hot(logits.argmax(dim=-1), self.actions).to(logits.dtype)
            self.mask = self.selection @ self.effective_codebook()
        if self.forced is not None:
            if self.forced.shape != self.mask.shape:
                raise ValueError(f"forced masks of shape {tuple(self.forced.shape)} for a batch needing "
                                 f"{tuple(self.mask.shape)}")
            self.mask = self.forced.to(self.mask)
        return self.mask

    def apply_mask(self, features: Tensor) -> Tensor:
        """Eq. 4: scale the BN output channels by the chosen mask (skipped channels become exactly 0)."""
        if self.open or self.mask is None:
            return features
        return features * self.mask[:, :, None, None].to(features.dtype)

    @torch.no_grad()
    def init_by_importance_(self, importance: Tensor, keep: int, jitter: float,
                            generator: torch.Generator | None = None) -> None:
        """Row r keeps the ``keep`` channels of largest importance x exp(jitter * N(0, 1)) (row 0: no jitter)."""
        m, c = self.codebook.shape
        keep = max(1, min(c, keep))
        noise = torch.randn(m, c, generator=generator) * jitter
        noise[0] = 0
        scores = importance.detach().float().cpu().abs().clamp_min(1e-12).log()[None] + noise
        rows = torch.zeros(m, c)
        rows.scatter_(1, scores.topk(keep, dim=1).indices, 1.0)
        self.codebook.copy_(rows.to(self.codebook))

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the parameters where Wang et al. keep them: G in [0, max], unit-norm head rows."""
        self.codebook.clamp_(0.0, self.codebook_max)
        self.head.weight.div_(self.head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
