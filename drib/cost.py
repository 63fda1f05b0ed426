"""Training cost of DRIB against the cross-entropy baseline on the same machine, side by side.

One process builds both from the same start: the DRIB network as ``train.train_run`` builds it (gates, code
books initialised, ``target_mac_reduction`` mapped to the regulariser's target) with its optimisers and step
(``train.drib_step``), and the plain backbone with ``common.cost.cross_entropy_step`` under the recipe's
backbone SGD settings (learning rate, momentum, weight decay). ``common.cost.time_steps`` times, in
alternation on the same batches after a warm-up (median seconds per step): DRIB's decision-training step,
its fine-tuning step (argmax decisions, the backbone alone), the cross-entropy step and, on request, the
former two-backward decision step (``separate_backward``). The machine's load falls on all of them alike.

The projected run of ``epochs`` epochs (1 is the benchmark main job's) counts:

- steps: ``train.train``'s split of the run's steps into decision-training steps and the recipe's
  ``finetune_fraction`` of fine-tuning steps, each at its median; the cross-entropy run the same number of
  cross-entropy steps (``step_ratio``);
- DRIB's MAC calibrations (``target_mac_reduction``): the one when the decisions freeze and the one of the
  selected model, timed once each on this network after the timed steps (the second is then usually the
  within-tolerance check; in a run it may bisect again), and a validation more when the second one changes
  the code books;
- one validation per epoch on both sides, each timed once (``train.validate``; ``evaluate_top1`` of the plain
  network at batch 256, as the benchmark's baseline validates).

``epoch_ratio`` = DRIB run / cross-entropy run. Not counted on either side: batch loading (a few ms a batch),
checkpoint writes and logging, the baseline's validation of its start (once per run; leaving it out makes the
ratio larger, not smaller), and DRIB's once-per-run work outside the epochs: the code-book initialisation
(reported as ``init_s``) and the verification module's bottleneck statistics after training.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from common.backbones import build_backbone
from common.cost import cross_entropy_step, time_steps, timed_call
from common.data import BatchLoader, DatasetSplits
from common.loop import batch_stream
from common.method import Budget
from common.precision import resolve_precision
from common.training import evaluate_top1

from .config import DribSettings
from .mac_target import calibrate_codebooks
from .train import CALIBRATION_IMAGES, build_network, drib_step, make_optimisers, validate


def training_cost(backbone: str, weights: str | None, data: DatasetSplits, config: DribSettings,
                  device: torch.device, *, steps: int = 20, warmup: int = 3, epochs: float = 1.0, seed: int = 0,
                  baseline_precision: str | None = None, separate_backward: bool = False) -> dict[str, Any]:
    """DRIB's and cross-entropy's median seconds per step, interleaved, and the projected run; see the module.
    ``baseline_precision`` (default: DRIB's ``train.precision``) is the policy of the cross-entropy step."""
    if separate_backward and config.decision.alternate:
        raise ValueError("separate_backward times the one-forward step: it needs decision.alternate = false")
    torch.manual_seed(seed)
    start = build_backbone(backbone, data.num_classes, weights)
    built: dict[str, Any] = {}

    def build() -> None:  # as train.train_run: target_mac_reduction mapped, code books initialised
        built["net"], built["config"] = build_network(copy.deepcopy(start), data, config, device, seed)

    init = timed_call(build, device=device)
    net, config = built["net"], built["config"]
    t, d = config.train, config.decision
    policy = resolve_precision(t.precision, device)
    policy.prepare_model(net)
    gate_opt, backbone_opt = make_optimisers(net, config)
    ce_policy = resolve_precision(baseline_precision or t.precision, device)
    plain = copy.deepcopy(start).to(device)
    ce_step = cross_entropy_step(plain, ce_policy, lr=t.backbone_lr, momentum=t.momentum,
                                 weight_decay=t.weight_decay)

    def drib(finetuning: bool, separate: bool = False):
        def step(x, y) -> None:
            drib_step(net, gate_opt, backbone_opt, policy, config, x, y, finetuning=finetuning, tau=d.tau_start,
                      lr=t.backbone_lr, separate_backward=separate)
        return step

    loader = BatchLoader(data.train, t.batch_size, train=True, device=device, augment=False, seed=seed)
    per_epoch = len(loader)
    total = Budget(epochs=epochs).batches(per_epoch)
    finetune_from = round(total * (1 - t.finetune_fraction)) if t.finetune_fraction > 0 else total
    timed = {"decision": drib(False), "cross_entropy": ce_step}
    if total > finetune_from:
        timed["finetune"] = drib(True)
    if separate_backward:
        timed["separate_backward"] = drib(False, separate=True)
    medians = time_steps(timed, batch_stream(loader, 0), steps, warmup=warmup, device=device)
    dec, ce, ft = medians["decision"], medians["cross_entropy"], medians.get("finetune", 0.0)
    drib_steps_s = finetune_from * dec + (total - finetune_from) * ft
    ce_steps_s = total * ce

    calibrations: list[dict[str, float]] = []
    calibration_s: list[float] = []
    if config.target_mac_reduction is not None:
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 7))  # as train.train
        images = data.train.subset(pick[:CALIBRATION_IMAGES]).images.to(device).float() / 255
        for _ in ("decisions frozen", "selected model"):
            calibration_s.append(timed_call(
                lambda: calibrations.append(calibrate_codebooks(net, images, float(config.target_mac_reduction))),
                device=device))
    val_loader = BatchLoader(data.val, 256, train=False, device=device)
    validation_s = timed_call(validate, net, val_loader, device=device)
    ce_validation_s = timed_call(evaluate_top1, plain, val_loader, "val", device=device)
    epochs_run = math.ceil(total / per_epoch)  # on_period: every epoch's end and the last step
    drib_validations = epochs_run + (1 if calibrations and calibrations[-1]["scale"] != 1.0 else 0)
    drib_run_s = drib_steps_s + sum(calibration_s) + drib_validations * validation_s
    ce_run_s = ce_steps_s + epochs_run * ce_validation_s
    report: dict[str, Any] = {
        "threads": torch.get_num_threads(), "device": str(device), "precision": policy.describe(),
        "baseline_precision": ce_policy.describe(), "batch_size": t.batch_size, "timed_steps": steps,
        "warmup": warmup, "decision_step_s": dec, "finetune_step_s": medians.get("finetune"),
        "cross_entropy_step_s": ce, "decision_step_ratio": dec / ce,
        "finetune_step_ratio": None if "finetune" not in medians else ft / ce}
    if separate_backward:
        report.update(separate_backward_step_s=medians["separate_backward"],
                      separate_backward_step_ratio=medians["separate_backward"] / ce)
    report.update({
        "epochs": epochs, "steps_per_epoch": per_epoch, "steps": total, "decision_steps": finetune_from,
        "finetune_steps": total - finetune_from, "step_ratio": drib_steps_s / ce_steps_s,
        "calibration_s": calibration_s, "calibrations": calibrations, "validation_s": validation_s,
        "cross_entropy_validation_s": ce_validation_s, "drib_validations": drib_validations,
        "cross_entropy_validations": epochs_run, "drib_run_s": drib_run_s, "cross_entropy_run_s": ce_run_s,
        "epoch_ratio": drib_run_s / ce_run_s, "init_s": init})
    return report
