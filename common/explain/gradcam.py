"""Grad-CAM (Selvaraju et al., ICCV 2017), optionally restricted to a subset of channels (PICNN)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import as_targets, eval_mode, model_device


def _channel_mask(channels: Tensor, batch: int, num_channels: int, device: torch.device) -> Tensor:
    """B x C float mask from a bool mask [C] / [B, C] or an index tensor [k] / [B, k]."""
    channels = torch.as_tensor(channels, device=device)
    if channels.dtype == torch.bool:
        if channels.shape[-1] != num_channels or channels.dim() not in (1, 2):
            raise ValueError(f"bool channel mask must be [C] or [B, C] with C={num_channels}")
        mask = channels.expand(batch, num_channels)
    elif channels.dim() == 1:
        mask = torch.zeros(num_channels, dtype=torch.bool, device=device)
        mask[channels.long()] = True
        mask = mask.expand(batch, num_channels)
    elif channels.dim() == 2:
        mask = torch.zeros(batch, num_channels, dtype=torch.bool, device=device)
        mask.scatter_(1, channels.long(), True)
    else:
        raise ValueError("channels must be a bool mask [C] / [B, C] or an index tensor [k] / [B, k]")
    if mask.shape[0] != batch:
        raise ValueError(f"channel mask has {mask.shape[0]} rows for a batch of {batch}")
    return mask.float()


def grad_cam(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    targets: Tensor | int | Sequence[int] | None = None,
    channels: Tensor | None = None,
    upsample: bool = True,
) -> Tensor:
    """Grad-CAM of `targets` at the output of `layer`, one map per image.

    Definition: with A = the output of `layer` (B x C x h x w, as the rest of the network sees it, i.e.
    after any forward hook registered on `layer` before this call) and y_b = the **logit** of class
    targets[b] for image b,

        alpha[b, k] = (1 / (h*w)) * sum_{i,j} d y_b / d A[b, k, i, j]
        cam[b]      = ReLU( sum_{k in S_b} alpha[b, k] * A[b, k] )

    where S_b is every channel, or the subset given by `channels` (PICNN's class-cluster Grad-CAM sums only
    over the filters of a class cluster). If `upsample`, cam is bilinearly resized (align_corners=False) to
    the input's H x W; bilinear interpolation of a non-negative map stays non-negative.

    Args:
        model: maps float images in [0, 1] (B x 3 x H x W) to logits B x K.
        layer: a submodule of `model` whose output is B x C x h x w. If it runs several times in one forward
            pass, the last call is used.
        images: B x 3 x H x W; moved to the model's device.
        targets: class per image ([B], a sequence or one int); None means the model's predicted class.
        channels: optional bool mask [C] or [B, C], or integer channel indices [k] or [B, k].
        upsample: resize to the input size (True) or return the layer's h x w (False).

    Returns:
        B x H x W (or B x h x w) float tensor, non-negative, detached, on the model's device.

    The model runs in eval mode (each module's training flag is restored afterwards) and under
    enable_grad, so it works inside a caller's no_grad block. The hook detaches the activation into a
    fresh leaf and hands the network a clone of it: gradients are taken with `torch.autograd.grad` w.r.t.
    that leaf only, so no `.grad` is written to any parameter, frozen models work, nothing upstream of the
    layer is differentiated, and in-place ops after the layer (e.g. `ReLU(inplace=True)`) cannot alter the
    captured A. The hook is removed even if the forward fails.
    """
    device = model_device(model, images.device)
    images = images.to(device)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise TypeError("grad_cam needs a layer whose output is one B x C x h x w tensor")
        leaf = output.detach().requires_grad_(True)
        captured[:] = [leaf]
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad(), eval_mode(model):
            logits = model(images)
            if not captured:
                raise RuntimeError("`layer` was not called during the forward pass; is it in `model`?")
            activation = captured[0]
            batch, num_channels = activation.shape[:2]
            if targets is None:
                target_idx = logits.detach().argmax(dim=1)
            else:
                target_idx = as_targets(targets, batch, device)
            # Samples are independent in eval mode, so the gradient of the summed target logits gives
            # every sample's own d y_b / d A_b in one backward pass.
            score = logits.gather(1, target_idx[:, None]).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, activation, allow_unused=True)
    if grad is None:
        raise RuntimeError("the logits do not depend on the output of `layer`")

    alpha = grad.mean(dim=(2, 3))
    if channels is not None:
        alpha = alpha * _channel_mask(channels, batch, num_channels, device)
    cam = F.relu(torch.einsum("bc,bchw->bhw", alpha, activation.detach()))
    if upsample and tuple(cam.shape[-2:]) != tuple(images.shape[-2:]):
        cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam.detach()
