"""The baseline row: the pretrained start fine-tuned with plain cross-entropy under the same budget.

Fine-tuning the baseline for the same number of epochs (rather than reporting the start as is) makes the
comparison fair: every method's accuracy change is then measured against a model that saw exactly the
same extra training. The same loop also trains the smoke presets' "pretrained" start from scratch.

Selection: the validation split picks the best of {the start, the end of every epoch, the last step};
the test set is never looked at here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import Backbone
from common.data import BatchLoader, DatasetSplits
from common.macs import count_macs, count_params
from common.method import Budget, MethodResult, shared_metrics
from common.precision import resolve_precision
from common.run import (
    Stopwatch,
    atomic_torch_save,
    check_finite,
    load_checkpoint,
    pick_device,
    progress,
    seed_everything,
)
from common.training import evaluate_top1

FINITE_CHECK_EVERY = 50
CHECKPOINT_EVERY = 50


@dataclass
class CrossEntropyRecipe:
    """SGD with Nesterov momentum and a cosine schedule over the whole budget."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    precision: str = "auto"  # common.precision policy: bf16 autocast + channels_last where native
    select_best: bool = True  # return the best-validation weights (epoch ends, or the start); False: the last

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> CrossEntropyRecipe:
        settings = dict(settings or {})
        known = {k: settings.pop(k) for k in list(settings) if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class TrainOutcome:
    val_top1: float
    selected: str
    steps: int
    train_seconds: float


def _val_top1(model: nn.Module, data: DatasetSplits, batch_size: int, device: torch.device) -> float:
    split = data.val if len(data.val) else data.train
    return evaluate_top1(model, BatchLoader(split, max(batch_size, 256), train=False, device=device), "val")


def train_cross_entropy(model: nn.Module, data: DatasetSplits, budget: Budget, work_dir: Path, *,
                        device: torch.device, seed: int, recipe: CrossEntropyRecipe) -> TrainOutcome:
    """Train ``model`` in place with CE for ``budget``; resumable from ``work_dir/checkpoint.pt``.

    On return ``model`` holds the validation-selected weights.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    seed_everything(seed)
    policy = resolve_precision(recipe.precision, device)
    policy.prepare_model(model.to(device))
    loader = BatchLoader(data.train, recipe.batch_size, train=True, device=device, seed=seed)
    per_epoch = len(loader) if budget.max_batches is None else min(len(loader), budget.max_batches)
    total = budget.batches(len(loader))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "best_val": None, "best_state": None,
                             "selected": "start", "done": False}
    if ckpt_path.is_file():
        saved = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
    if state["best_val"] is None:
        state["best_val"] = _val_top1(model, data, recipe.batch_size, device)
        state["best_state"] = copy.deepcopy(model.state_dict())

    def save() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "state": state}, ckpt_path)

    def consider(label: str) -> None:
        val = _val_top1(model, data, recipe.batch_size, device)
        if val > state["best_val"]:
            state.update(best_val=val, best_state=copy.deepcopy(model.state_dict()), selected=label)

    clock = Stopwatch(device, elapsed=state["elapsed"])
    bar = progress(range(state["step"], total), "fine-tune (CE)", total=total - state["step"])
    batches = None
    while not state["done"]:
        step = state["step"]
        if step >= total or (budget.seconds is not None and clock.elapsed >= budget.seconds):
            consider(f"step {step}")
            state["done"] = True
            save()
            break
        epoch, offset = divmod(step, per_epoch)
        if batches is None or offset == 0:
            loader.set_epoch(epoch)
            batches = iter(loader)
            for _ in range(offset):  # resuming mid-epoch: replay the same shuffle up to where we stopped
                next(batches)
        x, y = next(batches)
        with clock:
            model.train()
            with policy.autocast():
                logits = model(policy.prepare_inputs(x))
            loss = F.cross_entropy(logits.float(), y)  # losses in fp32 (common.precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if step % FINITE_CHECK_EVERY == 0:
            check_finite(loss, f"baseline fine-tuning, step {step}")
        state["step"] = step + 1
        state["elapsed"] = clock.elapsed
        next(bar, None)
        if state["step"] % per_epoch == 0 and state["step"] < total:
            consider(f"epoch {state['step'] // per_epoch}")
            save()
        elif state["step"] % CHECKPOINT_EVERY == 0:
            save()
    if not recipe.select_best:
        return TrainOutcome(_val_top1(model, data, recipe.batch_size, device), "last", state["step"], state["elapsed"])
    model.load_state_dict(state["best_state"])
    return TrainOutcome(state["best_val"], state["selected"], state["step"], state["elapsed"])


def test_metrics(model: nn.Module, start: nn.Module, data: DatasetSplits, *, device: torch.device,
                 batch_size: int = 256, target_mac_reduction: float | None = None) -> dict[str, Any]:
    """The shared figures (``common.method.SHARED_METRIC_KEYS``) of a static row, measured on the test split."""
    input_size = (3, *data.image_size)
    loader = BatchLoader(data.test, batch_size, train=False, device=device)
    return shared_metrics(top1=evaluate_top1(model.to(device).eval(), loader, "test top-1"),
                          split=data.test_split_name, macs=float(count_macs(model, input_size)),
                          dense_macs=float(count_macs(start, input_size)), params=count_params(model),
                          precision="fp32", target_mac_reduction=target_mac_reduction)


def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
               device: torch.device | str | None = None, seed: int = 0,
               settings: dict[str, Any] | None = None) -> MethodResult:
    """Baseline entry with the same contract as the methods: CE fine-tuning of a copy of ``start``.

    ``settings``: ``lr``, ``momentum``, ``weight_decay``, ``batch_size`` (see ``CrossEntropyRecipe``) and
    ``finetune`` (False reports the start unchanged).
    """
    device = pick_device(device)
    model = copy.deepcopy(start).to(device)
    settings = dict(settings or {})
    if not settings.pop("finetune", True) or budget.epochs <= 0:
        return MethodResult(model=model, mis_layer=model.cam_layer(),
                            metrics={"selected": "start", **test_metrics(model, start, data, device=device)})
    outcome = train_cross_entropy(model, data, budget, Path(out_dir), device=device, seed=seed,
                                  recipe=CrossEntropyRecipe.from_settings(settings))
    return MethodResult(model=model, mis_layer=model.cam_layer(), train_seconds=outcome.train_seconds,
                        metrics={"val_top1": outcome.val_top1, "selected": outcome.selected,
                                 "steps": outcome.steps, **test_metrics(model, start, data, device=device)})
