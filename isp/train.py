"""Training: one function per stage (predictor Eq. 6-7, selector Eq. 8-9, gate search Eq. 10, fine-tuning),
each a stage of the shared resumable loop (common.loop), and the ``Pipeline`` that runs them, each stage
writing its artefact to the run directory:

predictor.pt (Eq. 6-7) -> selector.pt (Eq. 8-9) -> targets.pt (C_x on the 5% subset) -> gates.pt (Eq. 10)
-> slim.pt (physically pruned, checked against the gated network) -> model.pt (fine-tuned) -> metrics.json.
A stage whose artefact exists is skipped; an interrupted stage resumes from checkpoint.pt (common.loop's
layout: every module, optimiser and RNG state; written every epoch, every ``checkpoint_every`` steps and on a
time-budget stop), so a resumed run ends with the weights of an uninterrupted one. Every artefact is checked
finite before it is written.
"""

from __future__ import annotations

import dataclasses
import math
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
from common.run import RunDir, atomic_torch_save, atomic_write_json, load_checkpoint, read_json, seed_everything
from common.training import evaluate_top1

# The run's model files (artefacts.py); their names stay importable from here (isp.train.save_backbone).
from .artefacts import identify_backbone, images_as_float, load_backbone, load_decoder, save_backbone, save_decoder
from .config import SELECTOR_AREAS, STAGE_SHARES, IspSettings
from .evaluate import EXPLAINED_IMAGES, evaluate_run
from .hardware import resolve_channel_group
from .losses import (
    GateLossWeights,
    gate_loss_terms,
    gradient_shares,
    kl_to_classifier,
    outside_area_penalty,
    selector_loss,
)
from .model import (
    ChannelGates,
    GateInjector,
    PrunableMacs,
    PrunableSite,
    calibrated_hard,
    group_sizes,
    groups_for_target,
    prunable_sites,
    prunable_target_ratio,
)
from .rbf import mask_input, rbf_bernoulli, sample_mask, sample_random_rbf_params
from .selector import SelectorDecoder, decoder_shape, forward_with_stages
from .slim import keep_from_json, keep_to_json, kept_indices, slim_copy, slim_vs_gated

# The setting to lower when a stage's loss or weights become non-finite (the loop's one-line error ends with it).
LR_SETTING = {"predictor": "predictor_lr", "selector": "selector_lr", "gates": "gate_lr", "finetune": "finetune_lr"}


def fp32_policy(device: torch.device | str = "cpu") -> Precision:
    """The policy of a loop called without one (tests, direct calls): fp32, contiguous; changes nothing."""
    return resolve_precision("fp32", device, channels_last=False)


def lr_fix(stage: str, lr: float) -> str:
    """What a non-finite error of ``stage`` tells the user to change."""
    return f"lower --set {LR_SETTING[stage]} (it is {lr:g})"


def stage_loop(run: RunDir, stage: str, stateful: dict[str, Any], steps: int, *, lr: float,
               seconds: float | None, save_every: int, log: Any, device: torch.device) -> TrainLoop:
    """The shared resumable loop (common.loop) for one ISP stage; it restores the stage's checkpoint, if any."""
    return TrainLoop(run, stage, stateful, steps, seconds=seconds, save_every=save_every, fix=lr_fix(stage, lr),
                     where=f"isp {stage}", log=log, device=device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BN statistics fixed) and no gradients: the classifier and predictor are never updated."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def random_masks(batch: int, size: tuple[int, int], kind: str, device: torch.device, tau: float,
                 sigma_max: float | None = None) -> Tensor:
    """The predictor's training masks: random RBF Bernoulli masks (Eq. 7), or Bernoulli(0.5) per pixel for
    REAL-X (supplementary Eq. 8), sampled with ``sample_mask`` at ``tau``: the same sampler and temperature
    the selector's objective uses, so the predictor is trained on the masks it will score."""
    if kind == "realx":
        probs = torch.full((batch, *size), 0.5, device=device)
    else:
        probs = rbf_bernoulli(sample_random_rbf_params(batch, *size, device=device, sigma_max=sigma_max), *size)
    return sample_mask(probs, tau)


