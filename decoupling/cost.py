"""Training cost of Decoupling against the cross-entropy baseline on the same machine, side by side.

One process builds both from the same start: the decoupled network with its Eq. 12 step (controllers,
SemHash, the L_mi heads, L_kl, the MAC hinge: ``train.decoupling_step``) and the plain backbone with a
cross-entropy step, each with the same SGD settings, batch size and precision policy. The two steps are
timed in alternation on the same batches after a warm-up (median seconds per step), so the machine's load
falls on both alike. The post-training calibration (gate offset and BN re-estimation, once per run) is timed
once and added to a projected epoch: ``epoch_ratio`` = (steps x Decoupling step + calibration) / (steps x
cross-entropy step). The alternating timing and the cross-entropy step are ``common.cost``'s.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from common.backbones import build_backbone
from common.cost import cross_entropy_step, time_steps, timed_call
from common.data import BatchLoader, DatasetSplits
from common.loop import batch_stream
from common.precision import resolve_precision

from .config import DecouplingSettings
from .model import DecoupledNet
from .train import (
    build_objective,
    calibrate_gate_offset,
    class_mixed_indices,
    decoupling_step,
    parameter_groups,
    recalibrate_batch_norm,
)


def training_cost(backbone: str, weights: str | None, data: DatasetSplits, settings: DecouplingSettings,
                  device: torch.device, steps: int = 20, seed: int = 0, warmup: int = 3) -> dict[str, Any]:
    """Median seconds per step of Decoupling and of cross-entropy training, interleaved; see the module."""
    torch.manual_seed(seed)
    start = build_backbone(backbone, data.num_classes, weights)
    precision = resolve_precision(settings.precision, device)
    size = (3, *data.image_size)
    model = DecoupledNet(copy.deepcopy(start), settings.reduction, settings.init_bias, settings.controller_init)
    model.to(device).set_precision(precision)
    objective = build_objective(model, data.num_classes, settings, size).to(device)
    dec_opt = torch.optim.SGD(parameter_groups(model, objective, settings), lr=settings.lr,
                              momentum=settings.momentum, weight_decay=settings.weight_decay)
    ce_step = cross_entropy_step(copy.deepcopy(start).to(device), precision, lr=settings.lr,
                                 momentum=settings.momentum, weight_decay=settings.weight_decay)
    model.train()

    def dec_step(x, y) -> None:
        decoupling_step(model, objective, dec_opt, precision, x, y, size)

    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, seed=seed)
    medians = time_steps({"decoupling": dec_step, "cross_entropy": ce_step}, batch_stream(loader, 0), steps,
                         warmup=warmup, device=device)
    dec, ce = medians["decoupling"], medians["cross_entropy"]

    def post_training() -> None:  # the once-per-run post-processing of train.train_decoupled
        subset = None
        if settings.target_mac_reduction is not None:
            subset = data.train.subset(class_mixed_indices(
                data.train.labels, min(settings.mac_calibration_images, len(data.train)), seed))
            calibrate_gate_offset(model, subset, settings.target_mac_reduction, device, precision)
        if settings.bn_recalibration_batches > 0:
            recalibrate_batch_norm(model, loader, settings.bn_recalibration_batches, precision)
            if subset is not None and settings.target_mac_reduction is not None:
                calibrate_gate_offset(model, subset, settings.target_mac_reduction, device, precision)

    post = timed_call(post_training, device=device)  # timed once, on this half-trained network
    per_epoch = len(loader)
    return {"threads": torch.get_num_threads(), "precision": precision.describe(), "batch_size": settings.batch_size,
            "timed_steps": steps, "decoupling_step_s": dec, "cross_entropy_step_s": ce, "step_ratio": dec / ce,
            "steps_per_epoch": per_epoch, "post_training_s": post,
            "epoch_ratio": (per_epoch * dec + post) / (per_epoch * ce)}
