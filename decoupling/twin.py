"""The static twin of a decoupled network (a control, not in the paper): the deployed network with every
dynamic filter fixed to its majority state on class-mixed training images, so that one fixed set of
filters runs for every input. (a) as it is: the decoupled weights under the fixed states; (b) fine-tuned:
the backbone trained on L_ce under the fixed states for the same budget as the decoupled network, through
``common.loop`` (its own run directory, ``static_twin/``). Beside the decoupled network it answers whether
computing a path per input buys accuracy at equal cost (evaluation-protocol.md: a dynamic network's twin).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from common.data import BatchLoader, DatasetSplits
from common.loop import TrainLoop, batch_stream, require_finite
from common.method import Budget
from common.precision import resolve_precision
from common.run import RunDir
from common.stats import paired_difference as mean_and_se

from .config import DecouplingSettings
from .model import DecoupledNet
from .train import FIX, lr_factor

STAGE = "static_twin"
TWIN_DIR = "static_twin"  # the twin's run directory inside the decoupled run's


def static_twin(model: DecoupledNet, codes: Tensor, threshold: float = 0.5) -> DecoupledNet:
    """A copy of ``model`` whose every gated filter is fixed to its majority state in ``codes`` (calibration
    paths of training images, raw Eq. 5 gates): on where it fires for more than ``threshold`` of them."""
    twin = copy.deepcopy(model)
    twin.freeze_to_majority(torch.as_tensor(codes), threshold)
    return twin.eval()


@torch.no_grad()
def macs_matched_threshold(model: DecoupledNet, codes: Tensor, target_macs: float,
                           input_size: tuple[int, int, int], steps: int = 30) -> float:
    """The smallest firing-rate threshold whose static twin costs at most ``target_macs`` per input (the
    decoupled network's mean): the filters the calibration images use most are kept, as a static pruning at
    the decoupled network's cost. A static twin costs the same for every input, so one input counts it."""
    probe = copy.deepcopy(model)
    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)

    def macs_at(threshold: float) -> float:
        probe.freeze_to_majority(torch.as_tensor(codes), threshold)
        return float(probe.dynamic_forward(x)[1][0])

    low, high = 0.0, 1.0 - 1e-9  # the twin's MACs fall as the threshold rises
    if macs_at(low) <= target_macs:
        return low
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if macs_at(middle) <= target_macs:
            high = middle
        else:
            low = middle
    return high


def finetune_static_twin(twin: DecoupledNet, data: DatasetSplits, budget: Budget, run: RunDir,
                         settings: DecouplingSettings, device: torch.device, seed: int = 0,
                         logger: logging.Logger | None = None) -> tuple[int, float]:
    """Train the twin's backbone on L_ce under its fixed states (hard gates: the controllers' outputs are
    overridden by the frozen states, so only the backbone learns) with the decoupled network's optimiser,
    lr schedule, batch size and budget. Resumable in ``run`` (stage ``static_twin``). Returns (steps,
    training seconds)."""
    if any(bool((~(g.always_on | g.always_off)).any()) or g.always_on.numel() == 0 for g in twin.gated_layers):
        raise ValueError("the twin still has dynamic filters: build it with static_twin(...) first")
    logger = logger or run.logger("decoupling")
    precision = resolve_precision(settings.precision, device)
    twin.to(device)
    twin.set_precision(precision)
    controller_ids = {id(p) for p in twin.controller_parameters()}
    backbone = [p for p in twin.parameters() if id(p) not in controller_ids]
    optimizer = torch.optim.SGD(backbone, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, seed=seed)
    per_epoch = len(loader) if budget.max_batches is None else min(len(loader), budget.max_batches)
    total_steps = budget.batches(len(loader))
    loop = TrainLoop(run, STAGE, {"model": twin, "optimizer": optimizer}, total_steps, seconds=budget.seconds,
                     save_every=settings.checkpoint_every, fix=FIX, where="static twin fine-tuning", log=logger,
                     log_every=settings.log_every, device=device)

    def step_fn(step: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, total_steps, settings)
        with precision.autocast():
            logits = twin(precision.prepare_inputs(x))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=backbone)
        optimizer.step()
        return loss

    twin.train()
    twin.set_hard_gates(True)  # inference gates in training mode: the frozen states apply
    try:
        state = loop.run(step_fn, batches=lambda s: batch_stream(loader, s, per_epoch),
                         desc="static twin fine-tuning")
    finally:
        twin.set_hard_gates(False)
        twin.clear_records()
    require_finite(twin.state_dict(), "decoupling: the static twin's weights", FIX)
    twin.eval()
    logger.info("static twin fine-tuned %d/%d steps in %.1f s", state.step, total_steps, state.seconds)
    return state.step, state.seconds


def paired_difference(correct_a: Tensor, correct_b: Tensor) -> dict[str, float]:
    """Paired top-1 difference a - b in points over the same images, with its standard error
    (sd of the per-image differences / sqrt(n)) and the share of images on which the two disagree."""
    a, b = correct_a.double(), correct_b.double()
    difference, se, _ = mean_and_se(a, b)
    return {"difference": 100.0 * difference, "se": 100.0 * se, "disagree": float((a != b).double().mean())}


def twin_report(decoupled: DecoupledNet, twin: DecoupledNet, test, val, device: torch.device,
                dense_macs: float) -> dict[str, object]:
    """Top-1 (deployed form, fp32) and mean MACs of the decoupled network and its twin on ``test`` (and
    ``val``), with the paired difference decoupled - twin on ``test``."""
    from .evaluate import deployed_predictions

    out: dict[str, object] = {}
    correct = {}
    for name, net in (("decoupled", decoupled), ("twin", twin)):
        pred, macs, agreement = deployed_predictions(net, test, device)
        correct[name] = pred == test.labels.cpu()
        row = {"top1": 100.0 * float(correct[name].double().mean()), "macs": float(macs.mean()),
               "mac_reduction": 1.0 - float(macs.mean()) / dense_macs, "deployed_agreement": agreement}
        if val is not None and len(val):
            pred_val, macs_val, _ = deployed_predictions(net, val, device)
            row["val_top1"] = 100.0 * float((pred_val == val.labels.cpu()).double().mean())
            row["val_mac_reduction"] = 1.0 - float(macs_val.mean()) / dense_macs
        out[name] = row
    out["paired_decoupled_minus_twin"] = paired_difference(correct["decoupled"], correct["twin"])
    return out
