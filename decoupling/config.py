"""Hyper-parameters: paper defaults (Section 4.1 and Table 5), overridable by a JSON config or a dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.run import read_json

# Keys a recipe file (configs/*.json) may hold besides "description".
CONFIG_KEYS = {"backbone", "dataset", "epochs", "seconds", "max_batches", "settings"}

# Table 5 (lambda_m, lambda_k, lambda_s, R). The paper has no ResNet-20/32/44/110 row: the CIFAR ResNets
# all use the ResNet-56 row.
TABLE5: dict[str, dict[str, float]] = {
    "cifar_resnet": {"lambda_m": 0.01, "lambda_k": 1.0, "lambda_s": 0.00015, "target_ratio": 0.0},
    "vgg16": {"lambda_m": 0.04, "lambda_k": 1.0, "lambda_s": 0.0002, "target_ratio": 0.0},
    "resnet18": {"lambda_m": 0.005, "lambda_k": 1.0, "lambda_s": 0.01, "target_ratio": 0.6},
}

# Section 4.1 (CIFAR): SGD, momentum 0.9, batch 128, lr 0.1 divided by 10 at 50% and 75% of training.
# Weight decay is not given in the paper; 1e-4 is the CIFAR ResNet standard.
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 0.1,
    "controller_lr": None,  # lr of the controllers; None = lr (the paper uses one lr)
    "mi_head_lr": None,  # lr of the L_mi heads W_cla; None = controller_lr
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "batch_size": 128,
    "lr_milestones": [0.5, 0.75],  # fractions of the total number of steps
    "lr_gamma": 0.1,
    "reduction": 4,  # gamma in Eq. 2
    "mi_heads_unscaled": False,  # True: the L_mi heads learn from L_mi itself, not lambda_m L_mi (README)
    "controller_init": "authors",  # "authors" (their code: W1 = 0, b1 = 1, W2 Kaiming, b2 = 1) or "open"
    "init_bias": 1.0,  # "open" init only: G(s) at initialisation, every gate starts open
    "finetune_fraction": 0.0,  # >0: this last share of the steps trains the backbone on CE under hard,
    # frozen gates (not in the paper, which trains 200 epochs; a short budget needs it, see README)
    "bn_recalibration_batches": 0,  # >0: re-estimate BN statistics under inference-mode gates after training
    "calibration_images": 2000,  # training images whose paths freeze the filter states for deployment
    "checkpoint_every": 200,  # steps between checkpoints (and at every epoch end)
    "log_every": 50,  # steps between finite-loss checks and log lines
}


def table5_key(backbone: str) -> str:
    if backbone.startswith("resnet") and backbone != "resnet18":
        return "cifar_resnet"
    if backbone in TABLE5:
        return backbone
    raise ValueError(f"decoupling has no defaults for backbone {backbone!r}; "
                     "use resnet20/32/44/56/110, resnet18 or vgg16")


def resolve_settings(backbone: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Paper defaults for ``backbone`` updated with ``overrides``; unknown keys are an error."""
    settings = {**TRAINING_DEFAULTS, **TABLE5[table5_key(backbone)]}
    unknown = sorted(set(overrides or {}) - set(settings))
    if unknown:
        raise ValueError(f"unknown decoupling settings {unknown}; known: {sorted(settings)}")
    settings.update(overrides or {})
    return settings


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE parsed as JSON when it can be) -> a settings dict."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def load_recipe(path: str | None) -> dict[str, Any]:
    """A recipe JSON (a path, or the name of a file in ``configs/``); {} for None."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        packaged = Path(__file__).parent / "configs" / file.name
        if not packaged.is_file():
            raise FileNotFoundError(f"config {path} not found (packaged configs: "
                             f"{', '.join(p.name for p in (Path(__file__).parent / 'configs').glob('*.json'))})")
        file = packaged
    recipe = read_json(file)
    unknown = set(recipe) - CONFIG_KEYS - {"description"}
    if unknown:
        raise ValueError(f"config {path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    return recipe
