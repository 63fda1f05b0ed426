"""Training PICNN: L = L_dis + lambda L_int (Eq. 3) with Adam, resumable, model selection on validation ACC1;
and the per-step training overhead against the plain backbone, timed side by side."""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone, build_backbone, list_backbones
from common.data import BatchLoader, DatasetSplits
from common.loop import LoopState, TrainLoop, batch_stream, require_finite
from common.method import Budget
from common.precision import Precision, resolve_precision
from common.run import RunDir, Stopwatch, atomic_torch_save, load_checkpoint, pick_device

from .config import PicnnSettings
from .evaluate import collect_pooled, interpretation_accuracies
from .losses import picnn_losses
from .model import PicnnNet


@dataclass
class TrainReport:
    train_seconds: float
    steps: int
    total_steps: int
    best_val_top1: float | None
    best_step: int | None
    stopped_on_time: bool
    history: list[dict[str, float]] = field(default_factory=list)


def build_picnn(backbone: str, num_classes: int, filters: int | None = None, weights: str | None = None, *,
                target_layer: str = "added") -> PicnnNet:
    """A PICNN model on the named common backbone, optionally loading the backbone's pretrained weights;
    ``target_layer`` / ``filters`` as in ``PicnnSettings`` (default: an added conv of round(12.8 K) filters)."""
    return PicnnNet(build_backbone(backbone, num_classes, weights), num_classes, filters, target_layer)


def make_optimizer(model: PicnnNet, settings: PicnnSettings) -> torch.optim.Adam:
    """Adam with three groups: backbone, new layers (target conv + classifier) and P (no weight decay)."""
    p_params = list(model.correspondence.parameters())
    unused = {id(p) for p in model.unused_parameters()}
    head_ids = {id(p) for m in (model.target, model.classifier) for p in m.parameters()}
    backbone = [p for p in model.backbone.parameters() if id(p) not in head_ids and id(p) not in unused]
    head = [p for m in (model.target, model.classifier) for p in m.parameters()]
    groups = [
        {"params": backbone, "lr": settings.lr * settings.backbone_lr_scale, "weight_decay": settings.weight_decay},
        {"params": head, "lr": settings.lr, "weight_decay": settings.weight_decay},
        {"params": p_params, "lr": settings.p_lr or settings.lr, "weight_decay": 0.0},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]])


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, final_scale: float
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        progress_ = min(step, total_steps) / max(1, total_steps)
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def validate(model: PicnnNet, data: DatasetSplits, settings: PicnnSettings, device: torch.device,
             seed: int, policy: Precision | None = None) -> dict[str, float]:
    """ACC1/ACC2/ACC3 on the validation split (one draw: ACC1 selects the weights, the rest informs the log)."""
    pooled, labels = collect_pooled(model, data.val, 256, device, policy)
    return interpretation_accuracies(pooled, labels, model.classifier, model.correspondence(),
                                     model.correspondence.logits, assignment=settings.assignment, draws=1,
                                     seed=seed)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# The setting a diverged run should change, ending every non-finite error (loss, checkpoint or model.pt).
DIVERGED_FIX = "lower --set lr (the Adam learning rate)"


