"""Fine-tuning a decoupled network with Eq. 12 under a budget, resumable from ``checkpoint.pt``.

With ``finetune_fraction`` > 0 the last share of the steps is a second phase (not in the paper): gates
in their inference form (Eq. 5) and frozen, only the backbone trained, on L_ce alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from common.backbones import build_backbone
from common.data import BatchLoader, DatasetSplits, default_val_source, load_dataset
from common.method import Budget
from common.run import (
    RunDir,
    Stopwatch,
    atomic_torch_save,
    check_finite,
    load_checkpoint,
    pick_device,
    progress,
    seed_everything,
)

from .config import resolve_settings
from .losses import DecouplingObjective
from .model import DecoupledNet, save_decoupled


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
def recalibrate_batch_norm(model: DecoupledNet, loader: BatchLoader, batches: int) -> None:
    """Re-estimate every BN's running statistics (cumulative average) on training batches with the gates
    in inference mode (Eq. 5). Training sees noisy SemHash gates, inference sees hard ones; the BN
    statistics of the layers downstream of a gate differ between the two."""
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for index, (x, _) in enumerate(loader):
        if index >= batches:
            break
        model(x)
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


def lr_factor(step: int, total_steps: int, settings: dict[str, Any]) -> float:
    """Step schedule: gamma to the number of milestones (fractions of all steps) already passed."""
    passed = sum(step >= round(m * total_steps) for m in settings["lr_milestones"])
    return settings["lr_gamma"] ** passed


def finetune_start(total_steps: int, settings: dict[str, Any]) -> int:
    """First step of the hard-gate fine-tuning phase (``total_steps`` when there is none)."""
    fraction = settings["finetune_fraction"]
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"finetune_fraction must be in [0, 1), got {fraction}")
    return total_steps - round(fraction * total_steps)


def parameter_groups(model: DecoupledNet, objective: DecouplingObjective, settings: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """Backbone weights at ``lr``; controllers and L_mi heads (new, randomly initialised) at
    ``controller_lr`` when set."""
    controller_ids = {id(p) for layer in model.gated_layers for p in layer.controller.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in controller_ids]
    controllers = [p for p in model.parameters() if id(p) in controller_ids]
    controller_lr = settings["controller_lr"] if settings["controller_lr"] is not None else settings["lr"]
    head_lr = settings["mi_head_lr"] if settings["mi_head_lr"] is not None else controller_lr
    return [{"params": backbone, "base_lr": settings["lr"]}, {"params": controllers, "base_lr": controller_lr},
            {"params": list(objective.parameters()), "base_lr": head_lr}]


def build_objective(model: DecoupledNet, num_classes: int, settings: dict[str, Any]) -> DecouplingObjective:
    return DecouplingObjective(model.layer_channels, num_classes, settings["lambda_m"], settings["lambda_k"],
                               settings["lambda_s"], settings["target_ratio"], settings["mi_heads_unscaled"])


def train_decoupled(model: DecoupledNet, objective: DecouplingObjective, data: DatasetSplits, budget: Budget,
                    run: RunDir, settings: dict[str, Any], device: torch.device, seed: int = 0,
                    logger: logging.Logger | None = None) -> TrainOutcome:
    """Train ``model`` and ``objective`` (its L_mi heads) in place. Saves ``checkpoint.pt`` every
    ``checkpoint_every`` steps, at every epoch end and when the time budget runs out; resumes from it."""
    logger = logger or run.logger("decoupling")
    model.to(device)
    objective.to(device)
    # Weight decay on every parameter, controllers included (as the authors' code does).
    optimizer = torch.optim.SGD(parameter_groups(model, objective, settings), lr=settings["lr"],
                                momentum=settings["momentum"], weight_decay=settings["weight_decay"])
    loader = BatchLoader(data.train, settings["batch_size"], train=True, device=device, seed=seed)
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
            logits, record = model.forward_with_paths(x)
            terms = objective(logits, y, record.masks, record.pooled)
            optimizer.zero_grad(set_to_none=True)
            if finetuning:  # frozen controllers: their grads stay None, so SGD leaves them (and their decay) be
                terms.ce.backward(inputs=backbone_params)
            else:
                terms.total.backward()
            optimizer.step()
        step += 1
        if step % settings["log_every"] == 0 or step == total_steps:
            check_finite(terms.total, f"decoupling step {step}")
            last = terms.as_floats()
            open_share = float(torch.cat([m.detach() for m in record.masks], 1).mean())
            logger.info("step %d/%d lr %.4g %s open %.3f", step, total_steps, optimizer.param_groups[0]["lr"],
                        " ".join(f"{k} {v:.4f}" for k, v in last.items()), open_share)
        if step % settings["checkpoint_every"] == 0 or step % per_epoch == 0:
            save()
    model.set_hard_gates(False)
    if stopped_by_time:
        logger.info("time budget of %.0f s reached at step %d", budget.seconds, step)
    if settings["bn_recalibration_batches"] > 0:
        with clock:
            recalibrate_batch_norm(model, loader, settings["bn_recalibration_batches"])
        logger.info("BN statistics re-estimated on %d batches under inference-mode gates",
                    settings["bn_recalibration_batches"])
    save()
    model.eval()
    return TrainOutcome(steps=step, total_steps=total_steps, train_seconds=clock.elapsed,
                        stopped_by_time=stopped_by_time, last_losses=last)


def train_command(args: Any, recipe: dict[str, Any], overrides: dict[str, Any]) -> int:
    """``python -m decoupling train``: recipe + flags -> RUN/{config.json, checkpoint.pt, model.pt}."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    backbone = args.backbone or recipe.get("backbone")
    dataset = args.dataset or recipe.get("dataset")
    epochs = args.epochs if args.epochs is not None else recipe.get("epochs")
    if not backbone or not dataset or epochs is None:
        raise ValueError("train needs --backbone, --dataset and --epochs (or a --config that sets them)")
    seconds = args.seconds if args.seconds is not None else recipe.get("seconds")
    max_batches = args.max_batches if args.max_batches is not None else recipe.get("max_batches")
    settings = resolve_settings(backbone, {**recipe.get("settings", {}), **overrides})
    device = pick_device(args.device)
    seed_everything(args.seed)
    run = RunDir(args.out)
    val_source = default_val_source(args.weights is not None) if args.val_source == "auto" else args.val_source
    config = {"backbone": backbone, "dataset": dataset, "data_root": args.data_root, "weights": args.weights,
              "val_source": val_source,
              "epochs": epochs, "seconds": seconds, "max_batches": max_batches, "seed": args.seed,
              "settings": settings}
    if run.config_path.is_file() and run.checkpoint_path.is_file():
        previous = run.read_config()
        changed = [k for k in ("backbone", "dataset", "settings", "seed", "val_source")
                   if previous.get(k, "train" if k == "val_source" else None) != config[k]]
        if changed:
            raise ValueError(f"{run.path} holds a run with different {changed}; use another --out to start afresh")
    run.write_config(config)
    run.write_environment(device)
    logger = run.logger("decoupling")
    data = load_dataset(dataset, args.data_root, val_source=val_source)
    start = build_backbone(backbone, data.num_classes, args.weights)
    model = DecoupledNet(start, settings["reduction"], settings["init_bias"],
                         settings["controller_init"])
    objective = build_objective(model, data.num_classes, settings)
    logger.info("decoupling %s on %s: %d gated layers, %d filters", backbone, dataset, len(model.gated_layers),
                sum(model.layer_channels))
    outcome = train_decoupled(model, objective, data, Budget(epochs, seconds, max_batches), run, settings, device,
                              args.seed, logger)
    save_decoupled(model, run.model_path, backbone, data.num_classes, settings["reduction"], settings["init_bias"],
                         settings["controller_init"])
    logger.info("trained %d/%d steps in %.1f s%s", outcome.steps, outcome.total_steps, outcome.train_seconds,
                " (time budget reached)" if outcome.stopped_by_time else "")
    print(f"trained {outcome.steps}/{outcome.total_steps} steps in {outcome.train_seconds:.1f} s; "
          f"model in {run.model_path}")
    return 0
