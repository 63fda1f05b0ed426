"""Training of the decision modules and the backbone (Wang et al.'s alternating scheme), resumable.

Each step: (1) gate step: loss = CE + lam * R_sparsity, Adam on heads and code books, then G is clamped to
[0, 5] and the head rows renormalised; (2) backbone step: a second forward, CE only, SGD on the backbone.
With `alternate=False` one forward serves both optimisers: one backward of CE for gates and backbone, one of
the gate-only terms (lam * R, the balance term) for the gates, so the regulariser's gradient reaches only the
gates (`drib_step`). The Gumbel temperature decays exponentially from tau_start to tau_end over the
decision-training steps (the fine-tuning share uses argmax decisions). Backbone weight decay:
`decision_weight_decay` (Wang: 1e-9) while the decisions train, `weight_decay` in the fine-tuning share.
Model selection: the epoch with the best validation top-1 among those
meeting the sparsity target (else the last), plus the current weights when `--budget-seconds` stops a run
mid-epoch; never the test set. `finetune_augment` feeds the fine-tuning share crop + flip copies of the batches.
The steps run through `common.loop.TrainLoop`: a run killed at any step and started again ends with the same
weights, bit for bit; a non-finite loss or weight stops it (exit 2 through the CLI) before anything is saved.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone, build_backbone
from common.data import BatchLoader, DatasetSplits
from common.loop import LoopState, TrainLoop, batch_stream, require_finite
from common.method import Budget
from common.precision import Precision, resolve_precision
from common.run import RunDir, atomic_torch_save, load_checkpoint, pick_device, seed_everything

from .bottleneck import FeatureStats, estimate_statistics_sites
from .config import DribSettings
from .losses import balance_loss, sparsity_loss
from .mac_target import calibrate_codebooks, decision_target_for
from .model import DynamicNetwork
from .verification import attribution_site, credibility_site

TARGET_TOLERANCE = 0.05  # an epoch "meets the target" within 5 points of MAC fraction / density
STAGE = "drib"  # the one training stage (decisions, then the fine-tuning share) in common.loop's checkpoint
DIVERGED_FIX = "lower --set train.backbone_lr (or --set decision.gate_lr)"
CALIBRATION_IMAGES = 1024  # training images on which `target_mac_reduction` is calibrated


@dataclass
class TrainOutcome:
    steps: int
    train_seconds: float
    val_top1: float
    val_mac_fraction: float
    selected_epoch: int
    calibration: dict | None = None


def temperature(step: int, total: int, start: float, end: float) -> float:
    """Exponential decay from ``start`` (step 0) to ``end`` (last step)."""
    if total <= 1:
        return end
    return start * (end / start) ** (step / (total - 1))


def decision_temperature(step: int, decision_steps: int, start: float, end: float) -> float:
    """The Gumbel temperature at ``step``: annealed over the decision-training steps only, so it reaches
    ``end`` on the last of them (the fine-tuning share that follows uses argmax decisions)."""
    return temperature(min(step, decision_steps - 1), decision_steps, start, end)


def backbone_lr(t, step: int, total: int) -> float:
    """Constant, or cosine decay from backbone_lr to 0 over the run."""
    if t.lr_schedule == "cosine" and total > 1:
        return 0.5 * t.backbone_lr * (1 + math.cos(math.pi * step / total))
    return t.backbone_lr


@torch.no_grad()
def validate(net: DynamicNetwork, loader: BatchLoader) -> tuple[float, float, float]:
    """Top-1 (%), mean MAC fraction of the whole network and mean gate density, argmax decisions."""
    was_training = net.training
    net.eval()
    correct, total, mac_sum, density_sum = 0, 0, 0.0, 0.0
    dense = float(sum(s.macs for s in net.shapes()))
    try:
        for x, y in loader:
            logits = net(x)
            masks = net.masks()
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            mac_sum += float(net.per_sample_macs(masks).sum()) / dense
            density_sum += float(torch.stack([(m != 0).float().mean(1) for m in masks]).mean(0).sum())
    finally:
        net.train(was_training)
    return 100.0 * correct / total, mac_sum / total, density_sum / total


def _meets_target(config: DribSettings, mac_fraction: float, density: float) -> bool:
    measure = mac_fraction if config.decision.regulariser == "macs" else density
    return measure <= config.decision.target + TARGET_TOLERANCE


def _consider(state: dict, record: dict, meets: bool, net: DynamicNetwork) -> None:
    """Keep ``net``'s weights as state["best"] if this validated candidate beats the current one: the best
    validation top-1 among candidates meeting the target, else the latest."""
    best = state["best"]
    if (best is None or (meets and (not best["meets"] or record["val_top1"] > best["val_top1"]))
            or (not best["meets"] and not meets)):
        state["best"] = {**record, "meets": meets,
                         "model": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


def make_optimisers(net: DynamicNetwork, config: DribSettings) -> tuple[torch.optim.Adam, torch.optim.SGD]:
    """Adam on the decision heads and code books, SGD (momentum, weight decay) on the backbone."""
    t = config.train
    return (torch.optim.Adam(net.gate_parameters(), lr=config.decision.gate_lr),
            torch.optim.SGD(net.backbone_parameters(), lr=t.backbone_lr, momentum=t.momentum,
                            weight_decay=t.weight_decay))


def drib_step(net: DynamicNetwork, gate_opt: torch.optim.Optimizer, backbone_opt: torch.optim.Optimizer,
              policy: Precision, config: DribSettings, x: Tensor, y: Tensor, *, finetuning: bool, tau: float,
              lr: float, separate_backward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One training step on the batch (x, y); returns (loss, CE, R_sparsity) of its (first) forward.

    Gradients: the gates get d(CE + lam * R (+ balance)) / d(gates), the backbone d(CE) / d(backbone). The
    fine-tuning share (``finetuning``) trains the backbone alone under argmax decisions. With `alternate=False`
    one forward serves both: one backward of CE reaches gates and backbone, a second one of the gate-only
    terms reaches the gates (it still runs back through the backbone's activations: the heads read them, and
    they depend on the earlier gates). ``separate_backward`` is the former form of that step (a backward of
    the whole loss for the gates, then one of CE for the backbone; the same gradients), kept as the reference
    of `python -m drib cost --separate-backward` and of the test that both give the same gradients."""
    t, d = config.train, config.decision
    net.train()
    net.set_tau(tau)
    for group in backbone_opt.param_groups:
        group["lr"] = lr
        group["weight_decay"] = t.weight_decay if finetuning else t.decision_weight_decay
    for gate in net.gates:
        gate.train(not finetuning)  # fine-tuning: argmax decisions, as at inference
    x = policy.prepare_inputs(x)
    with policy.autocast():
        logits = net(x)
    ce = F.cross_entropy(logits.float(), y)  # losses in fp32 (common.precision)
    reg = sparsity_loss(net, [m.float() for m in net.masks()], config)
    gate_terms = d.lam * reg  # what reaches the gates only
    loss = ce + gate_terms
    if d.balance > 0 and not finetuning:  # deviation: usage balance of the rows (gates only)
        balance = d.balance * balance_loss(net)
        gate_terms = gate_terms + balance
        loss = loss + balance
    gate_opt.zero_grad(set_to_none=True)
    backbone_opt.zero_grad(set_to_none=True)
    gates, backbone = net.gate_parameters(), net.backbone_parameters()
    if finetuning:
        ce.backward(inputs=backbone)
    elif d.alternate:  # Wang et al.: gate step, then a second forward for the backbone step
        loss.backward(inputs=gates)
        gate_opt.step()
        net.project_()
        with policy.autocast():
            logits = net(x)
        ce = F.cross_entropy(logits.float(), y)
        ce.backward(inputs=backbone)
    else:
        if separate_backward:
            loss.backward(inputs=gates, retain_graph=True)
            ce.backward(inputs=backbone)
        else:
            ce.backward(inputs=gates + backbone, retain_graph=True)
            gate_terms.backward(inputs=gates)
        gate_opt.step()
        net.project_()
    backbone_opt.step()
    return loss, ce, reg


