"""The objectives, one function per paper equation: the predictor's and selector's KL (Eq. 6-9) with the
mask penalties R and S (Eq. 9), the interpretation term of Eq. 10, R_res (supplementary Sec. 3.2) and the
whole pruning objective (Eq. 10)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.precision import Precision

from .rbf import mask_input, rbf_mass_outside_frame, sample_mask
from .selector import SelectorDecoder


def kl_to_classifier(classifier_logits: Tensor, predictor_logits: Tensor) -> Tensor:
    """KL(Q_class(y | x) || q_pred(y | m(x))), averaged over the batch (Eq. 7, 9), always in fp32 (logits
    from a bf16 forward are cast first: common.precision)."""
    return F.kl_div(F.log_softmax(predictor_logits.float(), 1), F.log_softmax(classifier_logits.float(), 1),
                    log_target=True, reduction="batchmean")


def area_penalty(mask: Tensor) -> Tensor:
    """R(m') of Eq. 9, ||m'||_0 relaxed to the mean of the relaxed mask (fraction of kept pixels), per sample."""
    return mask.flatten(1).mean(1)


def smoothness_penalty(mask: Tensor) -> Tensor:
    """S(m') of Eq. 9, per sample, as the *mean* over the 2 M N - M - N neighbour pairs of the squared
    difference (the paper's sum divided by the pair count, 1,984 on 32 x 32), so that R and S are both
    fractions in [0, 1] and lambda1, lambda2 weigh comparable numbers (README, deviations)."""
    vertical = (mask[:, 1:, :] - mask[:, :-1, :]).pow(2).flatten(1).sum(1)
    horizontal = (mask[:, :, 1:] - mask[:, :, :-1]).pow(2).flatten(1).sum(1)
    height, width = mask.shape[-2:]
    pairs = (height - 1) * width + height * (width - 1)
    if pairs == 0:
        raise ValueError(f"a {height} x {width} mask has no neighbour pairs")
    return (vertical + horizontal) / pairs


def outside_area_penalty(code: Tensor, height: int, width: int) -> Tensor:
    """What ``selector_area = "plane"`` adds to R(m') (not the paper), per sample: the RBF kernel's expected mass
    outside the H x W frame (``rbf_mass_outside_frame``, code (c_z, c_t, sigma) in pixels) in units of the
    frame's pixel count, so that a kernel cannot lower its area by hanging out of the image. fp32."""
    return rbf_mass_outside_frame(code.float(), height, width) / (height * width)


@dataclass
class SelectorLossParts:
    kl: Tensor
    area: Tensor
    smoothness: Tensor
    total: Tensor


def selector_loss(classifier_logits: Tensor, predictor: nn.Module, images: Tensor, probs: Tensor, *,
                  lambda1: float, lambda2: float, tau: float, generator: torch.Generator | None = None,
                  policy: Precision | None = None, samples: int = 1,
                  outside_area: Tensor | None = None) -> SelectorLossParts:
    """Eq. 8-9: KL + lambda1 R(m') + lambda2 S(m') on ``samples`` relaxed samples m' (Eq. 14) per image (the
    paper: one), drawn by the predictor's own sampler at its own temperature ``tau`` (R: fraction of kept
    pixels, S: mean over neighbour pairs; both in [0, 1]). More samples average the Monte-Carlo estimate of
    the expectation in Eq. 8, not its value. ``outside_area`` (per image, ``outside_area_penalty``; the
    ``selector_area = "plane"`` control) is added to R before lambda1, and the returned ``area`` includes it.
    The predictor runs under ``policy`` (a common.precision.Precision; None: as called); mask, penalties and KL
    are fp32."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if outside_area is not None and tuple(outside_area.shape) != (len(probs),):
        raise ValueError(f"outside_area must hold one value per image, {len(probs)}, got "
                         f"{tuple(outside_area.shape)}")
    if samples > 1:
        classifier_logits, images, probs = (t.repeat_interleave(samples, 0)
                                            for t in (classifier_logits, images, probs))
    mask = sample_mask(probs.float(), tau, generator)
    masked = mask_input(images, mask)
    if policy is None:
        predicted = predictor(masked)
    else:
        with policy.autocast():
            predicted = predictor(policy.prepare_inputs(masked))
    kl = kl_to_classifier(classifier_logits, predicted)
    area = area_penalty(mask).mean()
    if outside_area is not None:  # each image repeated ``samples`` times: the mean over images is the same
        area = area + outside_area.float().mean()
    smooth = smoothness_penalty(mask).mean()
    return SelectorLossParts(kl, area, smooth, kl + lambda1 * area + lambda2 * smooth)


def resource_loss(macs: Tensor, target: float) -> Tensor:
    """R_res(x, y) = log(max(x, y) / y) (supplementary Sec. 3.2): zero once T(v) <= p T_all."""
    return torch.log(torch.clamp(macs, min=target) / target)


INTERPRETATION_UNITS = ("pixels", "image")
GATE_OBJECTIVES = ("eq10", "authors")
# The authors' code (reference-code notes, ISP "Gate search"): 10 x MSE of the RBF parameters, no cross-entropy.
AUTHORS_MSE_WEIGHT = 10.0


@dataclass
class GateLossWeights:
    classification: float = 1.0
    gamma1: float = 0.5
    gamma2: float = 2.0
    target_ratio: float = 0.5  # p
    interpretation_units: str = "pixels"  # "pixels": C_x as predicted (paper); "image": / image side
    objective: str = "eq10"  # "eq10": the paper's Eq. 10; "authors": 10 MSE(C_x) + gamma2 R_res, no CE


def comparable_code(code: Tensor, decoder: SelectorDecoder, units: str) -> Tensor:
    """The explanation code in the units the interpretation term of Eq. 10 compares.

    "pixels" (the paper's): (c_z, c_t, sigma) as the selector predicts them, the units gamma1 = 0.5 of the
    supplementary was chosen for. "image": divided by (H, W, max(H, W)),
    which shrinks the squared distance by about H W and the term's weight with it. REAL-X codes are compared as
    Bernoulli parameters, averaged over the pixels.
    """
    if decoder.kind == "realx":
        return torch.sigmoid(code).flatten(1) / math.sqrt(code[0].numel())
    if units == "pixels":
        return code
    if units != "image":
        raise ValueError(f"interpretation_units must be one of {INTERPRETATION_UNITS}, got {units!r}")
    height, width = decoder.shape.image_size
    return code / code.new_tensor([height, width, max(height, width)])


def interpretation_loss(target_codes: Tensor, codes: Tensor, decoder: SelectorDecoder, units: str) -> Tensor:
    """Eq. 10, second term: ||C_x - f_sel(x; beta, v)||_2^2, averaged over the batch."""
    return (comparable_code(target_codes, decoder, units) - comparable_code(codes, decoder, units)
            ).pow(2).flatten(1).sum(1).mean()


def gate_loss_terms(logits: Tensor, labels: Tensor, target_codes: Tensor, codes: Tensor,
                    decoder: SelectorDecoder, macs: Tensor, target_macs: float, weights: GateLossWeights
                    ) -> dict[str, Tensor]:
    """The weighted terms of the gate-search objective, by name ("classification", "interpretation",
    "resource"); a term with zero weight is left out.

    "eq10": CE + gamma1 ||C_x - f_sel||^2 (in ``interpretation_units``) + gamma2 R_res (paper Eq. 10).
    "authors": 10 MSE(C_x, f_sel) in pixels (the mean over the three parameters and the batch) + gamma2 R_res,
    the authors' code's search (no classification loss; its resource weight is 1, here gamma2)."""
    if weights.objective not in GATE_OBJECTIVES:
        raise ValueError(f"gate objective must be one of {GATE_OBJECTIVES}, got {weights.objective!r}")
    terms: dict[str, Tensor] = {}
    if weights.objective == "authors":
        terms["interpretation"] = AUTHORS_MSE_WEIGHT * F.mse_loss(comparable_code(codes, decoder, "pixels"),
                                                                  comparable_code(target_codes, decoder, "pixels"))
    else:
        if weights.classification:
            terms["classification"] = weights.classification * F.cross_entropy(logits, labels)
        if weights.gamma1:
            terms["interpretation"] = weights.gamma1 * interpretation_loss(target_codes, codes, decoder,
                                                                           weights.interpretation_units)
    terms["resource"] = weights.gamma2 * resource_loss(macs, target_macs)
    return terms


def pruning_loss(logits: Tensor, labels: Tensor, target_codes: Tensor, codes: Tensor, decoder: SelectorDecoder,
                 macs: Tensor, target_macs: float, weights: GateLossWeights) -> Tensor:
    """Eq. 10: L(f(x; W, v), y) + gamma1 ||C_x - f_sel(x; beta, v)||^2 + gamma2 R_res(T(v), p T_all)
    (gamma1 = 0: the steering ablation, pruning by accuracy and resources only), or the authors' form
    (``gate_loss_terms``)."""
    terms = gate_loss_terms(logits, labels, target_codes, codes, decoder, macs, target_macs, weights)
    return torch.stack(list(terms.values())).sum()


def gradient_shares(terms: dict[str, Tensor], parameter: Tensor) -> dict[str, dict[str, float]]:
    """Each loss term's gradient w.r.t. ``parameter`` (the gate logits theta): its L2 norm, its share of the
    summed norms, and its cosine with the total gradient (how much of the step it steers). The graph is kept,
    so the caller can still back-propagate the total."""
    grads = {}
    for name, term in terms.items():
        (grad,) = torch.autograd.grad(term, parameter, retain_graph=True, allow_unused=True)
        grads[name] = torch.zeros_like(parameter) if grad is None else grad.detach()
    total = torch.stack(list(grads.values())).sum(0)
    norm_sum = sum(float(g.norm()) for g in grads.values())
    out = {}
    for name, grad in grads.items():
        norm = float(grad.norm())
        cosine = float(F.cosine_similarity(grad.flatten(), total.flatten(), dim=0)) if norm and total.norm() else 0.0
        out[name] = {"grad_norm": norm, "share": norm / norm_sum if norm_sum else 0.0, "cosine_with_total": cosine,
                     "value": float(terms[name].detach())}
    return out
