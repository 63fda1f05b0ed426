"""Reference rows every method must beat: L1-norm filter pruning and random channel pruning.

Both remove whole output channels of the block-internal convolutions (``GateSite.internal``: a ResNet
block's first conv, so the residual stream is untouched, as in ISP and DRIB), physically, through
Torch-Pruning's dependency graph (the following BN and the consuming conv's input channels go with them).
The same ratio is taken from every such layer (L1: the filters of smallest L1 norm, Li et al., ICLR 2017;
random: a seeded random choice); the ratio is found by bisection so that the MACs removed match the
row's ``target_mac_reduction``. The pruned network is then fine-tuned with the baseline's cross-entropy
loop under the same budget as every other row.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.backbones import Backbone
from common.data import DatasetSplits
from common.macs import count_macs
from common.method import Budget, MethodResult
from common.run import pick_device

from .baseline import CrossEntropyRecipe, test_metrics, train_cross_entropy

DEFAULT_TARGET = 0.5
TOLERANCE = 0.005  # bisection stops when the achieved MAC reduction is this close to the target
# Above 15/16 a 16-channel layer would keep no channel and Torch-Pruning leaves it whole, so the MACs removed
# stop growing with the ratio and the bisection would break; 0.9 keeps >= 1 channel and removes ~91%.
MAX_RATIO = 0.9


def _pruned_copy(model: Backbone, ratio: float, importance: str, input_size: tuple[int, int, int],
                 seed: int) -> Backbone:
    import torch_pruning as tp

    pruned = copy.deepcopy(model).cpu().eval()
    if ratio <= 0:
        return pruned
    internal = [site.conv for site in pruned.gate_sites() if site.internal]
    if not internal:
        raise ValueError(f"{type(model).__name__} has no block-internal convolution to prune")
    ignored = [m for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m not in internal]
    if importance == "l1":
        # Li et al. rank a filter by the L1 norm of its own weights only (not of the coupled BN and next conv)
        scorer = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    elif importance == "random":
        torch.manual_seed(seed)  # RandomImportance draws from the global generator
        scorer = tp.importance.RandomImportance()
    else:
        raise ValueError(f"importance must be 'l1' or 'random', got {importance!r}")
    pruner = tp.pruner.MetaPruner(pruned, torch.rand(1, *input_size), importance=scorer, pruning_ratio=ratio,
                                  ignored_layers=ignored)
    pruner.step()
    return pruned


def prune_to_target(model: Backbone, target: float, importance: str, input_size: tuple[int, int, int], *,
                    seed: int = 0) -> tuple[Backbone, float]:
    """A physically pruned copy of ``model`` whose MACs are ``target`` (a fraction) below the original's,
    and the reduction achieved. The per-layer ratio is bisected on fresh copies."""
    if not 0 < target < 1:
        raise ValueError(f"target_mac_reduction must be in (0, 1), got {target}")
    dense = float(count_macs(model, input_size))

    def reduction(ratio: float) -> tuple[Backbone, float]:
        pruned = _pruned_copy(model, ratio, importance, input_size, seed)
        return pruned, 1.0 - float(count_macs(pruned, input_size)) / dense

    low, high = 0.0, MAX_RATIO
    best, best_reduction = reduction(high)
    if best_reduction < target - TOLERANCE:
        raise ValueError(f"pruning every internal channel at ratio {MAX_RATIO} removes only "
                         f"{100 * best_reduction:.1f}% of the MACs; target {100 * target:.1f}% is out of reach")
    for _ in range(20):
        mid = (low + high) / 2
        candidate, achieved = reduction(mid)
        if abs(achieved - target) < abs(best_reduction - target):
            best, best_reduction = candidate, achieved
        if abs(achieved - target) <= TOLERANCE:
            break
        low, high = (mid, high) if achieved < target else (low, mid)
    return best, best_reduction


def _entry(importance: str):
    def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
                   device: torch.device | str | None = None, seed: int = 0,
                   settings: dict[str, Any] | None = None) -> MethodResult:
        settings = dict(settings or {})
        target = float(settings.pop("target_mac_reduction", DEFAULT_TARGET))
        input_size = (3, *data.image_size)
        model, _ = prune_to_target(start, target, importance, input_size, seed=seed)
        device = pick_device(device)
        outcome = train_cross_entropy(model, data, budget, Path(out_dir), device=device, seed=seed,
                                      recipe=CrossEntropyRecipe.from_settings(settings))
        return MethodResult(model=model, mis_layer=model.cam_layer(), train_seconds=outcome.train_seconds,
                            metrics={"val_top1": outcome.val_top1, "selected": outcome.selected,
                                     **test_metrics(model, start, data, device=device, target_mac_reduction=target)})

    run_method.__doc__ = f"{importance} channel pruning to ``target_mac_reduction``, then CE fine-tuning."
    return run_method


l1_run_method = _entry("l1")
random_run_method = _entry("random")