def train(net: DynamicNetwork, data: DatasetSplits, budget: Budget, out_dir: Path, config: DribSettings,
          device: torch.device, seed: int = 0) -> TrainOutcome:
    """Train ``net`` in place within ``budget`` through the shared loop (``common.loop``): resumes exactly
    from out_dir/checkpoint.pt (weights, optimisers, every RNG, the calibration flag, the validation history
    and the best weights so far); loads the selected weights into ``net`` before returning."""
    run = RunDir(out_dir)
    log = run.logger("drib")
    t, d = config.train, config.decision
    net.to(device)
    policy = resolve_precision(t.precision, device)
    policy.prepare_model(net)
    log.info("precision: %s", policy.describe())
    loader = BatchLoader(data.train, t.batch_size, train=True, device=device, augment=t.augment, seed=seed)
    # Same seed, so the same shuffle: the fine-tuning share takes the augmented copy of each batch.
    aug_loader = (BatchLoader(data.train, t.batch_size, train=True, device=device, augment=True, seed=seed)
                  if t.finetune_augment and t.finetune_fraction > 0 and not t.augment else None)
    val_loader = BatchLoader(data.val, 256, train=False, device=device)
    per_epoch = len(loader) if budget.max_batches is None else min(len(loader), budget.max_batches)
    total_steps = budget.batches(len(loader))
    gate_opt, backbone_opt = make_optimisers(net, config)
    finetune_from = round(total_steps * (1 - t.finetune_fraction)) if t.finetune_fraction > 0 else total_steps
    loop = TrainLoop(run, STAGE, {"model": net, "gate_opt": gate_opt, "backbone_opt": backbone_opt},
                     total_steps, seconds=budget.seconds, save_every=t.save_every, fix=DIVERGED_FIX,
                     where="drib training", log=log, log_every=t.log_every, device=device)
    extra = loop.state.extra  # checkpointed with the weights: restored as it was at the last save
    extra.setdefault("best", None)
    extra.setdefault("history", [])
    extra.setdefault("calibrated", False)
    calibration_images = None
    if config.target_mac_reduction is not None:
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 7))
        calibration_images = data.train.subset(pick[:CALIBRATION_IMAGES]).images.to(device).float() / 255

    def calibrate(when: str, step: int) -> None:
        if calibration_images is None:
            return
        result = calibrate_codebooks(net, calibration_images, float(config.target_mac_reduction), log=log)
        extra.setdefault("calibrations", []).append({"when": when, "step": step, **result})

    def batches(start: int) -> Iterator[tuple[Any, Any]]:
        plain = batch_stream(loader, start, per_epoch)
        if aug_loader is None:
            return ((batch, batch) for batch in plain)
        return zip(plain, batch_stream(aug_loader, start, per_epoch))

    def step_fn(step: int, pair: tuple[Any, Any]) -> torch.Tensor:
        (x, y), (x_aug, y_aug) = pair
        finetuning = step >= finetune_from
        if finetuning:
            x, y = x_aug, y_aug
            if not extra["calibrated"]:  # the decisions freeze here: the MAC target lands now
                calibrate("decisions frozen", step)
                extra["calibrated"] = True
        # tau anneals over the decision-training steps only (fine-tuning uses argmax decisions)
        loss, ce, reg = drib_step(net, gate_opt, backbone_opt, policy, config, x, y, finetuning=finetuning,
                                  tau=decision_temperature(step, finetune_from, d.tau_start, d.tau_end),
                                  lr=backbone_lr(t, step, total_steps))
        if (step + 1) % t.log_every == 0:
            log.info("step %d/%d ce %.4f reg %.5f tau %.3f", step + 1, total_steps, float(ce.detach()),
                     float(reg.detach()), net.gates[0].tau)
        return loss

    def on_period(done: int, state: LoopState) -> None:
        """Validation at every epoch's end, and of the current weights when the time budget stops a run
        mid-epoch (they may be the only ones that went through the fine-tuning share)."""
        partial = state.stopped_on_time and done % per_epoch != 0
        top1, mac_fraction, density = validate(net, val_loader)
        record = {"epoch": math.ceil(done / per_epoch), "step": done, "val_top1": top1,
                  "val_mac_fraction": mac_fraction, "val_density": density, **({"partial": True} if partial else {})}
        extra["history"].append(record)
        log.info("%s epoch %d: val top-1 %.2f%% MAC fraction %.3f density %.3f",
                 "stopped in" if partial else "end of", record["epoch"], top1, mac_fraction, density)
        _consider(extra, record, _meets_target(config, mac_fraction, density), net)
        if done < total_steps and not state.stopped_on_time and done % t.save_every:
            loop.save()  # an epoch's validation is not repeated after a kill (the loop saves the other cases)

    state = loop.run(step_fn, batches=batches, on_period=on_period, period=per_epoch, desc="drib")
    best = extra["best"]
    if best is None:  # nothing validated (no step ran): use the current weights
        calibrate("selected model", state.step)
        top1, mac_fraction, _ = validate(net, val_loader)
        return TrainOutcome(state.step, state.seconds, top1, mac_fraction, 0, extra.get("calibrations"))
    net.load_state_dict(best["model"])
    top1, mac_fraction, epoch = best["val_top1"], best["val_mac_fraction"], best["epoch"]
    if calibration_images is not None:  # the selected model itself (a no-op when it is within tolerance)
        calibrate("selected model", state.step)
        if extra["calibrations"][-1]["scale"] != 1.0:
            top1, mac_fraction, _ = validate(net, val_loader)
    return TrainOutcome(state.step, state.seconds, top1, mac_fraction, epoch, extra.get("calibrations"))


