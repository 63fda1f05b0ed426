"""PICNN's objective, one function per equation: L = L_dis + lambda L_int (Eq. 1-3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .model import PathwayOutput


def discrimination_loss(y1_logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 1: L_dis = H(y, y1), the cross-entropy of the discrimination pathway (logits cast to float32)."""
    return F.cross_entropy(y1_logits.float(), labels)


def interpretation_loss(y2_logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 2: L_int = H(y, y2), the cross-entropy of the interpretation pathway, averaged over all samples."""
    return F.cross_entropy(y2_logits.float(), labels)


def picnn_loss(l_dis: Tensor, l_int: Tensor, lam: float) -> Tensor:
    """Eq. 3: L = L_dis + lambda L_int."""
    return l_dis + lam * l_int


def picnn_losses(out: PathwayOutput, labels: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """(L, L_dis, L_int) for one batch of both pathways (Eq. 1-3)."""
    l_dis = discrimination_loss(out.y1_logits, labels)
    l_int = interpretation_loss(out.y2_logits, labels)
    return picnn_loss(l_dis, l_int, lam), l_dis, l_int
