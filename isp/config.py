"""Every hyperparameter of the pipeline, with the paper's values as defaults (supplementary Sec. 3), and the
recipes of ``isp/configs/`` that set some of them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from common.method import read_recipe_file, settings_from_dict

STAGE_SHARES = {"predictor": 0.3, "selector": 0.1, "gates": 0.1, "finetune": 0.5}
SELECTOR_AREAS = ("frame", "plane")  # R(m') over the image (the paper) or the whole plane (a control)


@dataclass
class IspSettings:
    selector: str = "rbf"  # "rbf" (ISP) or "realx" (independent per-pixel Bernoulli, for Fig. 1 / Fig. 4a)
    # Stage lengths in epochs; None takes the stage's share of the budget (STAGE_SHARES). Gate epochs are
    # passes over the pruning subset. Paper CIFAR-10: 300 / 10 / 200 / 200.
    predictor_epochs: float | None = None
    selector_epochs: float | None = None
    gate_epochs: float | None = None
    finetune_epochs: float | None = None
    # Predictor (Eq. 6-7): Adam 1e-4, betas (0.9, 0.999), weight decay 1e-4, batch 128.
    predictor_batch: int = 128
    predictor_lr: float = 1e-4
    predictor_weight_decay: float = 1e-4
    predictor_from_classifier: bool = True  # start from the classifier's weights (paper: ImageNet yes, CIFAR no)
    predictor_sigma_max: float | None = None  # random kernels' sigma ~ U[0, this]; None: 2 max(M, N) (paper)
    # Predictor masks AND selector objective: one relaxed-Bernoulli sampler at this temperature (reference
    # code's predictor: RelaxedBernoulli(T = 0.1)); 0 = hard Bernoulli for both. Never differs between them.
    mask_tau: float = 0.1
    # Selector (Eq. 8-9, 14): same optimiser, batch 16, lambda1 = 0.2, lambda2 = 0.001 (CIFAR), tau = 1.
    selector_batch: int = 16
    selector_lr: float = 1e-4
    selector_weight_decay: float = 1e-4
    lambda1: float = 0.2
    lambda2: float = 0.001
    selector_samples: int = 1  # relaxed masks per image in Eq. 8's Monte-Carlo estimate (paper: 1)
    # R(m') of Eq. 9 over "frame" (the paper: kept fraction of the image's pixels) or "plane" (not the paper,
    # RBF only): plus the kernel's expected mass outside the frame / (H W), so hanging out of the image saves
    # no area; a control for whether the selector's off-centre offset comes from R counting only the frame.
    selector_area: str = "frame"
    # Checkpoint choice (not in the paper): the selector objective on this many fixed validation images with
    # fixed mask noise, every selector_val_every steps; the lowest is kept (0 images: the last step is kept).
    selector_val_images: int = 256
    selector_val_every: int = 50
    centre_margin: float = 2.0  # c = (S/2 - margin) tanh(u / (S/2 - margin)) + S/2
    sigma_bias: float | None = None  # None: 10 for 32-pixel images (paper), scaled with the image size
    # Gate search (Eq. 10, supplementary Eq. 15): b = 3, tau = 0.4, gamma1 = 0.5, gamma2 = 2, 5% subset,
    # Adam, batch 128. The learning rate is not in the paper (reference code: 1e-3).
    subset_fraction: float = 0.05
    gate_batch: int = 128
    gate_lr: float = 1e-3
    gate_bias: float = 3.0
    gate_tau: float = 0.4
    # Channels per gate (one logit per group): "auto" = the CPU's channel block (16 on AVX-512, 8 on AVX2;
    # hardware.py) on CPU runs and 1 elsewhere; 1 = the paper's per-channel gates.
    channel_group: int | str = "auto"
    classification_weight: float = 1.0  # 0 reproduces the paper's "w/o classification loss" ablation
    gamma1: float = 0.5
    gamma2: float = 2.0
    target_ratio: float = 0.5  # p: keep p of the prunable MACs T_all
    # The shared cost knob (benchmark): fraction of the dense start's MACs (whole model) to remove. None: the
    # paper's own p above. Set: p = 1 - target x MACs(model) / T_all, channel groups coarser than the target
    # allows are refined, and the hard gates are calibrated by logit order to land on the target (README).
    target_mac_reduction: float | None = None
    # C_x of Eq. 10 compared as the selector's raw (c_z, c_t, sigma) in pixels, the units of the paper's
    # gamma1 = 0.5 ("image": divided by the image side: gamma1 then weighs ~1/1000 as much).
    interpretation_units: str = "pixels"
    # "eq10": the paper's objective; "authors": the authors' code's (10 x MSE of the RBF parameters in pixels
    # + gamma2 R_res, no cross-entropy; classification_weight, gamma1 and the units are then unused).
    gate_objective: str = "eq10"
    # Every this many gate steps, each loss term's gradient norm / share w.r.t. the gate logits is measured on
    # the step's batch and logged (gates.pt and metrics.json keep the history); 0 = never.
    gradient_share_every: int = 10
    # Fine-tuning: SGD momentum 0.9, weight decay 1e-4, start lr 0.1, batch 128 (reference: steps at 50%, 75%).
    finetune_batch: int = 128
    finetune_lr: float = 0.1
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 1e-4
    finetune_schedule: str = "step"
    val_every_epochs: float = 1.0
    # common.precision policy of every training and evaluation forward ("auto": bf16 autocast + channels_last
    # where the device has native bf16, else fp32); losses, MAC counts, RBF maps and metrics stay fp32.
    precision: str = "auto"
    # Resumable training (common.loop): each stage checkpoints every epoch and every this many steps within it.
    checkpoint_every: int = 200
    # Reporting.
    latency_batch: int = 64
    latency_threads: int = 1
    figure_images: int = 6

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> IspSettings:
        return settings_from_dict(cls, values, "ISP settings")

    def validate(self) -> None:
        if self.selector not in ("rbf", "realx"):
            raise ValueError(f"selector must be 'rbf' or 'realx', got {self.selector!r}")
        if self.selector_area not in SELECTOR_AREAS:
            raise ValueError(f"selector_area must be one of {SELECTOR_AREAS}, got {self.selector_area!r}")
        if self.selector_area == "plane" and self.selector != "rbf":
            raise ValueError(f"selector_area = 'plane' needs an RBF kernel's mass (selector = 'rbf'), got selector "
                             f"{self.selector!r}")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio p must be in (0, 1], got {self.target_ratio}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise ValueError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.interpretation_units not in ("image", "pixels"):
            raise ValueError(f"interpretation_units must be 'image' or 'pixels', got {self.interpretation_units!r}")
        if self.gate_objective not in ("eq10", "authors"):
            raise ValueError(f"gate_objective must be 'eq10' or 'authors', got {self.gate_objective!r}")
        if isinstance(self.gradient_share_every, bool) or not isinstance(self.gradient_share_every, int) \
                or self.gradient_share_every < 0:
            raise ValueError(f"gradient_share_every must be an integer >= 0, got {self.gradient_share_every!r}")
        if self.finetune_schedule not in ("cosine", "step"):
            raise ValueError(f"finetune_schedule must be 'cosine' or 'step', got {self.finetune_schedule!r}")
        if self.channel_group != "auto" and (isinstance(self.channel_group, bool)
                                             or not isinstance(self.channel_group, int) or self.channel_group < 1):
            raise ValueError(f"channel_group must be 'auto' or an integer >= 1, got {self.channel_group!r}")
        if self.target_mac_reduction is not None and (
                isinstance(self.target_mac_reduction, bool) or not isinstance(self.target_mac_reduction, int | float)
                or not 0.0 <= self.target_mac_reduction < 1.0):
            raise ValueError(f"target_mac_reduction must be a fraction in [0, 1) or None, got "
                             f"{self.target_mac_reduction!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.selector_val_images < 0 or self.selector_val_every < 1 or self.selector_samples < 1:
            raise ValueError("selector_val_images must be >= 0, selector_val_every and selector_samples >= 1")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {self.checkpoint_every!r}")
        if self.gate_tau <= 0:
            raise ValueError("gate_tau must be positive")
        if self.mask_tau < 0:
            raise ValueError(f"mask_tau must be >= 0 (0 = hard Bernoulli masks), got {self.mask_tau}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stage_epochs(self, stage: str, budget_epochs: float) -> float:
        """Epochs of ``stage``: the explicit setting, else its share of the budget (gate search runs over the
        subset, so its share of full-set epochs is divided by the subset fraction)."""
        explicit = {"predictor": self.predictor_epochs, "selector": self.selector_epochs,
                    "gates": self.gate_epochs, "finetune": self.finetune_epochs}[stage]
        if explicit is not None:
            return float(explicit)
        share = STAGE_SHARES[stage] * budget_epochs
        return share / self.subset_fraction if stage == "gates" else share


# The one layout of a recipe file (isp/configs/*.json), the same in every method package.


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file in the one layout (``common.method.read_recipe_file``), its ``settings`` checked as
    ``IspSettings`` keys; ``epochs`` is null where the stage keys (``*_epochs``) set every stage's length."""
    recipe = read_recipe_file(path)
    IspSettings.from_dict(recipe["settings"])  # unknown keys and bad values fail here, naming them
    return recipe