# -- a run directory: build, train, save, load -----------------------------------------------------------
# model.pt holds the backbone name, class count, input size, the DRIB config, the state dict (backbone and
# gates) and the bottleneck statistics of both sites (estimated once on training data after training).

@dataclass
class TrainedDRIB:
    net: DynamicNetwork
    stats: dict[str, FeatureStats]  # per bottleneck site key (see drib.verification.Site)
    config: DribSettings
    meta: dict[str, Any]


def input_size_of(data: DatasetSplits) -> tuple[int, int, int]:
    h, w = data.image_size
    return (3, h, w)


def feature_statistics(net: DynamicNetwork, data: DatasetSplits, config: DribSettings,
                       device: torch.device, seed: int = 0) -> dict[str, FeatureStats]:
    """IBA's estimator on training images, for both bottleneck sites: the attribution site with the network
    as deployed, the credibility site with its layer's gate open (see drib.verification)."""
    b = config.bottleneck
    loader = BatchLoader(data.train, 256, train=True, device=device, augment=False, seed=seed)
    site = attribution_site(net, b.site)
    stats = dict(zip(site.keys, estimate_statistics_sites(net, site.modules, loader, b.estimator_samples,
                                                          b.active_std, b.active_share)))
    cred = credibility_site(net, b.credibility_site)
    assert cred.gated is not None
    cred.gated.gate.open = True
    try:
        loader = BatchLoader(data.train, 256, train=True, device=device, augment=False, seed=seed)
        stats.update(zip(cred.keys, estimate_statistics_sites(net, cred.modules, loader, b.estimator_samples,
                                                              b.active_std, b.active_share)))
    finally:
        cred.gated.gate.open = False
    return stats