def train_picnn(model: PicnnNet, data: DatasetSplits, budget: Budget, run: RunDir, settings: PicnnSettings,
                device: torch.device, seed: int = 0) -> TrainReport:
    """Train ``model`` in place for ``budget`` through the shared loop (``common.loop.TrainLoop``); resume from
    ``run/checkpoint.pt`` if present.

    The model finally holds the weights with the best validation ACC1 among the evaluations made at the end
    of every epoch (the last weights when there is no validation split); the caller writes them to model.pt.
    """
    log = run.logger("picnn")
    model.to(device)
    policy = resolve_precision(settings.precision, device)
    policy.prepare_model(model)
    log.info("precision: %s", policy.describe())
    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, augment=settings.augment,
                         seed=seed)
    if len(loader) == 0:
        raise ValueError("the training split is empty")
    per_epoch = len(loader) if budget.max_batches is None else min(len(loader), budget.max_batches)
    total = budget.batches(len(loader))
    optimizer = make_optimizer(model, settings)
    scheduler = cosine_schedule(optimizer, total, settings.final_lr_scale)
    # The loop restores model, optimiser, scheduler, step, training seconds, every RNG and ``extra``.
    loop = TrainLoop(run, "picnn", {"model": model, "optimizer": optimizer, "scheduler": scheduler}, total,
                     seconds=budget.seconds, save_every=settings.checkpoint_every, fix=DIVERGED_FIX,
                     where="PICNN training", device=device)
    extra = loop.state.extra
    for key, empty in (("best_val_top1", None), ("best_step", None), ("best_state", None), ("history", [])):
        extra.setdefault(key, empty)
    if loop.resumed:
        log.info("resumed from step %d of %d", loop.state.step, total)

    def step_fn(step: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        x = policy.prepare_inputs(x)
        with policy.autocast():
            out = model.pathways(x, y, assignment=settings.assignment, cluster_index=settings.cluster_index,
                                 gumbel_temperature=settings.gumbel_temperature)
        loss, l_dis, l_int = picnn_losses(out, y, settings.lam)  # float32 losses of the logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % settings.log_every == 0 or done == 1:
            log.info("step %d/%d L %.4f L_dis %.4f L_int %.4f", done, total, loss.item(), l_dis.item(),
                     l_int.item())
        return loss

    def end_of_epoch(done: int, state: LoopState) -> None:
        """Validation at the end of every epoch (and when time runs out); the best ACC1 keeps its weights."""
        entry: dict[str, float] = {"step": done, "train_seconds": state.seconds}
        if len(data.val):
            entry.update({f"val_{k}": v for k, v in validate(model, data, settings, device, seed, policy).items()})
            if extra["best_val_top1"] is None or entry["val_acc1"] > extra["best_val_top1"]:
                extra.update(best_val_top1=entry["val_acc1"], best_step=done, best_state=_cpu_state(model))
        extra["history"].append(entry)
        log.info("validation %s", entry)
        if done % settings.checkpoint_every and done < total and not state.stopped_on_time:
            loop.save()  # one checkpoint per epoch too (unless the loop writes one now), so no validation reruns

    model.train()
    first = loop.state.step
    state = loop.run(step_fn, batches=lambda s: batch_stream(loader, s, per_epoch), on_period=end_of_epoch,
                     period=per_epoch, desc="picnn train")
    if state.stopped_on_time and state.step > first:
        log.info("time budget of %.0f s reached at step %d", budget.seconds, state.step)
    if extra["best_state"] is not None:
        model.load_state_dict(extra["best_state"])
    return TrainReport(train_seconds=state.seconds, steps=state.step, total_steps=total,
                       best_val_top1=extra["best_val_top1"], best_step=extra["best_step"],
                       stopped_on_time=state.stopped_on_time, history=copy.deepcopy(extra["history"]))


def save_model(model: PicnnNet, run: RunDir, meta: dict[str, Any]) -> None:
    """model.pt: the selected weights plus what is needed to rebuild the network (refused, with nothing
    written, when a weight is NaN or infinite)."""
    require_finite(model.state_dict(), f"PICNN {run.model_path.name}", DIVERGED_FIX)
    atomic_torch_save({"state_dict": model.state_dict(), "meta": meta}, run.model_path)


def registry_name(backbone: Backbone) -> str | None:
    """The ``common.backbones`` name that builds ``backbone``'s architecture (the same parameter and buffer
    names and shapes), so that model.pt can name what ``load_run`` rebuilds; None for a backbone outside the
    registry."""
    wanted = {k: v.shape for k, v in backbone.state_dict().items()}
    for name in list_backbones():
        built = build_backbone(name, backbone.classifier.out_features).state_dict()
        if built.keys() == wanted.keys() and all(built[k].shape == wanted[k] for k in built):
            return name
    return None


def load_run(path: str | os.PathLike, *, device: torch.device | str | None = None) -> PicnnNet:
    """The trained network of a run directory written by ``python -m picnn train`` or ``run_method``: the
    selected weights of its model.pt (read with ``weights_only=True``), pixels in [0, 1] -> logits (the
    discrimination pathway, Eq. 1), in eval mode, on ``device`` (None: CUDA when available, else CPU)."""
    model_path = Path(path) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} does not exist; run `python -m picnn train --out {path}` to "
                                "completion first")
    blob = load_checkpoint(model_path, map_location="cpu", keys=("meta", "state_dict"))
    meta = blob["meta"]
    if not meta.get("backbone"):
        raise ValueError(f"{model_path}: its backbone ({meta.get('backbone_class', '?')}) is not one of "
                         f"common.backbones ({', '.join(list_backbones())}), so load_run cannot rebuild it")
    # Runs saved before target_layer existed name the architecture by added_target_conv alone.
    target_layer = meta.get("target_layer") or ("added" if meta.get("added_target_conv", True) else "last_stage")
    filters = meta.get("filters") if target_layer == "added" else None
    model = build_picnn(meta["backbone"], meta["num_classes"], filters, target_layer=target_layer)
    model.load_state_dict(blob["state_dict"])
    return model.to(pick_device(None) if device is None else torch.device(device)).eval()


