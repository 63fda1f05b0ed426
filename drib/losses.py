"""DRIB's objectives, one function per equation.

* Wang et al.'s sparsity regulariser of the decision stage (DRIB Sec. 3.1 trains Eq. 2-4 with it):
  `sparsity_loss`, (measure - target)^2;
* the information bottleneck trade-off of DRIB's Eq. 6, min I(X; Z) - beta I(Z; Y), in IBA's per-sample
  form: `information_bottleneck_loss` = CE (the I(Z; Y) side) + beta * mean capacity (the I(X; Z) bound).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DribSettings
from .model import DynamicNetwork


def sparsity_loss(net: DynamicNetwork, masks: list[Tensor], config: DribSettings) -> Tensor:
    """Wang et al.'s quadratic pull towards the target: (measure - target)^2, where the measure is the
    mean MAC fraction of the batch ("macs") or the mean |G_l[i]| of each sample's selected rows ("density")."""
    d = config.decision
    if d.regulariser == "macs":
        measure = net.mac_fraction(masks).mean()
    else:  # Wang et al.: the mean |G_l[i]| of the rows each sample selected, over all gated layers
        measure = torch.cat([m.abs().flatten(1) for m in masks], dim=1).mean()
    return (measure - d.target) ** 2


def information_bottleneck_loss(logits: Tensor, labels: Tensor, capacity_mean: Tensor, beta: float) -> Tensor:
    """Eq. 6 as IBA optimises it: cross-entropy of the target + beta * mean capacity (nats per element)."""
    return F.cross_entropy(logits, labels) + beta * capacity_mean


def balance_loss(net: DynamicNetwork) -> Tensor:
    """Deviation (decision.balance): the usage-balance term of mixture-of-experts routers (Fedus et al.,
    Switch Transformer), m x sum_r f_r P_r averaged over the gated layers, f_r the share of the batch whose
    hard choice is row r and P_r the mean probability of row r (the gradient flows through P). It is 1 when
    the rows are used evenly and m when every sample goes to one row."""
    terms = []
    for g in net.gated:
        gate = g.gate
        if gate.probs is None or gate.selection is None:
            raise RuntimeError("balance_loss needs a training forward (Gumbel decisions) first")
        share = gate.selection.detach().float().mean(0)
        terms.append(gate.actions * (share * gate.probs.float().mean(0)).sum())
    return torch.stack(terms).mean()