def ensure_statistics(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, seed: int = 0) -> bool:
    """Estimate the bottleneck statistics if model.pt lacks those of the configured sites; True if it did."""
    b = trained.config.bottleneck
    needed = attribution_site(trained.net, b.site).keys + credibility_site(trained.net, b.credibility_site).keys
    if all(k in trained.stats for k in needed):
        return False
    trained.stats = feature_statistics(trained.net, data, trained.config, device, seed)
    return True


def save_model(run: RunDir, trained: TrainedDRIB) -> None:
    """Write model.pt atomically; non-finite weights or statistics are refused and nothing is written."""
    weights = {"state_dict": trained.net.state_dict(),
               "ib_stats": {k: v.as_dict() for k, v in trained.stats.items()}}
    require_finite(weights, f"drib: {run.model_path}", DIVERGED_FIX)
    atomic_torch_save({"meta": trained.meta, "config": trained.config.to_dict(), **weights}, run.model_path)


def load_trained(run_dir: str | Path, device: torch.device | str) -> TrainedDRIB:
    """A run directory's model.pt with all that evaluate and explain need: the network, the bottleneck
    statistics, the settings and the run's record (statistics of an older layout are dropped:
    `ensure_statistics` re-estimates them). Loaded with weights_only=True."""
    run = RunDir(run_dir)
    if not run.model_path.is_file():
        raise FileNotFoundError(f"{run.model_path} not found: train into {run.path} first (python -m drib train)")
    blob = load_checkpoint(run.model_path, map_location=device)
    meta = blob["meta"]
    config = DribSettings.from_dict(blob["config"])
    backbone = build_backbone(meta["backbone"], num_classes=meta["num_classes"])
    net = DynamicNetwork(backbone, config.decision, input_size=tuple(meta["input_size"]))
    net.load_state_dict(blob["state_dict"])
    net.to(device).eval()
    stats = {k: FeatureStats.from_dict(v).to(device) for k, v in blob.get("ib_stats", {}).items()}
    return TrainedDRIB(net, stats, config, meta)


