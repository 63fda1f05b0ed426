"""Fine-tuning a decoupled network with Eq. 12 under a budget, through the shared resumable loop
(``common.loop``: ``checkpoint.pt``, exact resume, finite checks).

With ``finetune_fraction`` > 0 the last share of the steps is a second phase (not in the paper): gates
in their inference form (Eq. 5) and frozen, only the backbone trained, on L_ce alone. With a
``target_mac_reduction`` the sparsity term is the MAC-weighted hinge and, after the last step, one logit
offset for every gate is bisected on training images so that the mean MACs land on the target
(``calibrate_gate_offset``). Every forward runs under the ``precision`` policy (``common.precision``);
gates, losses and MAC counts stay fp32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common import speed
from common.data import BatchLoader, DatasetSplits, ImageTensors
from common.loop import LoopState, TrainLoop, batch_stream, require_finite
from common.method import Budget
from common.precision import Precision, resolve_precision
from common.run import RunDir, Stopwatch

from .config import DecouplingSettings
from .losses import DecouplingObjective
from .model import DecoupledNet

STAGE = "decoupling"  # the one training stage (the checkpoint's stage name)
FIX = "lower --set lr (and controller_lr / mi_head_lr if set)"  # ends every non-finite error


def class_mixed_indices(labels: Tensor | np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices drawn round-robin over the classes (``common.speed.class_mixed_indices``): the
    image-folder test split is sorted by class, so its first images are all of one class."""
    labels = torch.as_tensor(np.asarray(labels))
    if n > len(labels):
        raise ValueError(f"asked for {n} images from a split of {len(labels)}")
    dummy = ImageTensors(torch.zeros(len(labels), 3, 1, 1, dtype=torch.uint8), labels.to(torch.int64))
    return speed.class_mixed_indices(dummy, n, seed).numpy()


@torch.no_grad()
def recalibrate_batch_norm(model: DecoupledNet, loader: BatchLoader, batches: int,
                           precision: Precision | None = None) -> None:
    """Re-estimate every BN's running statistics (cumulative average) on training batches with the gates
    in inference mode (Eq. 5). Training sees noisy SemHash gates, inference sees hard ones; the BN
    statistics of the layers downstream of a gate differ between the two."""
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    precision = precision or resolve_precision("fp32", "cpu")
    for index, (x, _) in enumerate(loader):
        if index >= batches:
            break
        with precision.autocast():
            model(precision.prepare_inputs(x))
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


@dataclass
class TrainOutcome:
    steps: int
    total_steps: int
    train_seconds: float
    stopped_by_time: bool
    last_losses: dict[str, float]
    gate_offset: float = 0.0  # the logit offset calibrate_gate_offset added (0: no MAC target)


def lr_factor(step: int, total_steps: int, settings: DecouplingSettings) -> float:
    """Step schedule: gamma to the number of milestones (fractions of all steps) already passed."""
    passed = sum(step >= round(m * total_steps) for m in settings.lr_milestones)
    return settings.lr_gamma ** passed


def finetune_start(total_steps: int, settings: DecouplingSettings) -> int:
    """First step of the hard-gate fine-tuning phase (``total_steps`` when there is none)."""
    fraction = settings.finetune_fraction
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"finetune_fraction must be in [0, 1), got {fraction}")
    return total_steps - round(fraction * total_steps)


def parameter_groups(model: DecoupledNet, objective: DecouplingObjective, settings: DecouplingSettings
                     ) -> list[dict[str, Any]]:
    """Backbone weights at ``lr``; controllers and L_mi heads (new, randomly initialised) at
    ``controller_lr`` when set."""
    controller_ids = {id(p) for layer in model.gated_layers for p in layer.controller.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in controller_ids]
    controllers = [p for p in model.parameters() if id(p) in controller_ids]
    controller_lr = settings.controller_lr if settings.controller_lr is not None else settings.lr
    head_lr = settings.mi_head_lr if settings.mi_head_lr is not None else controller_lr
    return [{"params": backbone, "base_lr": settings.lr}, {"params": controllers, "base_lr": controller_lr},
            {"params": list(objective.parameters()), "base_lr": head_lr}]


