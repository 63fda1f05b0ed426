"""The contract between a method's Python entry and the benchmark.

Each method package exposes ``run_method(start, data, budget, out_dir, settings) -> MethodResult``:
train from ``start`` (a backbone with pretrained weights) on ``data`` for ``budget`` and return what the
benchmark measures. The benchmark applies the same metrics to every returned model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from torch import Tensor, nn

# (images in [0, 1], target classes) -> saliency maps B x H x W, higher = more relevant.
SaliencyFn = Callable[[Tensor, Tensor], Tensor]
# images -> (logits, per-sample MACs as float64 B)
DynamicForward = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Budget:
    """The same budget for every method: ``epochs`` passes over the training set (a method with several
    stages shares them out), optionally capped at ``seconds`` of wall-clock training time; ``max_batches``
    caps every epoch (for smoke runs)."""

    epochs: float
    seconds: float | None = None
    max_batches: int | None = None

    def batches(self, per_epoch: int) -> int:
        """Total optimisation steps this budget allows at ``per_epoch`` batches per epoch."""
        if self.max_batches is not None:
            per_epoch = min(per_epoch, self.max_batches)
        return max(1, round(self.epochs * per_epoch))


@dataclass
class MethodResult:
    """What a method hands to the benchmark.

    model: the final network (pixels in [0, 1] -> logits), on the device it was trained on.
    saliency: the method's own explanation, or None to use the common Grad-CAM.
    dynamic_forward: for input-dependent models, logits and per-sample MACs; None for static models.
    mis_layer: the module whose output is the interpreted feature map (for MIS and Grad-CAM).
    dynamic_filter_share: share of gated filters whose state depends on the input (dynamic models).
    metrics: the method's own metrics (credibility, ACC2/ACC3, ...), reported as extra columns.
    train_seconds: measured device time spent training.
    """

    model: nn.Module
    saliency: SaliencyFn | None = None
    dynamic_forward: DynamicForward | None = None
    mis_layer: nn.Module | None = None
    dynamic_filter_share: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0


S = TypeVar("S")


def settings_from_dict(cls: type[S], values: dict[str, Any] | None, what: str) -> S:
    """``cls(**values)`` for a method's settings dataclass, then its ``validate()`` when it has one.

    An unknown key is a ``ValueError`` naming it and the known keys (``what`` names the settings, e.g.
    "ISP settings"); keys starting with an underscore are comments in recipe files and are ignored."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    settings = cls(**{k: v for k, v in values.items() if k in known})
    validate = getattr(settings, "validate", None)
    if callable(validate):
        validate()
    return settings
