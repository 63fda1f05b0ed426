"""Deletion / insertion curves (RISE, Petsiuk et al., BMVC 2018), as used for DRIB's Fig. 3."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from ._utils import as_maps, as_targets, eval_mode, mixed_scores, model_device, stable_rank, steps_to_count

BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


@dataclass
class PerturbationCurves:
    """Scores along a deletion or insertion game.

    fractions: [S+1] fraction of pixels deleted / inserted at each step (0 at step 0, 1 once all are).
    scores:    [B, S+1] softmax probability of the target class at each step.
    auc:       [B] trapezoidal area under `scores` against `fractions` (so the x axis is [0, 1]).
    """

    fractions: Tensor
    scores: Tensor
    auc: Tensor


def make_baseline(images: Tensor, baseline: str | Tensor) -> Tensor:
    """The B x C x H x W canvas that deleted pixels take / inserted pixels are copied onto.

    "zero": black. "mean": each image's per-channel spatial mean. "blur": Gaussian blur of the image,
    kernel 11 and sigma 5 (RISE's insertion canvas), reflect padding; on images smaller than 6 px the
    kernel shrinks to the largest odd size reflect padding allows. A tensor is broadcast to the images'
    shape (e.g. a scalar, a [C, 1, 1] colour or a full B x C x H x W canvas).
    """
    if isinstance(baseline, Tensor):
        return baseline.to(device=images.device, dtype=images.dtype).expand_as(images)
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if baseline == "blur":
        # Reflect padding needs pad < side, i.e. kernel <= 2 * side - 1.
        kernel = min(BLUR_KERNEL, 2 * min(images.shape[-2:]) - 1)
        return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[BLUR_SIGMA, BLUR_SIGMA])
    raise ValueError(f"unknown baseline {baseline!r}; use 'zero', 'mean', 'blur' or a tensor")


def _perturbation_game(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None,
    steps: int,
    step_fraction: float,
    baseline: str | Tensor,
    batch_size: int,
    insert: bool,
) -> PerturbationCurves:
    if steps < 1 or not 0 < step_fraction <= 1:
        raise ValueError("need steps >= 1 and 0 < step_fraction <= 1")
    device = model_device(model, images.device)
    images = images.to(device)
    b, _, h, w = images.shape
    maps = as_maps(saliency, (h, w), device)
    if targets is None:
        with torch.no_grad(), eval_mode(model):
            target_idx = model(images).argmax(dim=1)
    else:
        target_idx = as_targets(targets, b, device)

    per_step = steps_to_count(step_fraction, h * w)
    counts = (torch.arange(steps + 1, device=device) * per_step).clamp_max(h * w)
    rank = stable_rank(maps.reshape(b, h * w), descending=True)
    canvas = make_baseline(images, baseline)
    front, back = (images, canvas) if insert else (canvas, images)
    scores = mixed_scores(model, front, back, rank, counts, target_idx, batch_size)
    fractions = counts.float() / (h * w)
    return PerturbationCurves(fractions, scores, torch.trapezoid(scores, fractions, dim=1))


def deletion_curve(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None,
    *,
    steps: int = 113,
    step_fraction: float = 0.009,
    baseline: str | Tensor = "zero",
    batch_size: int = 64,
) -> PerturbationCurves:
    """Deletion game: delete the most salient pixels first, track the target probability (lower AUC better).

    Pixels of each image are ranked by descending saliency (ties: lower flat index first, i.e. row-major).
    With n = ceil(step_fraction * H * W) pixels per step, the image at step s (s = 0..steps) has its top
    min(s * n, H * W) pixels set, in every channel, to the baseline (see `make_baseline`; default black).
    The score is softmax(model(x_s))[target]. DRIB's Fig. 3 uses 113 steps of 0.9%, so the last steps sit
    at 100% deleted. Step 0 is the clean image; the final point is the baseline image's score whenever
    steps * n >= H * W.

    `saliency` is B x H x W or B x 1 x H x W; a map of another size is bilinearly resized to H x W first.
    `targets` None means the model's prediction on the clean images. The B * (steps+1) images are
    evaluated `batch_size` at a time under no_grad, in eval mode (training flags restored).
    """
    return _perturbation_game(
        model, images, saliency, targets, steps, step_fraction, baseline, batch_size, insert=False
    )


def insertion_curve(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None,
    *,
    steps: int = 113,
    step_fraction: float = 0.009,
    baseline: str | Tensor = "blur",
    batch_size: int = 64,
) -> PerturbationCurves:
    """Insertion game: copy the most salient pixels first onto a baseline canvas (higher AUC is better).

    Same ranking and step sizes as `deletion_curve`; at step s the top min(s * n, H * W) pixels carry the
    image's values and every other pixel the baseline's (default: the Gaussian-blurred image, as in RISE).
    Step 0 is the baseline image's score; the final point is the clean image's score whenever
    steps * n >= H * W.
    """
    return _perturbation_game(model, images, saliency, targets, steps, step_fraction, baseline, batch_size, insert=True)
