"""The pretrained start every method of a preset begins from: published weights, or a cached scratch run."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from common.backbones import Backbone, build_backbone
from common.data import DatasetSplits
from common.method import Budget
from common.run import atomic_torch_save, load_checkpoint

from .baseline import CrossEntropyRecipe, train_cross_entropy
from .presets import Preset


class StartError(RuntimeError):
    """The pretrained start cannot be built (missing weights directory or file)."""


def start_path(preset: Preset, results_dir: Path) -> Path:
    """Where a scratch-trained start is cached (shared by every job of the preset)."""
    return results_dir / "start" / f"{preset.backbone}-{preset.dataset}.pt"


def weights_file(preset: Preset, weights_dir: str | os.PathLike | None) -> Path:
    assert preset.start.file is not None
    if weights_dir is None:
        raise StartError(
            f"preset {preset.name!r} starts from {preset.start.file}; pass --weights-dir DIR (the folder "
            "holding it, e.g. ../shared/data/weights) or set DATA_ROOT so that $DATA_ROOT/weights holds it"
        )
    path = Path(weights_dir).expanduser() / preset.start.file
    if not path.is_file():
        raise StartError(f"pretrained weights {path} not found; check --weights-dir")
    return path


def default_weights_dir(weights_dir: str | os.PathLike | None) -> Path | None:
    """``weights_dir`` if given, else ``$DATA_ROOT/weights`` when DATA_ROOT is set."""
    if weights_dir is not None:
        return Path(weights_dir)
    root = os.environ.get("DATA_ROOT")
    return Path(root) / "weights" if root else None


def prepare_start(preset: Preset, data: DatasetSplits, results_dir: Path, *,
                  weights_dir: str | os.PathLike | None, device: torch.device) -> Backbone:
    """Build (or train once and cache) the start. Scratch starts are trained with seed 0 and the preset's
    batch size; every seed and method of the preset then shares the very same weights."""
    if preset.start.kind == "weights":
        path = weights_file(preset, default_weights_dir(weights_dir))
        return build_backbone(preset.backbone, data.num_classes, weights=path)
    cached = start_path(preset, results_dir)
    model = build_backbone(preset.backbone, data.num_classes)
    if cached.is_file():
        model.load_state_dict(load_checkpoint(cached)["model"])
        return model
    work = cached.parent / f"{cached.stem}-training"
    budget = Budget(epochs=preset.start.epochs)
    recipe = CrossEntropyRecipe(lr=preset.start.lr, batch_size=preset.batch_size)
    outcome = train_cross_entropy(model, data, budget, work, device=device, seed=0, recipe=recipe)
    atomic_torch_save({"model": copy.deepcopy(model).cpu().state_dict(), "val_top1": outcome.val_top1,
                       "steps": outcome.steps}, cached)
    return model.cpu()
