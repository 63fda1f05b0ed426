"""The decoupling losses (paper Eq. 9-12), summed over the gated layers l = 1..L.

L = L_ce + lambda_m L_mi + lambda_k L_kl + lambda_s L_s                                  (Eq. 12)
L_mi = sum_l CE(W_cla^l z^l, label)       variational lower bound on I(a; z^l), Eq. 6-9
L_kl = sum_l KL(z^l || y^l) / N^l         y^l = GAP(Y^l); both normalised by a softmax over filters, Eq. 10
                                          (averaged over the B x N^l entries, as the authors' kl_div does)
L_s  = sum_l max(0, ||z^l||_1 - R N^l)    sparsity with target ratio R, Eq. 11
       (with a MAC target: N x max(0, mean MACs / dense - (1 - target)), ``mac_sparsity_loss``)
Every term is a mean over the samples of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


def mutual_information_loss(masks: Sequence[Tensor], heads: Sequence[nn.Linear], targets: Tensor) -> Tensor:
    """Eq. 9: -sum_l log Q~(a | z^l), with Q~(z) = softmax(W_cla^l z) a per-layer linear classifier."""
    return sum(F.cross_entropy(head(z), targets) for z, head in zip(masks, heads, strict=True))


def kl_divergence_loss(masks: Sequence[Tensor], pooled: Sequence[Tensor]) -> Tensor:
    """Eq. 10: sum_l KL(p(z^l) || p(y^l)), p = softmax over the N^l filters of one sample.

    Each layer's term is the mean over its B x N^l entries (the authors' elementwise-mean ``kl_div``), i.e.
    the per-sample KL divided by N^l: summing over filters instead makes L_kl 16-64x stronger than theirs
    and drowns L_mi (see README)."""
    total = masks[0].new_zeros(())
    for z, y in zip(masks, pooled, strict=True):
        log_p_z = F.log_softmax(z, dim=1)
        log_p_y = F.log_softmax(y, dim=1)
        total = total + (log_p_z.exp() * (log_p_z - log_p_y)).mean()
    return total


def sparsity_loss(masks: Sequence[Tensor], target_ratio: float = 0.0) -> Tensor:
    """Eq. 11: sum_l (||z^l||_1 - R N^l), read as a hinge so that R is a real target: layers already at
    or below R N^l active filters are not pushed further. R = 0 is the plain l1 penalty."""
    if not 0.0 <= target_ratio <= 1.0:
        raise ValueError(f"target ratio R must lie in [0, 1], got {target_ratio}")
    total = masks[0].new_zeros(())
    for z in masks:
        total = total + F.relu(z.abs().sum(dim=1) - target_ratio * z.shape[1]).mean()
    return total


def mac_sparsity_loss(macs: Tensor, dense_macs: float, target_reduction: float, filters: int) -> Tensor:
    """Eq. 11 in MAC units (the shared cost knob; not in the paper): ``filters`` x max(0, mean_b MACs_b /
    dense - (1 - target)). Filter counts are the wrong unit for a MAC target (a filter of the 8x8 stage
    costs a quarter of one at 32x32 per input channel; a conv2's cost also shrinks with conv1's mask), so
    the hinge is on the batch's mean expected MACs (``DecoupledNet.expected_macs``). Scaled by the number
    of gated filters so that lambda_s keeps the per-filter size of Eq. 11's gradient."""
    if not 0.0 <= target_reduction < 1.0:
        raise ValueError(f"target_mac_reduction must lie in [0, 1), got {target_reduction}")
    return filters * F.relu(macs.float().mean() / dense_macs - (1.0 - target_reduction))


@dataclass
class LossTerms:
    total: Tensor
    ce: Tensor
    mi: Tensor
    kl: Tensor
    sparsity: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "mi", "kl", "sparsity")}


class DecouplingObjective(nn.Module):
    """Eq. 12 with its own parameters: the per-layer classifiers W_cla^l of L_mi (K x N^l, no bias).
    They serve training only and never run at inference."""

    def __init__(self, layer_channels: Sequence[int], num_classes: int, lambda_m: float, lambda_k: float,
                 lambda_s: float, target_ratio: float = 0.0, heads_unscaled: bool = False,
                 target_mac_reduction: float | None = None, dense_macs: float | None = None):
        super().__init__()
        if target_mac_reduction is not None and not dense_macs:
            raise ValueError("a MAC target needs the dense start's MACs")
        # Set: L_s is the MAC-weighted hinge (mac_sparsity_loss) and forward needs the per-sample MACs.
        self.target_mac_reduction, self.dense_macs = target_mac_reduction, dense_macs
        self.filters = sum(layer_channels)
        self.mi_heads = nn.ModuleList(nn.Linear(n, num_classes, bias=False) for n in layer_channels)
        self.lambda_m, self.lambda_k, self.lambda_s = lambda_m, lambda_k, lambda_s
        self.target_ratio = target_ratio
        # True: the heads W_cla (Q~ of Eq. 8, trained by nothing but L_mi) get the gradient of L_mi itself,
        # not of lambda_m L_mi; the controllers still get lambda_m's share. The bound of Eq. 8 is only
        # tight when Q~ fits, and a head learning at lambda_m times the lr cannot keep up in a short run.
        self.heads_unscaled = heads_unscaled

    def forward(self, logits: Tensor, targets: Tensor, masks: Sequence[Tensor], pooled: Sequence[Tensor],
                macs: Tensor | None = None) -> LossTerms:
        # Every loss in fp32 whatever the forward ran in (common.precision).
        logits, masks, pooled = logits.float(), [z.float() for z in masks], [y.float() for y in pooled]
        ce = F.cross_entropy(logits, targets)
        mi = mutual_information_loss(masks, self.mi_heads, targets)
        kl = kl_divergence_loss(masks, pooled)
        if self.target_mac_reduction is None:
            sparsity = sparsity_loss(masks, self.target_ratio)
        else:
            if macs is None:
                raise ValueError("the MAC-weighted L_s needs the per-sample MACs (DecoupledNet.expected_macs)")
            sparsity = mac_sparsity_loss(macs, self.dense_macs, self.target_mac_reduction, self.filters)
        total = ce + self.lambda_m * mi + self.lambda_k * kl + self.lambda_s * sparsity
        if self.heads_unscaled and self.lambda_m < 1.0:
            # Adds (1 - lambda_m) L_mi's gradient to the heads only; the value reported stays Eq. 12's.
            head_only = mutual_information_loss([z.detach() for z in masks], self.mi_heads, targets)
            total = total + (1.0 - self.lambda_m) * (head_only - head_only.detach())
        return LossTerms(total=total, ce=ce, mi=mi, kl=kl, sparsity=sparsity)