def _timed(step: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor, clock_device: torch.device) -> float:
    watch = Stopwatch(clock_device)
    with watch:
        step(x, y)
    return watch.elapsed


def step_overhead(model: PicnnNet, plain: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                  settings: PicnnSettings, device: torch.device, warmup: int = 3) -> dict[str, Any]:
    """Seconds per training step of PICNN (both pathways, Eq. 3, backward, Adam) against the plain backbone
    (cross-entropy, backward, Adam), timed in one process, interleaved on the same batches, after warm-up.

    ``model`` and ``plain`` should hold the same starting weights; both are trained in place. Each round
    times one PICNN step and one plain step on the same batch, alternating which goes first. Returns the
    median seconds of each, their ratio and the median of the per-round ratios.
    """
    if len(batches) <= warmup:
        raise ValueError(f"need more than {warmup} batches (warm-up), got {len(batches)}")
    policy = resolve_precision(settings.precision, device)
    policy.prepare_model(model.to(device).train())
    policy.prepare_model(plain.to(device).train())
    picnn_opt = make_optimizer(model, settings)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def picnn_step(x: Tensor, y: Tensor) -> None:
        with policy.autocast():
            out = model.pathways(x, y, assignment=settings.assignment, cluster_index=settings.cluster_index,
                                 gumbel_temperature=settings.gumbel_temperature)
        loss, _, _ = picnn_losses(out, y, settings.lam)
        picnn_opt.zero_grad(set_to_none=True)
        loss.backward()
        picnn_opt.step()

    def plain_step(x: Tensor, y: Tensor) -> None:
        with policy.autocast():
            logits = plain(x)
        loss = F.cross_entropy(logits.float(), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    picnn_times, plain_times = [], []
    for index, (x, y) in enumerate(batches):
        x, y = policy.prepare_inputs(x.to(device)), y.to(device)
        first, second = (picnn_step, plain_step) if index % 2 == 0 else (plain_step, picnn_step)
        t_first = _timed(first, x, y, device)
        t_second = _timed(second, x, y, device)
        t_picnn, t_plain = (t_first, t_second) if index % 2 == 0 else (t_second, t_first)
        if index >= warmup:
            picnn_times.append(t_picnn)
            plain_times.append(t_plain)
    picnn_median, plain_median = statistics.median(picnn_times), statistics.median(plain_times)
    return {"picnn_step_seconds": picnn_median, "plain_step_seconds": plain_median,
            "overhead_percent": 100.0 * (picnn_median / plain_median - 1.0),
            "median_round_ratio": statistics.median(a / b for a, b in zip(picnn_times, plain_times)),
            "timed_steps": len(picnn_times), "warmup_steps": warmup, "batch_size": int(batches[0][0].shape[0]),
            "threads": torch.get_num_threads(), "precision": policy.describe()}