def build_objective(model: DecoupledNet, num_classes: int, settings: DecouplingSettings,
                    input_size: tuple[int, int, int] = (3, 32, 32)) -> DecouplingObjective:
    """Eq. 12 with ``settings`` resolved for the backbone (``DecouplingSettings.resolved``)."""
    target = settings.target_mac_reduction
    return DecouplingObjective(model.layer_channels, num_classes, settings.lambda_m, settings.lambda_k,
                               settings.lambda_s, settings.target_ratio, settings.mi_heads_unscaled,
                               target_mac_reduction=target,
                               dense_macs=float(model.start_macs(input_size)) if target is not None else None)


@torch.no_grad()
def mean_macs(model: DecoupledNet, batches: list[tuple[Tensor, Tensor]], precision: Precision) -> float:
    """Mean per-sample MACs of the inference network (raw Eq. 5 gates, controllers included)."""
    total, count = 0.0, 0
    model.set_precision(precision)
    for x, _ in batches:
        _, macs = model.dynamic_forward(x)
        total, count = total + float(macs.sum()), count + len(macs)
    return total / count


@torch.no_grad()
def calibrate_gate_offset(model: DecoupledNet, images: ImageTensors, target_reduction: float, device: torch.device,
                          precision: Precision, steps: int = 14, logger: logging.Logger | None = None) -> float:
    """Bisect one offset added to every G(s) (``DecoupledNet.shift_gates``) so that the mean MACs of the
    inference network on ``images`` are (1 - target) x the dense start's; apply it and return it. Training
    with the MAC hinge lands near the target; this removes the rest of the miss (the hinge only pushes
    down, and training gates are noisy where inference gates are not)."""
    size = tuple(images.images.shape[1:])
    goal = (1.0 - target_reduction) * model.start_macs(size)
    batches = list(BatchLoader(images, 256, train=False, device=device))
    model.eval()

    def macs_at(offset: float) -> float:
        model.shift_gates(offset)
        try:
            return mean_macs(model, batches, precision)
        finally:
            model.shift_gates(-offset)

    low, high = -1.0, 1.0
    while macs_at(low) > goal and low > -64:
        low *= 2
    while macs_at(high) < goal and high < 64:
        high *= 2
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if macs_at(middle) > goal:
            high = middle
        else:
            low = middle
    offset = high if abs(macs_at(high) - goal) < abs(macs_at(low) - goal) else low
    model.shift_gates(offset)
    achieved = mean_macs(model, batches, precision)
    if logger:
        logger.info("gate offset %+.4f: mean MACs %.3f M on %d training images (target %.3f M, %.1f%% fewer)",
                    offset, achieved / 1e6, len(images), goal / 1e6, 100 * target_reduction)
    return offset


def decoupling_step(model: DecoupledNet, objective: DecouplingObjective, optimizer: torch.optim.Optimizer,
                    precision: Precision, x: Tensor, y: Tensor, size: tuple[int, int, int],
                    finetune_params: list[torch.nn.Parameter] | None = None) -> tuple[Any, Any]:
    """One optimisation step of Eq. 12 (or, with ``finetune_params``, of L_ce on those parameters under hard
    gates); returns (the loss terms, the path record)."""
    finetuning = finetune_params is not None
    model.set_hard_gates(finetuning)
    with precision.autocast():
        logits, record = model.forward_with_paths(precision.prepare_inputs(x))
    macs = model.expected_macs(record.masks, size) if objective.target_mac_reduction is not None else None
    terms = objective(logits, y, record.masks, record.pooled, macs)
    optimizer.zero_grad(set_to_none=True)
    if finetuning:  # frozen controllers: their grads stay None, so SGD leaves them (and their decay) be
        terms.ce.backward(inputs=finetune_params)
    else:
        terms.total.backward()
    optimizer.step()
    return terms, record


