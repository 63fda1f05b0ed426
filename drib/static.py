"""The static twin of a trained DRIB network: every gated layer fixed to its most used code-book row.

The most used row of a layer is counted by channel set (rows that keep the same channels are one) on
class-mixed images (a seeded permutation of the training split); among the rows with that set, the one the
heads pick most. `fixed_rows` runs ``net`` with those rows forced (in place, restored on exit); `static_twin`
returns a standalone copy whose code books hold the fixed row in every row, so any decision gives it and
the channel-skipping forward (`sparse_inference`) and its MACs work unchanged. A static network needs no
decision heads: `head_macs` is what to subtract from the dynamic MAC count.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from .config import DecisionSettings
from .dynamism import mask_ids
from .model import DynamicNetwork

STATIC_IMAGES = 2048  # class-mixed training images on which the most used rows are counted


def class_mixed_images(images: Tensor, count: int = STATIC_IMAGES, seed: int = 0) -> Tensor:
    """``count`` images drawn by a seeded permutation (uint8 N x 3 x H x W -> float in [0, 1])."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 11))[:count]
    return images[order].float() / 255.0


@torch.no_grad()
def most_used_rows(net: DynamicNetwork, images: Tensor, batch_size: int = 256) -> list[int]:
    """Per gated layer, the code-book row of the most used channel set on ``images`` (argmax decisions)."""
    device = next(net.parameters()).device
    actions: list[list[Tensor]] = [[] for _ in net.gated]
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(images), batch_size):
            net(images[start:start + batch_size].to(device))
            for k, g in enumerate(net.gated):
                actions[k].append(g.gate.selection.argmax(1).cpu())  # type: ignore[union-attr]
    finally:
        net.train(was_training)
    rows = []
    for g, parts in zip(net.gated, actions):
        chosen = torch.cat(parts)
        codebook = g.gate.effective_codebook().detach().cpu()
        set_of_row = mask_ids(codebook != 0)  # m: id of each row's channel set
        sets = set_of_row[chosen]
        top_set = int(torch.bincount(sets).argmax())
        per_row = torch.bincount(chosen, minlength=len(codebook))
        per_row[set_of_row != top_set] = -1
        rows.append(int(per_row.argmax()))
    return rows


@contextlib.contextmanager
def fixed_rows(net: DynamicNetwork, rows: list[int]) -> Iterator[DynamicNetwork]:
    """``net`` with gated layer k always using code-book row ``rows[k]`` (forced masks), restored on exit."""
    if len(rows) != len(net.gated):
        raise ValueError(f"{len(rows)} rows for {len(net.gated)} gated layers")
    saved = [g.gate.codebook.detach().clone() for g in net.gated]
    try:
        with torch.no_grad():
            for g, row in zip(net.gated, rows):
                g.gate.codebook.copy_(saved_row(g.gate.codebook, row))
        yield net
    finally:
        with torch.no_grad():
            for g, original in zip(net.gated, saved):
                g.gate.codebook.copy_(original)


def saved_row(codebook: Tensor, row: int) -> Tensor:
    if not 0 <= row < codebook.shape[0]:
        raise ValueError(f"row {row} out of range for a code book of {codebook.shape[0]} rows")
    return codebook[row].detach().expand_as(codebook).clone()


def static_twin(net: DynamicNetwork, rows: list[int]) -> DynamicNetwork:
    """A standalone copy of ``net`` whose every gated layer uses row ``rows[k]`` whatever its head decides."""
    backbone = copy.deepcopy(net.backbone)
    for module in backbone.modules():  # drop the copied DRIB hooks (they point at ``net``'s gates)
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    names = [g.site.name for g in net.gated]
    sites = {s.name: s for s in backbone.gate_sites()}
    gate = net.gates[0]
    config = DecisionSettings(actions=gate.actions, codebook_max=gate.codebook_max, prune_below=gate.prune_below)
    twin = DynamicNetwork(backbone, config, sites=[sites[n] for n in names], input_size=net.input_size)
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        for g, row in zip(twin.gated, rows):
            g.gate.codebook.copy_(saved_row(g.gate.codebook, row))
    device = next(net.parameters()).device
    return twin.to(device).train(net.training)


def head_macs(net: DynamicNetwork) -> int:
    """MACs of the decision heads (counted in a dynamic forward; a static network does not run them)."""
    return int(sum(s.macs for s in net.shapes() if s.name.startswith("gates.")))
