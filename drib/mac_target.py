"""The shared cost knob `target_mac_reduction`: map it to DRIB's own knob and make it land.

DRIB's knob is the sparsity regulariser's target, the network's MAC fraction (decision heads included, per
sample, argmax decisions at inference). `decision_target_for` turns a reduction of the dense start's MACs
into that fraction. The regulariser is a quadratic pull that cross-entropy resists, so the trained code
books land near, not at, the target; `calibrate_codebooks` then moves every code book row by one shared
scale of its kept-channel count (rows keep their largest entries; rows that must grow take back channels
by importance), bisected on training images until the measured mean reduction is within `tolerance`.
Training calls it when the decisions freeze (start of the fine-tuning share) and on the selected model.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .model import DynamicNetwork


def decision_target_for(net: DynamicNetwork, reduction: float) -> float:
    """decision.target (MAC fraction of the gated network, heads included) whose MACs are ``1 - reduction``
    of the dense backbone's."""
    with_heads = float(sum(s.macs for s in net.shapes()))
    return (1.0 - reduction) * net.dense_backbone_macs() / with_heads


@torch.no_grad()
def achieved_reduction(net: DynamicNetwork, images: Tensor, batch_size: int = 256) -> float:
    """Mean per-sample MAC reduction against the dense backbone on ``images`` (argmax decisions)."""
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        masks = net.channel_masks(images[start:start + batch_size])
        total += float(net.per_sample_macs(masks).sum())
        count += masks[0].shape[0]
    return 1.0 - total / count / net.dense_backbone_macs()


def _ranked_rows(codebook: Tensor, importance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: channel order (kept entries by value, then the skipped ones by importance), kept counts and
    the value a channel taken back gets (the row's mean kept value, 1 for an empty row)."""
    kept = codebook != 0
    rank_key = torch.where(kept, codebook + importance.max() + 1.0, importance.expand_as(codebook))
    order = rank_key.argsort(dim=1, descending=True)
    counts = kept.sum(dim=1)
    fill = torch.where(counts > 0, codebook.sum(dim=1) / counts.clamp_min(1), torch.ones_like(codebook[:, 0]))
    return order, counts, fill


def _scaled_codebook(codebook: Tensor, order: Tensor, counts: Tensor, fill: Tensor, scale: float) -> Tensor:
    m, c = codebook.shape
    keep = (counts.clamp_min(1).to(torch.float64) * scale).round().clamp(0, c).long()
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(c, device=order.device).expand(m, c))
    chosen = position < keep[:, None]
    values = torch.where(codebook != 0, codebook, fill[:, None].expand(m, c))
    return torch.where(chosen, values, torch.zeros_like(codebook))


@torch.no_grad()
def calibrate_codebooks(net: DynamicNetwork, images: Tensor, reduction: float, tolerance: float = 0.01,
                        iterations: int = 24, log: logging.Logger | None = None) -> dict[str, float]:
    """Scale every code book row's kept-channel count by one factor so that the mean MAC reduction on
    ``images`` is within ``tolerance`` of ``reduction`` (bisection; a no-op when it already is). The
    head (which row a sample picks) is unchanged. Returns before / after / scale."""
    gates = [g.gate for g in net.gated]
    before = achieved_reduction(net, images)
    result = {"target": reduction, "before": before, "after": before, "scale": 1.0}
    if abs(before - reduction) <= tolerance:
        return result
    originals = [g.effective_codebook().detach().clone() for g in gates]
    importance = net.channel_importance(images)
    ranked = [_ranked_rows(cb, imp.to(cb)) for cb, imp in zip(originals, importance)]
    max_scale = max(float(cb.shape[1]) for cb in originals)

    measured: dict[bytes, float] = {}  # code books -> reduction: kept counts are rounded, so scales repeat them

    def apply(scale: float) -> float:
        for gate, cb, (order, counts, fill) in zip(gates, originals, ranked):
            gate.codebook.copy_(_scaled_codebook(cb, order, counts, fill, scale))
        key = b"".join(gate.codebook.detach().cpu().numpy().tobytes() for gate in gates)
        if key not in measured:  # the reduction is a function of the code books alone (eval mode, same images)
            measured[key] = achieved_reduction(net, images)
        return measured[key]

    low, high = (0.0, 1.0) if before < reduction else (1.0, max_scale)  # more reduction: fewer channels
    best = (abs(before - reduction), 1.0, before)
    for _ in range(iterations):
        mid = (low + high) / 2
        got = apply(mid)
        if abs(got - reduction) < best[0]:
            best = (abs(got - reduction), mid, got)
        if abs(got - reduction) <= tolerance / 2:
            break
        if got < reduction:
            high = mid
        else:
            low = mid
    if best[1] == 1.0:
        for gate, cb in zip(gates, originals):
            gate.codebook.copy_(cb)
    else:
        apply(best[1])
    result.update(after=best[2], scale=best[1])
    if log is not None:
        log.info("MAC target %.3f: code books scaled by %.3f, reduction %.3f -> %.3f on %d training images",
                 reduction, best[1], before, best[2], len(images))
    return result
