"""One function per training stage: predictor (Eq. 6-7), selector (Eq. 8-9), gate search (Eq. 10) and
fine-tuning. Each takes its models, data and step count and runs through the resumable ``run_steps``."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone
from common.data import BatchLoader, ImageTensors
from common.run import RunDir
from common.training import evaluate_top1

from .gates import ChannelGates, GateInjector, PrunableMacs, PrunableSite, resource_loss
from .loop import LoopState, batch_stream, run_steps
from .rbf import (
    area_penalty,
    mask_input,
    rbf_bernoulli,
    sample_mask,
    sample_random_rbf_params,
    smoothness_penalty,
)
from .selector import SelectorDecoder, forward_with_stages


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (BN statistics fixed) and no gradients: the classifier and predictor are never updated."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def kl_to_classifier(classifier_logits: Tensor, predictor_logits: Tensor) -> Tensor:
    """KL(Q_class(y | x) || q_pred(y | m(x))), averaged over the batch (Eq. 7, 9)."""
    return F.kl_div(F.log_softmax(predictor_logits, 1), F.log_softmax(classifier_logits, 1), log_target=True,
                    reduction="batchmean")


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
                    sigma_max: float | None = None, save_every: int = 200) -> LoopState:
    """Eq. 6: min_theta E_x E_(c, sigma) E_m' KL(Q_class(y | x) || q_pred(y | m'(x))), m' relaxed at ``tau``."""
    freeze(classifier)
    predictor.train()
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    batches = None

    def step(i: int) -> Tensor:
        nonlocal batches
        if batches is None:
            batches = batch_stream(loader, i)
        x, _ = next(batches)
        with torch.no_grad():
            teacher = classifier(x)
        masks = random_masks(len(x), tuple(x.shape[-2:]), kind, x.device, tau, sigma_max)
        loss = kl_to_classifier(teacher, predictor(mask_input(x, masks)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return run_steps(run, "predictor", {"predictor": predictor, "optimizer": optimizer}, steps, step,
                     seconds=seconds, save_every=save_every, log=log)


@dataclass
class SelectorLossParts:
    kl: Tensor
    area: Tensor
    smoothness: Tensor
    total: Tensor


def selector_loss(classifier_logits: Tensor, predictor: nn.Module, images: Tensor, probs: Tensor, *,
                  lambda1: float, lambda2: float, tau: float, generator: torch.Generator | None = None
                  ) -> SelectorLossParts:
    """Eq. 8-9: KL + lambda1 R(m') + lambda2 S(m') on one relaxed sample m' (Eq. 14) per image, drawn by the
    predictor's own sampler at its own temperature ``tau`` (R: fraction of kept pixels, S: mean over
    neighbour pairs; both in [0, 1])."""
    mask = sample_mask(probs, tau, generator)
    kl = kl_to_classifier(classifier_logits, predictor(mask_input(images, mask)))
    area = area_penalty(mask).mean()
    smooth = smoothness_penalty(mask).mean()
    return SelectorLossParts(kl, area, smooth, kl + lambda1 * area + lambda2 * smooth)


def train_selector(run: RunDir, classifier: Backbone, predictor: Backbone, decoder: SelectorDecoder,
                   loader: BatchLoader, steps: int, *, lr: float, weight_decay: float, lambda1: float,
                   lambda2: float, tau: float, seconds: float | None, log,
                   save_every: int = 200) -> LoopState:
    """Only the decoder learns; the encoder (the classifier's backbone) and the predictor stay frozen."""
    freeze(classifier)
    freeze(predictor)
    decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    batches = None

    def step(i: int) -> Tensor:
        nonlocal batches
        if batches is None:
            batches = batch_stream(loader, i)
        x, _ = next(batches)
        with torch.no_grad():
            logits, stages = forward_with_stages(classifier, x)
        code = decoder.code(stages, logits.argmax(1))
        parts = selector_loss(logits, predictor, x, decoder.probabilities(code), lambda1=lambda1,
                              lambda2=lambda2, tau=tau)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        return parts.total

    return run_steps(run, "selector", {"decoder": decoder, "optimizer": optimizer}, steps, step,
                     seconds=seconds, save_every=save_every, log=log)


@torch.no_grad()
def explanation_targets(classifier: Backbone, decoder: SelectorDecoder, images: Tensor, batch_size: int = 256
                        ) -> tuple[Tensor, Tensor]:
    """C_x of Eq. 10 for every image (the unpruned selector's code) and the class it explains."""
    freeze(classifier)
    decoder.eval()
    codes, classes = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        logits, stages = forward_with_stages(classifier, x)
        target = logits.argmax(1)
        codes.append(decoder.code(stages, target))
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


@dataclass
class GateLossWeights:
    classification: float = 1.0
    gamma1: float = 0.5
    gamma2: float = 2.0
    target_ratio: float = 0.5  # p
    interpretation_units: str = "image"  # "image": RBF parameters / image side; "pixels": as predicted


def comparable_code(code: Tensor, decoder: SelectorDecoder, units: str) -> Tensor:
    """The explanation code in the units the interpretation term of Eq. 10 compares.

    "pixels": (c_z, c_t, sigma) as predicted. "image": divided by (H, W, max(H, W)), so the squared distance is
    O(0.01-0.1) like the other two terms; in pixel units it is O(10-100) and gamma1 = 0.5 drowns the resource
    term (no gate closes). REAL-X codes are compared as Bernoulli parameters, averaged over the pixels.
    """
    if decoder.kind == "realx":
        return torch.sigmoid(code).flatten(1) / math.sqrt(code[0].numel())
    if units == "pixels":
        return code
    if units != "image":
        raise ValueError(f"interpretation_units must be 'image' or 'pixels', got {units!r}")
    height, width = decoder.shape.image_size
    return code / code.new_tensor([height, width, max(height, width)])


def search_gates(run: RunDir, classifier: Backbone, decoder: SelectorDecoder, sites: list[PrunableSite],
                 gates: ChannelGates, macs: PrunableMacs, subset: PruningSubset, steps: int, *, batch_size: int,
                 lr: float, weights: GateLossWeights, seed: int, seconds: float | None, log,
                 save_every: int = 200) -> LoopState:
    """Eq. 10: min_theta CE(f(x; W, v), y) + gamma1 ||C_x - f_sel(x; beta, v)||^2 + gamma2 R_res(T(v), p T_all).
    W (classifier) and beta (decoder) are frozen; only the gate logits theta learn."""
    freeze(classifier)
    freeze(decoder)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    target_macs = weights.target_ratio * macs.total
    injector = GateInjector(sites)
    batches = None

    def step(i: int) -> Tensor:
        nonlocal batches
        if batches is None:
            batches = subset_batches(subset, batch_size, i, seed)
        x, y, codes, explained = next(batches)
        values = gates.sample()
        injector.values = values
        with injector:
            logits, stages = forward_with_stages(classifier, x)
            code = decoder.code(stages, explained)
        units = weights.interpretation_units
        interpretation = (comparable_code(codes, decoder, units) - comparable_code(code, decoder, units)
                          ).pow(2).flatten(1).sum(1).mean()
        loss = (weights.classification * F.cross_entropy(logits, y) + weights.gamma1 * interpretation
                + weights.gamma2 * resource_loss(macs(values), target_macs))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return run_steps(run, "gates", {"gates": gates, "optimizer": optimizer}, steps, step, seconds=seconds,
                     save_every=save_every, log=log)


def finetune(run: RunDir, model: Backbone, loader: BatchLoader, val_loader: BatchLoader, steps: int, *, lr: float,
             momentum: float, weight_decay: float, schedule: str, val_every: int, seconds: float | None, log,
             save_every: int = 200) -> LoopState:
    """SGD fine-tuning of the slim model; the step with the best validation top-1 is kept (never the test set)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    batches = None

    def lr_at(i: int) -> float:
        if schedule == "cosine":
            return 0.5 * lr * (1 + math.cos(math.pi * i / steps))
        if schedule == "step":  # x0.1 at 50% and 75% of training (the reference recipe)
            return lr * (0.1 ** ((i >= steps // 2) + (i >= 3 * steps // 4)))
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'cosine' or 'step'")

    def step(i: int) -> Tensor:
        nonlocal batches
        if batches is None:
            batches = batch_stream(loader, i)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i)
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def validate(done: int, state: LoopState) -> None:
        top1 = evaluate_top1(model, val_loader, desc="validate")
        model.train()
        if log:
            log.info("finetune step %d: val top-1 %.2f", done, top1)
        if top1 > state.extra.get("best_val_top1", -1.0):
            state.extra["best_val_top1"] = top1
            state.extra["best_step"] = done
            state.extra["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    state = run_steps(run, "finetune", {"model": model, "optimizer": optimizer}, steps, step, seconds=seconds,
                      on_period=validate, period=val_every, save_every=save_every, log=log)
    if "best_state" in state.extra:
        model.load_state_dict(state.extra["best_state"])
    model.eval()
    return state


def subset_indices(n: int, fraction: float, seed: int) -> Tensor:
    """A fixed random ``fraction`` of the training set (at least one image)."""
    count = max(1, round(fraction * n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]


def images_as_float(split: ImageTensors, device: torch.device) -> Tensor:
    return split.images.to(device).float().div_(255.0)


def clone_backbone(model: Backbone) -> Backbone:
    return copy.deepcopy(model)
