"""The pretrained start every method of a preset begins from: published weights, or a cached scratch run."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from common.backbones import Backbone, build_backbone
from common.data import DatasetSplits
from common.data.paths import DEFAULT_DATA_ROOT, weights_hint
from common.method import Budget
from common.run import atomic_torch_save, load_checkpoint, seed_everything

from .baseline import CrossEntropyRecipe, train_cross_entropy
from .presets import Preset

START_SEED = 0  # every scratch start is trained from the same initialisation, whatever the jobs' seeds
NOX_HINT = "under nox, flags go after --: nox -s leaderboard -- --preset NAME --weights-dir DIR"


class StartError(RuntimeError):
    """The pretrained start cannot be built (missing weights directory or file)."""


def start_key(preset: Preset, val_source: str = "train") -> str:
    """What a scratch start depends on, hashed: a changed start recipe trains (and resumes) its own start."""
    ident = {"backbone": preset.backbone, "dataset": preset.dataset, "start": asdict(preset.start),
             "batch_size": preset.batch_size, "val_fraction": preset.val_fraction, "val_source": val_source,
             "seed": START_SEED, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]


def start_path(preset: Preset, results_dir: Path, val_source: str = "train") -> Path:
    """Where a scratch-trained start is cached (shared by every job of the preset)."""
    return results_dir / "start" / f"{preset.backbone}-{preset.dataset}-{start_key(preset, val_source)}.pt"


def weights_file(preset: Preset, weights_dir: str | os.PathLike | None) -> Path:
    assert preset.start.file is not None
    if weights_dir is None:
        raise StartError(
            f"preset {preset.name!r} starts from the published {preset.start.file}; pass --weights-dir DIR "
            f"(the folder holding it) or set DATA_ROOT so that $DATA_ROOT/weights holds it ({NOX_HINT}); "
            + weights_hint(preset.start.file, "DIR")
        )
    path = Path(weights_dir).expanduser() / preset.start.file
    if not path.is_file():
        raise StartError(f"pretrained weights {path} not found; {weights_hint(preset.start.file, path.parent)}; "
                         f"or pass --weights-dir DIR where it already is ({NOX_HINT})")
    return path


def default_weights_dir(weights_dir: str | os.PathLike | None) -> Path:
    """``weights_dir`` if given, else ``<data root>/weights`` (``$DATA_ROOT``, else ``./data``: the same
    default as the datasets, so a missing file's message names a concrete folder)."""
    if weights_dir is not None:
        return Path(weights_dir)
    return Path(os.environ.get("DATA_ROOT") or DEFAULT_DATA_ROOT) / "weights"


def prepare_start(preset: Preset, data: DatasetSplits, results_dir: Path, *,
                  weights_dir: str | os.PathLike | None, device: torch.device) -> Backbone:
    """Build (or train once and cache) the start. Scratch starts are trained with seed 0 and the preset's
    batch size; every seed and method of the preset then shares the very same weights. Seeded before the
    backbone is built, so the random initialisation (and hence the start) is the same in every process."""
    seed_everything(START_SEED)
    if preset.start.kind == "weights":
        path = weights_file(preset, default_weights_dir(weights_dir))
        return build_backbone(preset.backbone, data.num_classes, weights=path)
    cached = start_path(preset, results_dir, data.val_source)
    model = build_backbone(preset.backbone, data.num_classes)
    if cached.is_file():
        model.load_state_dict(load_checkpoint(cached)["model"])
        return model
    work = cached.parent / f"{cached.stem}-training"
    budget = Budget(epochs=preset.start.epochs)
    recipe = CrossEntropyRecipe(lr=preset.start.lr, batch_size=preset.batch_size)
    outcome = train_cross_entropy(model, data, budget, work, device=device, seed=START_SEED, recipe=recipe)
    atomic_torch_save({"model": copy.deepcopy(model).cpu().state_dict(), "val_top1": outcome.val_top1,
                       "steps": outcome.steps}, cached)
    return model.cpu()
