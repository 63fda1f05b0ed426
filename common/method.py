"""The contract between a method's Python entry and the benchmark.

Each method package exposes the same two functions (``RunMethod``, ``LoadRun``):

    run_method(start, data, budget, out_dir, *, device=None, seed=0, settings=None) -> MethodResult
    load_run(path, *, device=None) -> nn.Module

``run_method`` trains from ``start`` (a backbone with pretrained weights) on ``data`` for ``budget``
(resumable in ``out_dir``) and returns what the benchmark measures; the benchmark applies the same metrics to
every returned model. ``load_run`` rebuilds the trained network of a run directory written by the package's
``train`` command or ``run_method`` (pixels in [0, 1] -> logits, in eval mode). ``device=None`` is
``common.run.pick_device``'s default (CUDA when available, else CPU).

Every package's ``metrics.json`` and ``MethodResult.metrics`` name the figures all methods share with
``SHARED_METRIC_KEYS`` (``shared_metrics`` builds them), so that no reader special-cases a method.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone
    from .data import DatasetSplits

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


# The figures every method reports under the same names (metrics.json and MethodResult.metrics):
#   top1                  top-1 accuracy (%) on the reported test split
#   split                 which split that is (DatasetSplits.test_split_name)
#   macs                  mean MACs per image of the network as run (per-sample mean for dynamic networks)
#   mac_reduction         fraction of the dense start's MACs removed, 1 - macs / dense MACs (0 for dense ones)
#   target_mac_reduction  the fraction the settings asked for (None when the method has no target)
#   params                parameters of the network as run
#   precision             compute precision of the evaluation (fp32 or bf16)
SHARED_METRIC_KEYS = ("top1", "split", "macs", "mac_reduction", "target_mac_reduction", "params", "precision")


def shared_metrics(*, top1: float, split: str, macs: float, dense_macs: float, params: int,
                   precision: str, target_mac_reduction: float | None = None) -> dict[str, Any]:
    """The shared figures under their shared names (``SHARED_METRIC_KEYS``)."""
    if not dense_macs > 0:
        raise ValueError(f"dense_macs must be positive, got {dense_macs!r}")
    return {"top1": float(top1), "split": str(split), "macs": float(macs),
            "mac_reduction": 1.0 - float(macs) / float(dense_macs),
            "target_mac_reduction": None if target_mac_reduction is None else float(target_mac_reduction),
            "params": int(params), "precision": str(precision)}


def shared_metric_problems(metrics: dict[str, Any]) -> list[str]:
    """What keeps ``metrics`` from honouring the shared schema: missing keys and values of the wrong kind."""
    problems = [f"missing {key!r}" for key in SHARED_METRIC_KEYS if key not in metrics]
    numbers = {"top1": (0.0, 100.0), "macs": (0.0, math.inf), "mac_reduction": (-math.inf, 1.0),
               "params": (0.0, math.inf)}
    for key, (low, high) in numbers.items():
        value = metrics.get(key)
        if key in metrics and (isinstance(value, bool) or not isinstance(value, int | float)
                               or not low <= value <= high):
            problems.append(f"{key!r} = {value!r} is not a number in [{low}, {high}]")
    target = metrics.get("target_mac_reduction")
    if target is not None and not (isinstance(target, int | float) and 0 < target < 1):
        problems.append(f"'target_mac_reduction' = {target!r} is neither None nor a fraction in (0, 1)")
    for key in ("split", "precision"):
        if key in metrics and not (isinstance(metrics[key], str) and metrics[key]):
            problems.append(f"{key!r} = {metrics[key]!r} is not a non-empty string")
    return problems


class RunMethod(Protocol):
    """``run_method``: the one signature every package (and the benchmark's reference rows) exposes."""

    def __call__(self, start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
                 device: torch.device | str | None = None, seed: int = 0,
                 settings: dict[str, Any] | None = None) -> MethodResult: ...


class LoadRun(Protocol):
    """``load_run``: a package's trained network from a run directory."""

    def __call__(self, path: str | os.PathLike, *, device: torch.device | str | None = None) -> nn.Module: ...


# A recipe (``<package>/configs/*.json``): exactly these top-level keys; ``settings`` is the dict the package's
# settings class takes, ``epochs`` the recipe's total passes over the training set (null: its stage keys decide).
RECIPE_KEYS = ("description", "backbone", "dataset", "epochs", "settings")


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file in the one layout, its layout checked (the package checks ``settings`` against its own
    class). A missing file is a ``FileNotFoundError``, anything else wrong a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        recipe = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"recipe {path} is not valid JSON ({exc})") from None
    if not isinstance(recipe, dict) or set(recipe) != set(RECIPE_KEYS):
        found = sorted(recipe) if isinstance(recipe, dict) else type(recipe).__name__
        raise ValueError(f"recipe {path}: a recipe has exactly the keys {list(RECIPE_KEYS)}, found {found}")
    for key in ("description", "backbone", "dataset"):
        if not isinstance(recipe[key], str) or not recipe[key]:
            raise ValueError(f"recipe {path}: {key!r} must be a non-empty string, got {recipe[key]!r}")
    epochs = recipe["epochs"]
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int | float)
                               or not 0 < epochs < math.inf):
        raise ValueError(f"recipe {path}: 'epochs' must be a positive number or null, got {epochs!r}")
    if not isinstance(recipe["settings"], dict):
        raise ValueError(f"recipe {path}: 'settings' must be a JSON object")
    return recipe
