"""Hyper-parameters: one dataclass of the paper's defaults (Section 4.1 and Table 5); recipes are
``configs/*.json`` with exactly ``description``, ``backbone``, ``dataset``, ``epochs`` and ``settings`` (a dict
over this dataclass)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.method import read_recipe_file, settings_from_dict

# The keys of every recipe file (configs/*.json), the same layout in every method package.

# Table 5 (lambda_m, lambda_k, lambda_s, R). The paper has no ResNet-20/32/44/110 row: the CIFAR ResNets
# all use the ResNet-56 row.
TABLE5: dict[str, dict[str, float]] = {
    "cifar_resnet": {"lambda_m": 0.01, "lambda_k": 1.0, "lambda_s": 0.00015, "target_ratio": 0.0},
    "vgg16": {"lambda_m": 0.04, "lambda_k": 1.0, "lambda_s": 0.0002, "target_ratio": 0.0},
    "resnet18": {"lambda_m": 0.005, "lambda_k": 1.0, "lambda_s": 0.01, "target_ratio": 0.6},
}
TABLE5_KEYS = ("lambda_m", "lambda_k", "lambda_s", "target_ratio")


def table5_key(backbone: str) -> str:
    if backbone.startswith("resnet") and backbone != "resnet18":
        return "cifar_resnet"
    if backbone in TABLE5:
        return backbone
    raise ValueError(f"decoupling has no defaults for backbone {backbone!r}; "
                     "use resnet20/32/44/56/110, resnet18 or vgg16")


@dataclass
class DecouplingSettings:
    """Every setting of training, deployment and the cost knob. None in a Table 5 field means "the paper's
    row for the backbone" (``resolved``)."""

    # Table 5: Eq. 12 weights and the sparsity target R of Eq. 11 (None: the backbone's row).
    lambda_m: float | None = None
    lambda_k: float | None = None
    lambda_s: float | None = None
    target_ratio: float | None = None
    # Section 4.1 (CIFAR): SGD, momentum 0.9, batch 128, lr 0.1 divided by 10 at 50% and 75% of training.
    # Weight decay is not given in the paper; 1e-4 is the CIFAR ResNet standard (and the authors' code).
    lr: float = 0.1
    controller_lr: float | None = None  # lr of the controllers; None = lr (the paper uses one lr)
    mi_head_lr: float | None = None  # lr of the L_mi heads W_cla; None = controller_lr
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of all steps
    lr_gamma: float = 0.1
    reduction: int = 4  # gamma in Eq. 2
    mi_heads_unscaled: bool = False  # True: the L_mi heads learn from L_mi itself, not lambda_m L_mi (README)
    controller_init: str = "authors"  # "authors" (W1 = 0, b1 = 1, W2 Kaiming, b2 = 1) or "open"
    init_bias: float = 1.0  # "open" init only: G(s) at initialisation, every gate starts open
    # >0: this last share of the steps trains the backbone on CE under hard, frozen gates (not in the paper;
    # an explicit extension, measured with and without in the README)
    finetune_fraction: float = 0.0
    bn_recalibration_batches: int = 0  # >0: re-estimate BN statistics under inference-mode gates after training
    calibration_images: int = 2000  # training images whose paths freeze the filter states for deployment
    # The shared cost knob (benchmark): fraction of the dense start's MACs removed, mean per sample,
    # controllers included. None: the paper's own sparsity setting (L_s with lambda_s and R above). Set: L_s
    # becomes a MAC-weighted hinge at this target during training, and after training one logit offset for
    # every controller is bisected on training images so that the mean MACs land on the target (README).
    target_mac_reduction: float | None = None
    mac_calibration_images: int = 1000  # training images the post-training offset is bisected on
    # common.precision policy of every training and evaluation forward ("auto": bf16 autocast +
    # channels_last where the device has native bf16, else fp32); losses, gates, MACs and metrics stay fp32.
    precision: str = "auto"
    # The static twin (a control, decoupling/twin.py): run_method returns the twin instead of the decoupled
    # network, every dynamic filter fixed to its state on more than ``static_twin_threshold`` of the
    # calibration images, fine-tuned on L_ce for the same budget when ``static_twin_finetune``.
    static_twin: bool = False
    static_twin_finetune: bool = True
    static_twin_threshold: float = 0.5
    static_twin_match_macs: bool = False  # True: the threshold whose twin costs the decoupled network's mean MACs
    checkpoint_every: int = 200  # steps between checkpoints (and at every epoch end; common.loop)
    log_every: int = 50  # steps between log lines (the loop checks the loss on every step)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DecouplingSettings:
        return settings_from_dict(cls, values, "decoupling settings")

    def resolved(self, backbone: str) -> DecouplingSettings:
        """A copy with every Table 5 field that is None filled from ``backbone``'s row."""
        row = TABLE5[table5_key(backbone)]
        filled = dataclasses.replace(self, **{k: row[k] for k in TABLE5_KEYS if getattr(self, k) is None})
        filled.validate()
        return filled

    def validate(self) -> None:
        def fraction(name: str, value: Any, low_open: bool = False, high: float = 1.0, high_open: bool = False):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value < 0 or (low_open and value == 0) or value > high or (high_open and value == high):
                raise ValueError(f"{name} out of range: {value}")

        fraction("target_ratio", self.target_ratio)
        fraction("finetune_fraction", self.finetune_fraction, high_open=True)
        fraction("target_mac_reduction", self.target_mac_reduction, high_open=True)
        fraction("static_twin_threshold", self.static_twin_threshold, high_open=True)
        for name in ("static_twin", "static_twin_finetune", "static_twin_match_macs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("lambda_m", "lambda_k", "lambda_s", "weight_decay", "momentum"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("lr", "controller_lr", "mi_head_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_size", "reduction", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("bn_recalibration_batches", "calibration_images", "mac_calibration_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.controller_init not in ("authors", "open"):
            raise ValueError(f"controller_init must be 'authors' or 'open', got {self.controller_init!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not all(isinstance(m, int | float) and 0 <= m <= 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the steps in [0, 1], got {self.lr_milestones!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_settings(backbone: str, overrides: dict[str, Any] | DecouplingSettings | None = None
                     ) -> DecouplingSettings:
    """Paper defaults for ``backbone`` updated with ``overrides``; unknown keys are an error."""
    if isinstance(overrides, DecouplingSettings):
        return overrides.resolved(backbone)
    return DecouplingSettings.from_dict(overrides).resolved(backbone)


def load_recipe(path: str | None) -> dict[str, Any]:
    """A recipe JSON (a path, or the name of a file in ``configs/``) with exactly ``common.method.RECIPE_KEYS``: text
    ``description``, ``backbone`` and ``dataset``, ``epochs`` (the recipe's total epochs, or null) and a
    ``settings`` dict over ``DecouplingSettings``; {} for None."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        packaged = Path(__file__).parent / "configs" / file.name
        if not packaged.is_file():
            raise FileNotFoundError(f"config {path} not found (packaged configs: "
                             f"{', '.join(p.name for p in (Path(__file__).parent / 'configs').glob('*.json'))})")
        file = packaged
    return read_recipe_file(file)
