"""Fine-tuning a decoupled network with Eq. 12 under a budget, resumable from ``checkpoint.pt``.

With ``finetune_fraction`` > 0 the last share of the steps is a second phase (not in the paper): gates
in their inference form (Eq. 5) and frozen, only the backbone trained, on L_ce alone. With a
``target_mac_reduction`` the sparsity term is the MAC-weighted hinge and, after the last step, one logit
offset for every gate is bisected on training images so that the mean MACs land on the target
(``calibrate_gate_offset``). Every forward runs under the ``precision`` policy (``common.precision``);
gates, losses and MAC counts stay fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from common.data import BatchLoader, DatasetSplits, ImageTensors
from common.method import Budget
from common.precision import Precision, resolve_precision
from common.run import RunDir, Stopwatch, atomic_torch_save, check_finite, load_checkpoint, progress

from .config import DecouplingSettings
from .losses import DecouplingObjective
from .model import DecoupledNet


def _batches_from(loader: BatchLoader, step: int, per_epoch: int):
    """Batches from global step ``step`` on, epoch after epoch; a resumed run sees the same sequence."""
    epoch, position = divmod(step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= per_epoch:
                break
            if index >= position:
                yield batch
        epoch, position = epoch + 1, 0


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


def train_decoupled(model: DecoupledNet, objective: DecouplingObjective, data: DatasetSplits, budget: Budget,
                    run: RunDir, settings: DecouplingSettings, device: torch.device, seed: int = 0,
                    logger: logging.Logger | None = None) -> TrainOutcome:
    """Train ``model`` and ``objective`` (its L_mi heads) in place. Saves ``checkpoint.pt`` every
    ``checkpoint_every`` steps, at every epoch end and when the time budget runs out; resumes from it."""
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
    step, elapsed, last = 0, 0.0, {}
    if run.checkpoint_path.is_file():
        state = load_checkpoint(run.checkpoint_path, map_location=device)
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, last = state["step"], state["train_seconds"], state.get("last_losses", {})
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed at step %d of %d", step, total_steps)

    def save() -> None:
        atomic_torch_save({"model": model.state_dict(), "objective": objective.state_dict(),
                           "optimizer": optimizer.state_dict(), "step": step, "total_steps": total_steps,
                           "train_seconds": clock.elapsed, "last_losses": last,
                           "torch_rng": torch.get_rng_state()}, run.checkpoint_path)

    clock = Stopwatch(device, elapsed)
    stopped_by_time = False
    model.train()
    bar = progress(range(step, total_steps), "decoupling train", total=total_steps - step)
    for _, (x, y) in zip(bar, _batches_from(loader, step, per_epoch)):
        if budget.seconds is not None and clock.elapsed >= budget.seconds:
            stopped_by_time = True
            break
        with clock:
            factor = lr_factor(step, total_steps, settings)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            finetuning = step >= finetune_from
            model.set_hard_gates(finetuning)
            with precision.autocast():
                logits, record = model.forward_with_paths(precision.prepare_inputs(x))
            macs = model.expected_macs(record.masks, size) if objective.target_mac_reduction is not None else None
            terms = objective(logits, y, record.masks, record.pooled, macs)
            optimizer.zero_grad(set_to_none=True)
            if finetuning:  # frozen controllers: their grads stay None, so SGD leaves them (and their decay) be
                terms.ce.backward(inputs=backbone_params)
            else:
                terms.total.backward()
            optimizer.step()
        step += 1
        if step % settings.log_every == 0 or step == total_steps:
            check_finite(terms.total, f"decoupling step {step}")
            last = terms.as_floats()
            open_share = float(torch.cat([m.detach() for m in record.masks], 1).mean())
            logger.info("step %d/%d lr %.4g %s open %.3f", step, total_steps, optimizer.param_groups[0]["lr"],
                        " ".join(f"{k} {v:.4f}" for k, v in last.items()), open_share)
        if step % settings.checkpoint_every == 0 or step % per_epoch == 0:
            save()
    model.set_hard_gates(False)
    if stopped_by_time:
        logger.info("time budget of %.0f s reached at step %d", budget.seconds, step)
    offset = 0.0
    target = settings.target_mac_reduction
    if target is not None:
        from .evaluate import class_mixed_indices

        subset = data.train.subset(class_mixed_indices(data.train.labels,
                                                       min(settings.mac_calibration_images, len(data.train)), seed))
        with clock:
            offset += calibrate_gate_offset(model, subset, target, device, precision, logger=logger)
    if settings.bn_recalibration_batches > 0:
        with clock:
            recalibrate_batch_norm(model, loader, settings.bn_recalibration_batches, precision)
        logger.info("BN statistics re-estimated on %d batches under inference-mode gates",
                    settings.bn_recalibration_batches)
        if target is not None:  # new BN statistics move the gates a little: land on the target again
            with clock:
                offset += calibrate_gate_offset(model, subset, target, device, precision, logger=logger)
    save()
    model.eval()
    return TrainOutcome(steps=step, total_steps=total_steps, train_seconds=clock.elapsed,
                        stopped_by_time=stopped_by_time, last_losses=last, gate_offset=offset)