def train_predictor(run: RunDir, classifier: Backbone, predictor: Backbone, loader: BatchLoader, steps: int, *,
                    lr: float, weight_decay: float, kind: str, tau: float, seconds: float | None, log,
                    sigma_max: float | None = None, save_every: int = 200, policy: Precision | None = None
                    ) -> LoopState:
    """Eq. 6: min_theta E_x E_(c, sigma) E_m' KL(Q_class(y | x) || q_pred(y | m'(x))), m' relaxed at ``tau``.
    Forwards under ``policy`` (common.precision; masks and the KL in fp32)."""
    policy = policy or fp32_policy()
    freeze(classifier)
    policy.prepare_model(predictor)
    predictor.train()
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    loop = stage_loop(run, "predictor", {"predictor": predictor, "optimizer": optimizer}, steps, lr=lr,
                      seconds=seconds, save_every=save_every, log=log, device=_device(predictor))

    def step(i: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        x = policy.prepare_inputs(batch[0])
        masks = random_masks(len(x), tuple(x.shape[-2:]), kind, x.device, tau, sigma_max)
        with policy.autocast():
            with torch.no_grad():
                teacher = classifier(x)
            student = predictor(policy.prepare_inputs(mask_input(x, masks)))
        loss = kl_to_classifier(teacher, student)  # fp32 inside
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return loop.run(step, batches=lambda start: batch_stream(loader, start))


# Mask draws per validation image: the checkpoint choice compares objectives that differ by a few hundredths.
VALIDATION_SAMPLES = 4


def check_selector_area(selector_area: str, decoder: SelectorDecoder) -> None:
    """Once, before a selector stage: the setting names an area form this decoder has."""
    if selector_area not in SELECTOR_AREAS:
        raise ValueError(f"selector_area must be one of {SELECTOR_AREAS}, got {selector_area!r}")
    if selector_area == "plane" and decoder.kind != "rbf":
        raise ValueError(f"selector_area = 'plane' needs an RBF decoder (its kernel's mass), got {decoder.kind!r}")


def outside_area(selector_area: str, decoder: SelectorDecoder, code: Tensor, probs: Tensor) -> Tensor | None:
    """The per-image addition to R(m') of ``selector_area`` (``IspSettings``): None for "frame" (the paper),
    the kernel's mass outside the frame of ``probs`` / (H W) for "plane" (RBF decoders only; the stage checked
    that with ``check_selector_area``)."""
    return None if selector_area == "frame" else outside_area_penalty(code, *probs.shape[-2:])


@torch.no_grad()
def selector_validation(classifier: Backbone, predictor: Backbone, decoder: SelectorDecoder, images: Tensor, *,
                        lambda1: float, lambda2: float, tau: float, policy: Precision | None = None,
                        batch_size: int = 128, seed: int = 0, samples: int = 1,
                        selector_area: str = "frame") -> dict[str, float]:
    """The selector objective (Eq. 8-9, R as ``selector_area`` says) on fixed validation images with fixed mask
    noise (the same draws at every call, so two decoders are compared on common random numbers), and the mean
    kept fraction of the Bernoulli maps. The decoder's train/eval mode is restored."""
    check_selector_area(selector_area, decoder)
    policy = policy or fp32_policy()
    was_training = decoder.training
    decoder.eval()
    generator = torch.Generator().manual_seed(seed)
    total = kept = 0.0
    for start in range(0, len(images), batch_size):
        x = policy.prepare_inputs(images[start:start + batch_size])
        with policy.autocast():
            logits, stages = forward_with_stages(classifier, x)
            code = decoder.code(stages, logits.argmax(1))
        probs = decoder.probabilities(code).float()
        parts = selector_loss(logits, predictor, x, probs, lambda1=lambda1, lambda2=lambda2, tau=tau,
                              generator=generator, policy=policy, samples=samples,
                              outside_area=outside_area(selector_area, decoder, code, probs))
        total += float(parts.total) * len(x)
        kept += float(probs.flatten(1).mean(1).sum())
    decoder.train(was_training)
    return {"loss": total / len(images), "kept": kept / len(images)}


def train_selector(run: RunDir, classifier: Backbone, predictor: Backbone, decoder: SelectorDecoder,
                   loader: BatchLoader, steps: int, *, lr: float, weight_decay: float, lambda1: float,
                   lambda2: float, tau: float, seconds: float | None, log,
                   save_every: int = 200, policy: Precision | None = None, val_images: Tensor | None = None,
                   val_every: int = 50, samples: int = 1, selector_area: str = "frame") -> LoopState:
    """Only the decoder learns; the encoder (the classifier's backbone) and the predictor stay frozen.
    Encoder, decoder and predictor run under ``policy``; the RBF map, the mask and the loss are fp32. R(m') is
    over the frame (the paper) or, with ``selector_area = "plane"``, charges the kernel's mass outside it too.

    With ``val_images``, the objective is measured on them every ``val_every`` steps (``selector_validation``)
    and the decoder of the lowest validation objective is kept, so a run that drifts out of the interior
    optimum into all-off or all-on masks (a flat KL there) returns the interior state it passed through."""
    check_selector_area(selector_area, decoder)  # before any step
    policy = policy or fp32_policy()
    freeze(classifier)
    freeze(predictor)
    policy.prepare_model(decoder)
    decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    loop = stage_loop(run, "selector", {"decoder": decoder, "optimizer": optimizer}, steps, lr=lr,
                      seconds=seconds, save_every=save_every, log=log, device=_device(decoder))

    def step(i: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        x = policy.prepare_inputs(batch[0])
        with policy.autocast():
            with torch.no_grad():
                logits, stages = forward_with_stages(classifier, x)
            code = decoder.code(stages, logits.argmax(1))
        probs = decoder.probabilities(code)
        parts = selector_loss(logits, predictor, x, probs, lambda1=lambda1, lambda2=lambda2, tau=tau,
                              policy=policy, samples=samples,
                              outside_area=outside_area(selector_area, decoder, code, probs))
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        return parts.total

    def validate(done: int, state: LoopState) -> None:
        result = selector_validation(classifier, predictor, decoder, val_images, lambda1=lambda1,
                                     lambda2=lambda2, tau=tau, policy=policy, samples=VALIDATION_SAMPLES,
                                     selector_area=selector_area)
        state.extra.setdefault("val_history", []).append({"step": done, **result})
        if log:
            log.info("selector step %d: validation objective %.4f, kept %.3f", done, result["loss"],
                     result["kept"])
        if result["loss"] < state.extra.get("best_val_loss", math.inf):
            state.extra.update(best_val_loss=result["loss"], best_step=done, best_kept=result["kept"],
                               best_state={k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()})

    # The choice is resumable: history and best decoder live in the loop's extra state, saved with each checkpoint.
    state = loop.run(step, batches=lambda start: batch_stream(loader, start),
                     on_period=validate if val_images is not None else None, period=max(1, val_every),
                     period_at_start=True)
    if "best_state" in state.extra:
        decoder.load_state_dict(state.extra["best_state"])
        if log:
            log.info("selector: kept the decoder of step %d (validation objective %.4f, kept %.3f)",
                     state.extra["best_step"], state.extra["best_val_loss"], state.extra["best_kept"])
    return state


@torch.no_grad()
def explanation_targets(classifier: Backbone, decoder: SelectorDecoder, images: Tensor, batch_size: int = 256,
                        policy: Precision | None = None) -> tuple[Tensor, Tensor]:
    """C_x of Eq. 10 for every image (the unpruned selector's code, fp32) and the class it explains, computed
    under ``policy`` like the gate search's codes they are compared with."""
    policy = policy or fp32_policy()
    freeze(classifier)
    decoder.eval()
    codes, classes = [], []
    for start in range(0, len(images), batch_size):
        x = policy.prepare_inputs(images[start:start + batch_size])
        with policy.autocast():
            logits, stages = forward_with_stages(classifier, x)
            target = logits.argmax(1)
            codes.append(decoder.code(stages, target).float())
        classes.append(target)
    return torch.cat(codes), torch.cat(classes)


@dataclass
class PruningSubset:
    """The 5% subset of Eq. 10 with its stored targets, as tensors on the training device."""

    images: Tensor  # float in [0, 1]
    labels: Tensor
    codes: Tensor  # C_x
    explained: Tensor  # class whose explanation C_x is


def subset_batches(subset: PruningSubset, batch_size: int, start_step: int, seed: int):
    """Shuffled, unaugmented batches (C_x was computed on the unaugmented image), resumable by step."""
    n = len(subset.labels)
    per_epoch = max(1, n // batch_size)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(subset.labels.device)
        for b in range(skip, per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield subset.images[idx], subset.labels[idx], subset.codes[idx], subset.explained[idx]
        epoch, skip = epoch + 1, 0


def search_gates(run: RunDir, classifier: Backbone, decoder: SelectorDecoder, sites: list[PrunableSite],
                 gates: ChannelGates, macs: PrunableMacs, subset: PruningSubset, steps: int, *, batch_size: int,
                 lr: float, weights: GateLossWeights, seed: int, seconds: float | None, log,
                 save_every: int = 200, policy: Precision | None = None, share_every: int = 0) -> LoopState:
    """Eq. 10: min_theta CE(f(x; W, v), y) + gamma1 ||C_x - f_sel(x; beta, v)||^2 + gamma2 R_res(T(v), p T_all)
    (or the authors' form, ``losses.gate_loss_terms``). W (classifier) and beta (decoder) are frozen; only the
    gate logits theta learn. The network runs under ``policy``; gate values, T(v) and the loss are fp32.

    Every ``share_every`` steps (0: never) each term's gradient w.r.t. theta is measured on the step's batch
    (``losses.gradient_shares``) and appended to ``state.extra["gradient_shares"]`` (resumable, logged): how
    much of the search the explanation actually carries."""
    policy = policy or fp32_policy()
    freeze(classifier)
    freeze(decoder)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    target_macs = weights.target_ratio * macs.total
    injector = GateInjector(sites)
    loop = stage_loop(run, "gates", {"gates": gates, "optimizer": optimizer}, steps, lr=lr, seconds=seconds,
                      save_every=save_every, log=log, device=_device(gates))

    def step(i: int, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        x, y, codes, explained = batch
        x = policy.prepare_inputs(x)
        values = gates.sample()
        injector.values = values
        with injector, policy.autocast():
            logits, stages = forward_with_stages(classifier, x)
            code = decoder.code(stages, explained)
        terms = gate_loss_terms(logits.float(), y, codes, code.float(), decoder, macs(values), target_macs, weights)
        loss = torch.stack(list(terms.values())).sum()
        if share_every and i % share_every == 0:
            shares = gradient_shares(terms, gates.theta)
            loop_state.extra.setdefault("gradient_shares", []).append({"step": i, **shares})
            if log:
                log.info("gates step %d: gradient share w.r.t. theta " + ", ".join(
                    f"{k} {v['share']:.3f} (|g| {v['grad_norm']:.2e}, value {v['value']:.4f})"
                    for k, v in shares.items()), i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    loop_state = loop.state
    return loop.run(step, batches=lambda start: subset_batches(subset, batch_size, start, seed))


def summarise_shares(history: list[dict]) -> dict[str, dict[str, float]]:
    """Mean gradient share (and norm) of each term w.r.t. theta over the first tenth, the last tenth and the
    whole of a search's measured steps (``search_gates``'s ``gradient_shares`` history)."""
    tenth = max(1, len(history) // 10)
    out = {}
    for part, rows in (("first", history[:tenth]), ("last", history[-tenth:]), ("all", history)):
        names = sorted({k for r in rows for k in r if k != "step"})
        out[part] = {name: {"share": sum(r[name]["share"] for r in rows if name in r) / len(rows),
                            "grad_norm": sum(r[name]["grad_norm"] for r in rows if name in r) / len(rows)}
                     for name in names}
        out[part]["steps"] = [rows[0]["step"], rows[-1]["step"]]
    return out


def finetune(run: RunDir, model: Backbone, loader: BatchLoader, val_loader: BatchLoader, steps: int, *, lr: float,
             momentum: float, weight_decay: float, schedule: str, val_every: int, seconds: float | None, log,
             save_every: int = 200, policy: Precision | None = None) -> LoopState:
    """SGD fine-tuning of the slim model; the step with the best validation top-1 is kept (never the test set).
    Forward (and validation) under ``policy``; the loss in fp32."""
    policy = policy or fp32_policy()
    policy.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loop = stage_loop(run, "finetune", {"model": model, "optimizer": optimizer}, steps, lr=lr, seconds=seconds,
                      save_every=save_every, log=log, device=_device(model))

    def lr_at(i: int) -> float:
        if schedule == "cosine":
            return 0.5 * lr * (1 + math.cos(math.pi * i / steps))
        if schedule == "step":  # x0.1 at 50% and 75% of training (the reference recipe)
            return lr * (0.1 ** ((i >= steps // 2) + (i >= 3 * steps // 4)))
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'cosine' or 'step'")

    def step(i: int, batch: tuple[Tensor, Tensor]) -> Tensor:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i)
        x, y = batch
        with policy.autocast():
            logits = model(policy.prepare_inputs(x))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def validate(done: int, state: LoopState) -> None:
        top1 = evaluate_top1(model, val_loader, desc="validate", precision=policy)
        model.train()
        if log:
            log.info("finetune step %d: val top-1 %.2f", done, top1)
        if top1 > state.extra.get("best_val_top1", -1.0):
            state.extra["best_val_top1"] = top1
            state.extra["best_step"] = done
            state.extra["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    state = loop.run(step, batches=lambda start: batch_stream(loader, start), on_period=validate, period=val_every)
    if "best_state" in state.extra:
        model.load_state_dict(state.extra["best_state"])
    model.eval()
    return state


def subset_indices(n: int, fraction: float, seed: int) -> Tensor:
    """A fixed random ``fraction`` of the training set (at least one image)."""
    count = max(1, round(fraction * n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]


STAGES = ("predictor", "selector", "targets", "gates", "slim", "finetune", "evaluate")
# The slim network must compute what the gated one computes; float32 reorderings stay far below this.
SLIM_TOLERANCE = 1e-3


class StageOrderError(RuntimeError):
    """A single stage was requested before the stages it depends on have written their artefacts."""


class Pipeline:
    """Runs (or resumes) every stage for one classifier, dataset, budget and settings."""

    def __init__(self, out_dir: str | Path, classifier: Backbone, data: DatasetSplits, budget: Budget,
                 settings: IspSettings, device: torch.device, seed: int = 0, backbone_name: str | None = None):
        self.run_dir = RunDir(out_dir)
        self.log = self.run_dir.logger("isp")
        self.device = device
        self.seed = seed
        self.data = data
        self.budget = budget
        self.settings = settings
        self.name = backbone_name or identify_backbone(classifier)
        self.image_size = data.image_size
        self.input_size = (3, *self.image_size)
        self.classifier_path = self.run_dir.file("classifier.pt")
        if not self.classifier_path.is_file():
            save_backbone(self.classifier_path, self.name, classifier, None)
        # common.precision: every training and evaluation forward of the pipeline runs under this policy.
        self.policy = resolve_precision(settings.precision, device)
        # The run's own copy, so freezing it never touches the caller's model.
        self.classifier = self.policy.prepare_model(load_backbone(self.classifier_path, device, self.input_size))
        self.seconds_path = self.run_dir.file("stage_seconds.json")
        self.channel_group = resolve_channel_group(settings.channel_group, device)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def path(self, stage: str) -> Path:
        return self.run_dir.file({"predictor": "predictor.pt", "selector": "selector.pt", "targets": "targets.pt",
                                  "gates": "gates.pt", "slim": "slim.pt", "finetune": "model.pt",
                                  "evaluate": "metrics.json"}[stage])

    def _record_seconds(self, stage: str, seconds: float) -> None:
        record = read_json(self.seconds_path) if self.seconds_path.is_file() else {}
        record[stage] = seconds
        atomic_write_json(record, self.seconds_path)

    def train_seconds(self) -> float:
        return float(sum(read_json(self.seconds_path).values())) if self.seconds_path.is_file() else 0.0

    def _steps(self, stage: str, per_epoch: int) -> int:
        epochs = self.settings.stage_epochs(stage, self.budget.epochs)
        return Budget(epochs, max_batches=self.budget.max_batches).batches(per_epoch)

    def _seconds(self, stage: str) -> float | None:
        if self.budget.seconds is None:
            return None
        return STAGE_SHARES.get(stage, 0.0) * self.budget.seconds

    def loader(self, batch: int, train: bool = True, split: str = "train") -> BatchLoader:
        return BatchLoader(getattr(self.data, split), batch, train=train, device=self.device, seed=self.seed)

    def require(self, stage: str) -> Path:
        path = self.path(stage)
        if not path.is_file():
            raise StageOrderError(f"stage {stage!r} has not been run in {self.run_dir.path} ({path.name} is missing);"
                                  f" run `python -m isp train` without --stage, or with --stage {stage} first")
        return path

    # --- stages ------------------------------------------------------------------------------------------
    def run(self, only: str | None = None) -> None:
        if only is not None and only not in STAGES:
            raise ValueError(f"unknown stage {only!r}; stages are {', '.join(STAGES)}")
        for stage in STAGES:
            if only is not None and stage != only:
                continue
            # Evaluation is cheap and re-run on request; training stages never repeat once their artefact exists.
            if self.path(stage).is_file() and not (stage == "evaluate" and only == "evaluate"):
                self.log.info("stage %s: %s exists, skipped", stage, self.path(stage).name)
                continue
            seed_everything(self.seed + STAGES.index(stage))
            self.log.info("stage %s: start", stage)
            getattr(self, f"_stage_{stage}")()
            self.log.info("stage %s: done", stage)

    def _stage_predictor(self) -> None:
        s = self.settings
        predictor = build_backbone(self.name, self.data.num_classes)
        if s.predictor_from_classifier:
            predictor.load_state_dict(self.classifier.state_dict())
        predictor.to(self.device)
        self.log.info("precision: %s", self.policy.describe())
        loader = self.loader(s.predictor_batch)
        state = train_predictor(self.run_dir, self.classifier, predictor, loader,
                                       self._steps("predictor", len(loader)), lr=s.predictor_lr,
                                       weight_decay=s.predictor_weight_decay, kind=s.selector,
                                       tau=s.mask_tau, sigma_max=s.predictor_sigma_max,
                                       seconds=self._seconds("predictor"), log=self.log,
                                       save_every=min(s.checkpoint_every, len(loader)), policy=self.policy)
        save_backbone(self.path("predictor"), self.name, predictor, None, fix=lr_fix("predictor", s.predictor_lr))
        self._record_seconds("predictor", state.seconds)

    def _stage_selector(self) -> None:
        s = self.settings
        predictor = load_backbone(self.require("predictor"), self.device, self.input_size)
        shape = decoder_shape(self.classifier, self.image_size, self.data.num_classes)
        decoder = SelectorDecoder(shape, s.selector, s.centre_margin, s.sigma_bias).to(self.device)
        loader = self.loader(s.selector_batch)
        state = train_selector(self.run_dir, self.classifier, predictor, decoder, loader,
                                      self._steps("selector", len(loader)), lr=s.selector_lr,
                                      weight_decay=s.selector_weight_decay, lambda1=s.lambda1,
                                      lambda2=s.lambda2 if s.selector == "rbf" else 0.0, tau=s.mask_tau,
                                      seconds=self._seconds("selector"), log=self.log,
                                      save_every=min(s.checkpoint_every, len(loader)), policy=self.policy,
                                      val_images=self._selector_val_images(), val_every=s.selector_val_every,
                                      samples=s.selector_samples, selector_area=s.selector_area)
        save_decoder(self.path("selector"), decoder, fix=lr_fix("selector", s.selector_lr))
        if "best_step" in state.extra:
            atomic_write_json({k: state.extra[k] for k in ("best_step", "best_val_loss", "best_kept", "val_history")}
                              | {"split": f"validation ({self.data.val_source})"},
                              self.run_dir.file("selector_selection.json"))
        self._record_seconds("selector", state.seconds)

    def _selector_val_images(self) -> Tensor | None:
        """A fixed, seeded sample of the validation split for the selector's checkpoint choice (None: off)."""
        count = min(self.settings.selector_val_images, len(self.data.val))
        if count <= 0:
            return None
        indices = torch.randperm(len(self.data.val), generator=torch.Generator().manual_seed(self.seed))[:count]
        return images_as_float(self.data.val.subset(indices), self.device)

    def _stage_targets(self) -> None:
        decoder = load_decoder(self.require("selector"), self.device)
        indices = subset_indices(len(self.data.train), self.settings.subset_fraction, self.seed)
        images = images_as_float(self.data.train.subset(indices), self.device)
        codes, explained = explanation_targets(self.classifier, decoder, images, policy=self.policy)
        require_finite(codes, "isp targets.pt (the selector's codes C_x)",
                       lr_fix("selector", self.settings.selector_lr))
        atomic_torch_save({"indices": indices, "codes": codes.cpu(), "explained": explained.cpu()},
                          self.path("targets"))

    def _subset(self) -> PruningSubset:
        blob = load_checkpoint(self.require("targets"))
        split = self.data.train.subset(blob["indices"])
        return PruningSubset(images_as_float(split, self.device), split.labels.to(self.device),
                                    blob["codes"].to(self.device), blob["explained"].to(self.device))

    def gate_setup(self) -> tuple[list, ChannelGates, PrunableMacs]:
        sites = prunable_sites(self.classifier, self.input_size)
        channels = [s.channels for s in sites]
        macs = PrunableMacs(self.classifier, sites, self.input_size)
        groups = group_sizes(channels, self.channel_group)
        if self.settings.target_mac_reduction is not None:
            groups = groups_for_target(macs, channels, groups, self.settings.target_mac_reduction)
        gates = ChannelGates(channels, self.settings.gate_bias, self.settings.gate_tau, groups)
        return sites, gates.to(self.device), macs

    def target_ratio(self, macs: PrunableMacs) -> float:
        """p of Eq. 10: the setting, or the one ``target_mac_reduction`` (whole-model MACs removed) implies."""
        if self.settings.target_mac_reduction is None:
            return self.settings.target_ratio
        return prunable_target_ratio(macs, self.settings.target_mac_reduction)

    def _stage_gates(self) -> None:
        s = self.settings
        decoder = load_decoder(self.require("selector"), self.device)
        subset = self._subset()
        sites, gates, macs = self.gate_setup()
        per_epoch = max(1, len(subset.labels) // s.gate_batch)
        p = self.target_ratio(macs)
        weights = GateLossWeights(s.classification_weight, s.gamma1, s.gamma2, p, s.interpretation_units,
                                  s.gate_objective)
        state = search_gates(self.run_dir, self.classifier, decoder, sites, gates, macs, subset,
                             self._steps("gates", per_epoch), batch_size=s.gate_batch, lr=s.gate_lr,
                             weights=weights, seed=self.seed, seconds=self._seconds("gates"), log=self.log,
                             save_every=min(s.checkpoint_every, per_epoch), policy=self.policy,
                             share_every=s.gradient_share_every)
        shares = state.extra.get("gradient_shares", [])
        if shares:
            self.log.info("gates: mean gradient share w.r.t. theta over the search %s",
                          summarise_shares(shares)["all"])
        require_finite(gates.theta, "isp gates.pt (the gate logits theta)", lr_fix("gates", s.gate_lr))
        hard = gates.hard()
        threshold_ratio = float(macs(hard)) / macs.total
        if s.target_mac_reduction is not None:  # the shared cost knob: land on the target, not near it
            hard = calibrated_hard(gates, macs, p * macs.total)
        keep = keep_to_json(sites, kept_indices(hard))
        ratio = float(macs(hard)) / macs.total
        reduction = 1.0 - (float(macs(hard)) + macs.fixed) / macs.model_macs
        self.log.info("gates: prunable MACs kept %.3f (target p = %.3f; theta + b > 0 gave %.3f), model MACs "
                      "removed %.3f", ratio, p, threshold_ratio, reduction)
        atomic_torch_save({"theta": gates.theta.detach().cpu(), "keep": keep, "prunable_kept_ratio": ratio,
                           "threshold_prunable_kept_ratio": threshold_ratio, "target_ratio_p": p,
                           "calibrated": s.target_mac_reduction is not None, "channel_groups": gates.groups,
                           "prunable_macs_total": macs.total, "gradient_shares": shares,
                           "gradient_share_summary": summarise_shares(shares) if shares else None},
                          self.path("gates"))
        self._record_seconds("gates", state.seconds)

    def _stage_slim(self) -> None:
        blob = load_checkpoint(self.require("gates"))
        sites = prunable_sites(self.classifier, self.input_size)
        keep = keep_from_json(sites, blob["keep"])
        slim = slim_copy(self.classifier, keep, self.input_size)
        hard = [torch.zeros(s.channels, device=self.device).index_fill_(0, k.to(self.device), 1.0)
                for s, k in zip(sites, keep)]
        x, _ = next(iter(self.loader(64, train=False, split="val")))
        difference = slim_vs_gated(self.classifier, slim, sites, hard, x)
        if difference > SLIM_TOLERANCE:
            raise RuntimeError(f"the slim network differs from the gated one by {difference:.2e} (> "
                               f"{SLIM_TOLERANCE}); physical pruning is broken for backbone {self.name}")
        self.log.info("slim: max |logit difference| to the gated network %.2e", difference)
        save_backbone(self.path("slim"), self.name, slim, blob["keep"])
        atomic_write_json({"max_abs_logit_difference": difference}, self.run_dir.file("slim_check.json"))

    def _stage_finetune(self) -> None:
        s = self.settings
        model = load_backbone(self.require("slim"), self.device, self.input_size)
        for p in model.parameters():
            p.requires_grad_(True)
        loader = self.loader(s.finetune_batch)
        val_loader = self.loader(256, train=False, split="val")
        steps = self._steps("finetune", len(loader))
        val_every = max(1, round(s.val_every_epochs * len(loader)))
        state = finetune(self.run_dir, model, loader, val_loader, steps, lr=s.finetune_lr,
                                momentum=s.finetune_momentum, weight_decay=s.finetune_weight_decay,
                                schedule=s.finetune_schedule, val_every=min(val_every, steps),
                                seconds=self._seconds("finetune"), log=self.log,
                                save_every=min(s.checkpoint_every, len(loader)), policy=self.policy)
        save_backbone(self.path("finetune"), self.name, model, load_checkpoint(self.path("slim"))["keep"],
                      fix=lr_fix("finetune", s.finetune_lr))
        self._record_seconds("finetune", state.seconds)

    def _stage_evaluate(self) -> None:
        self.run_dir.write_metrics(self.evaluate())

    def evaluate(self, explained_images: int = EXPLAINED_IMAGES) -> dict[str, Any]:
        """metrics.json's content (evaluate.evaluate_run), seeded as the evaluate stage is, so that a re-run
        draws the same masks; ``explained_images``: the test prefix of the explanation distance and fidelity."""
        seed_everything(self.seed + STAGES.index("evaluate"))
        return evaluate_run(self, max_explained=explained_images)

    # --- products ----------------------------------------------------------------------------------------
    def final_model(self) -> Backbone:
        return load_backbone(self.require("finetune"), self.device, self.input_size)

    def decoder(self) -> SelectorDecoder:
        return load_decoder(self.require("selector"), self.device)


def reopen_pipeline(run_path: str | Path, data_root: str | None = None, device_name: str | None = None,
                    precision: str | None = None, *, val_source: str | None = None, download: bool = False
                    ) -> Pipeline:
    """The ``Pipeline`` of an existing run directory (its config.json), e.g. to evaluate or study it. Each of
    ``data_root``, ``precision`` and ``val_source`` (None or "auto": the run's own) changes how it is evaluated,
    not how it was trained; ``download`` fetches a missing dataset."""
    from common.data import load_dataset
    from common.run import pick_device

    if not (Path(run_path) / "config.json").is_file():
        raise FileNotFoundError(f"{run_path} is not a run directory (no config.json); train into it first")
    run = RunDir(run_path)
    config = run.read_config()
    device = pick_device(device_name)
    root = data_root if data_root is not None else config.get("data_root")
    if val_source in (None, "auto"):
        val_source = config.get("val_source", "train")
    data = load_dataset(config["dataset"], root, val_source=val_source, download=download)
    budget = Budget(**config["budget"])
    classifier = build_backbone(config["backbone"], data.num_classes)
    settings = IspSettings.from_dict(config["settings"])
    if precision is not None:
        settings = dataclasses.replace(settings, precision=precision)
    # The run's classifier.pt is the source of truth; this instance only supplies the architecture.
    return Pipeline(run.path, classifier, data, budget, settings, device, config.get("seed", 0),
                    backbone_name=config["backbone"])