def train_decoupled(model: DecoupledNet, objective: DecouplingObjective, data: DatasetSplits, budget: Budget,
                    run: RunDir, settings: DecouplingSettings, device: torch.device, seed: int = 0,
                    logger: logging.Logger | None = None) -> TrainOutcome:
    """Train ``model`` and ``objective`` (its L_mi heads) in place through ``common.loop.TrainLoop``
    (``checkpoint.pt`` every ``checkpoint_every`` steps, at every epoch end, at the last step and when the
    time budget runs out; a resume is bit-identical), then post-process: the gate offset and the BN
    statistics. The post-processing never enters the checkpoint: every launch redoes it from the loop's
    final checkpoint, deterministically (fixed images and batches, the RNG state that checkpoint restores),
    so a kill during it and a re-run end with the same weights. Non-finite weights are refused before the
    caller writes model.pt (``NonFiniteLossError`` naming ``--set lr``)."""
    logger = logger or run.logger("decoupling")
    precision = resolve_precision(settings.precision, device)
    model.to(device)
    model.set_precision(precision)  # layout now; paths / dynamic_forward (calibration) under the policy
    objective.to(device)
    logger.info("precision: %s", precision.describe())
    size = (3, *data.image_size)
    # Weight decay on every parameter, controllers included (as the authors' code does).
    optimizer = torch.optim.SGD(parameter_groups(model, objective, settings), lr=settings.lr,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, seed=seed)
    per_epoch = len(loader) if budget.max_batches is None else min(len(loader), budget.max_batches)
    total_steps = budget.batches(len(loader))
    finetune_from = finetune_start(total_steps, settings)
    backbone_params = optimizer.param_groups[0]["params"]
    # The lr schedule is a function of the step (set in every step), so it needs no state of its own.
    loop = TrainLoop(run, STAGE, {"model": model, "objective": objective, "optimizer": optimizer}, total_steps,
                     seconds=budget.seconds, save_every=settings.checkpoint_every, fix=FIX,
                     where="decoupling train", log=logger, log_every=settings.log_every, device=device)

    def step_fn(step: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        factor = lr_factor(step, total_steps, settings)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        finetuning = step >= finetune_from
        terms, record = decoupling_step(model, objective, optimizer, precision, x, y, size,
                                        backbone_params if finetuning else None)
        done = step + 1
        if done % settings.log_every == 0 or done == total_steps:
            last = terms.as_floats()
            loop.state.extra["last_losses"] = last
            open_share = float(torch.cat([m.detach() for m in record.masks], 1).mean())
            logger.info("step %d/%d lr %.4g %s open %.3f", done, total_steps, optimizer.param_groups[0]["lr"],
                        " ".join(f"{k} {v:.4f}" for k, v in last.items()), open_share)
        return terms.total  # the loop checks it is finite on every step

    def at_epoch_end(done: int, state: LoopState) -> None:
        # The loop saves every checkpoint_every steps, at the end and on time; the epoch ends are this method's.
        if done % per_epoch == 0 and done % settings.checkpoint_every and done < total_steps \
                and not state.stopped_on_time:
            loop.save()

    model.train()
    state = loop.run(step_fn, batches=lambda s: batch_stream(loader, s, per_epoch), on_period=at_epoch_end,
                     period=per_epoch, desc="decoupling train")
    model.set_hard_gates(False)
    clock = Stopwatch(device)
    offset = 0.0
    target = settings.target_mac_reduction
    if target is not None:
        subset = data.train.subset(class_mixed_indices(data.train.labels,
                                                       min(settings.mac_calibration_images, len(data.train)), seed))
        with clock:
            offset += calibrate_gate_offset(model, subset, target, device, precision, logger=logger)
    if settings.bn_recalibration_batches > 0:
        # The epoch after the last step's (as a run that was never interrupted draws next), set explicitly so
        # that a launch that only redoes the post-processing sees the same batches.
        loader.set_epoch(math.ceil(state.step / per_epoch))
        with clock:
            recalibrate_batch_norm(model, loader, settings.bn_recalibration_batches, precision)
        logger.info("BN statistics re-estimated on %d batches under inference-mode gates",
                    settings.bn_recalibration_batches)
        if target is not None:  # new BN statistics move the gates a little: land on the target again
            with clock:
                offset += calibrate_gate_offset(model, subset, target, device, precision, logger=logger)
    require_finite(model.state_dict(), "decoupling: the trained weights", FIX)
    model.eval()
    return TrainOutcome(steps=state.step, total_steps=total_steps, train_seconds=state.seconds + clock.elapsed,
                        stopped_by_time=state.stopped_on_time, last_losses=dict(state.extra.get("last_losses", {})),
                        gate_offset=offset)
