"""PICNN's hyperparameters: one dataclass of the paper's defaults; recipes are picnn/configs/*.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.method import settings_from_dict
from common.precision import CHOICES as PRECISION_CHOICES

ASSIGNMENTS = ("bernoulli", "gumbel")
CLUSTER_INDEX = ("pseudo", "label")
TARGET_LAYERS = ("added", "last_stage")


@dataclass
class PicnnSettings:
    """Hyperparameters; the defaults are the paper's (Implementation Details) unless a comment says otherwise."""

    lam: float = 2.0  # lambda of Eq. 3
    # Where the class clusters live. "added" (the paper's configuration): a 3x3 target conv of ``filters``
    # filters after the backbone, with a new classifier; its MACs are reported as ``added_macs``.
    # "last_stage": the backbone's last conv stage itself (no added layer, no extra MACs, its pretrained
    # classifier kept; a zero-cost variant, not in the paper).
    target_layer: str = "added"
    filters: int | None = None  # N of the added layer; None: round(12.8 K), the paper's ratio (128 for 10 classes)
    assignment: str = "bernoulli"  # "bernoulli" (Eq. 5-7) or "gumbel" (Table 4 ablation)
    gumbel_temperature: float = 0.01  # Table 4
    cluster_index: str = "pseudo"  # "pseudo" (Eq. 8-10) or "label" (leaks y: the trivial solution, Fig. 4)
    lr: float = 1e-3  # Adam
    p_lr: float | None = None  # learning rate of P's logits; None = lr
    backbone_lr_scale: float = 1.0  # backbone lr = lr * scale (1 in the paper; < 1 suits short fine-tunes)
    weight_decay: float = 1e-4  # not in the paper; the authors' code uses 1e-4 (never applied to P)
    final_lr_scale: float = 1e-3  # cosine decay to lr * scale over the run (not in the paper; authors' code)
    batch_size: int = 128
    augment: bool = True  # random crop + flip
    eval_draws: int = 5  # independent draws averaged for the sampled ACC2 / ACC3 (the authors use one)
    mis_samples: int | None = None  # cap on test images used for MIS (the k-NN estimator is O(M log M))
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (one is also written every epoch)
    log_every: int = 50  # steps between loss logs (the training loop checks every step's loss)
    precision: str = "auto"  # common.precision policy of training and evaluation: auto, fp32 or bf16
    control: bool = False  # run_method only: also train the lambda = 0 control and report mis_lift

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PicnnSettings:
        return settings_from_dict(cls, values, "PICNN setting(s)")

    def validate(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if self.cluster_index not in CLUSTER_INDEX:
            raise ValueError(f"cluster_index must be one of {CLUSTER_INDEX}, got {self.cluster_index!r}")
        for name in ("lr", "backbone_lr_scale", "final_lr_scale", "gumbel_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "eval_draws", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        if self.target_layer not in TARGET_LAYERS:
            raise ValueError(f"target_layer must be one of {TARGET_LAYERS}, got {self.target_layer!r}")
        if self.filters is not None and self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {self.filters}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