def load_run(path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module:
    """The trained network of a run directory written by ``python -m drib train`` or ``run_method``: a
    ``DynamicNetwork`` in eval mode, pixels in [0, 1] -> logits (argmax decisions; equal to the pre-sliced
    channel skipping that evaluate runs, `sparse_inference.sparse_forward`, within 1e-5). ``device`` None:
    CUDA when available, else CPU."""
    return load_trained(path, pick_device(None if device is None else str(device))).net


def build_network(start: Backbone, data: DatasetSplits, config: DribSettings, device: torch.device,
                  seed: int = 0, log: logging.Logger | None = None) -> tuple[DynamicNetwork, DribSettings]:
    """``start`` wrapped with gates and its code books (and heads) initialised as the settings say; returns
    it with the settings it trains under (``target_mac_reduction`` mapped to DRIB's own target). Uses no
    global RNG, so a resume may build it again before the checkpoint overwrites its weights."""
    net = DynamicNetwork(start, config.decision, input_size=input_size_of(data)).to(device)
    if config.target_mac_reduction is not None:  # the shared knob -> DRIB's own (drib.mac_target)
        config = copy.deepcopy(config)
        config.decision.regulariser = "macs"
        config.decision.target = decision_target_for(net, config.target_mac_reduction)
        config.validate()
        _info(log, "target_mac_reduction %.3f -> decision.target (MAC fraction) %.4f",
              config.target_mac_reduction, config.decision.target)
    if config.decision.codebook_init == "importance":
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
        images = data.train.subset(pick[: config.decision.init_images]).images.to(device).float() / 255
        keep = net.init_codebooks(net.channel_importance(images), config.decision, seed)
        _info(log, "code books initialised by importance: each action keeps %.3f of the channels", keep)
    elif config.decision.codebook_init == "clusters":
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
        images = data.train.subset(pick[: config.decision.init_images]).images.to(device).float() / 255
        shares = net.init_by_clusters(images, config.decision, seed)
        _info(log, "code books and heads initialised by clusters: largest cluster share per layer %s",
              ", ".join(f"{max(v):.2f}" for v in shares.values()))
    return net, config


def _info(log: logging.Logger | None, message: str, *args: Any) -> None:
    if log is not None:
        log.info(message, *args)


def train_run(start: Backbone, backbone_name: str, data: DatasetSplits, budget: Budget, out_dir: Path,
              config: DribSettings, device: torch.device, seed: int = 0) -> tuple[TrainedDRIB, float]:
    """Wrap ``start`` with gates, train, estimate the bottleneck statistics and write model.pt."""
    seed_everything(seed)
    run = RunDir(out_dir)
    net, config = build_network(start, data, config, device, seed, log=run.logger("drib"))
    outcome = train(net, data, budget, out_dir, config, device, seed)
    require_finite(net.state_dict(), "drib: the selected weights", DIVERGED_FIX)
    stats = feature_statistics(net, data, config, device, seed)
    meta = {"backbone": backbone_name, "num_classes": data.num_classes, "input_size": list(input_size_of(data)),
            "dataset": data.name, "val_source": data.val_source, "steps": outcome.steps,
            "train_seconds": outcome.train_seconds,
            "selected_epoch": outcome.selected_epoch, "val_top1": outcome.val_top1,
            "val_mac_fraction": outcome.val_mac_fraction,
            "target_mac_reduction": config.target_mac_reduction, "calibration": outcome.calibration}
    trained = TrainedDRIB(net.eval(), stats, config, meta)
    save_model(run, trained)
    return trained, outcome.train_seconds
