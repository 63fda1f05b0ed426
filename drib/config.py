"""DRIB hyper-parameters in one place, with the defaults of the paper and of the works it builds on.

Sources of the defaults: Wang et al. (AAAI 2020) for the decision module (m = 40 actions, density target 0.7,
lambda = 0.5, Adam 0.01 for heads and code books, SGD 0.01 / momentum 0.9 for the backbone) and Schulz et al.
(ICLR 2020) for the per-sample information bottleneck (beta = 10, 10 Adam steps at lr 1, 10 copies, alpha_0 = 5,
Gaussian smoothing sigma = 1). The DRIB paper itself gives none of these numbers; it targets ~50% MACs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.method import read_recipe_file


@dataclass
class DecisionSettings:
    """The dynamic reasoning decision module (paper Sec. 3.1, Eq. 2-4, Algorithm 1)."""

    actions: int = 40  # m: number of candidate masks in each code book G_l
    tau_start: float = 1.0  # Gumbel-softmax temperature (Eq. 3) at the first step
    tau_end: float = 0.1  # ... annealed exponentially to this value at the last decision-training step
    prune_below: float = 0.05  # code book entries below this are skipped channels (exact zeros)
    # "ones": G_l starts all-ones, every action keeps every channel (Wang et al.). "importance": each row
    # keeps the channels with the largest E[ReLU(BN out)] x ||consumer weights|| on training images (row 0
    # exactly, the others with a log-normal jitter so the actions differ), as many as the MAC / density
    # target allows, from the first step (for short runs).
    # "clusters" (deviation, for dynamic decisions at short budgets; `DynamicNetwork.init_by_clusters`): row
    # r < init_clusters keeps the channels most important on the r-th spherical k-means cluster of the heads'
    # inputs, and head row r is that cluster's centroid, so each cluster starts on its own row.
    codebook_init: str = "ones"
    init_clusters: int = 8  # K of "clusters" (at most m)
    init_specificity: float = 0.0  # "clusters": gamma of importance x (cluster / overall importance)^gamma
    init_jitter: float = 0.5  # std of the log-normal jitter of the importance ranking (rows 1..m-1)
    init_images: int = 1024  # training images that measure the importance
    codebook_max: float = 5.0  # G_l is clamped to [0, codebook_max] after every update (Wang et al.)
    # "macs": penalise the expected MAC fraction of the gated layers (the paper's ~50% MAC target);
    # "density": Wang et al.'s (mean |G_l[i]| - target)^2 over each sample's selected code-book rows.
    regulariser: str = "macs"
    target: float = 0.5  # MAC fraction (regulariser="macs") or mask density (regulariser="density")
    lam: float = 0.5  # weight of the sparsity regulariser
    gate_lr: float = 0.01  # Adam on heads and code books
    alternate: bool = True  # Wang et al.: gate step, then a second forward for the backbone step
    # Deviation (0 = off, Wang et al.): usage-balance term of mixture-of-experts routers (Switch Transformer),
    # balance x m x sum_r f_r P_r per gated layer (f_r: share of the batch sent to row r, P_r: mean probability
    # of row r), added to the gates' loss; minimal (1) when the batch spreads evenly over the rows.
    balance: float = 0.0


@dataclass
class BottleneckSettings:
    """The per-sample information bottleneck used for verification (paper Sec. 3.2; Schulz et al.)."""

    # Where the attribution bottleneck sits: "middle" = the output of the residual block (the residual
    # stream) that holds the middle gated layer (ResNet-20: layer2.1, 16 x 16; VGG: the middle gated
    # layer's BN output, already on the only path); or a qualified backbone module name ("layer2.1").
    # A site the network can bypass (a residual branch) is refused (`bottleneck.check_cut`).
    site: int | str = "middle"
    # Credibility's bottleneck: on the gated layer's channels (the ones the decision selects) and, in a
    # residual block, on the block's shortcut as well, so that together they are a cut of the network.
    # "middle" = the middle gated layer; or an index / qualified conv name of a gated layer.
    credibility_site: int | str = "middle"
    beta: float = 10.0
    steps: int = 10
    lr: float = 1.0
    copies: int = 10  # batch of noisy copies of the one image
    alpha_init: float = 5.0  # lambda = sigmoid(5) ~ 0.993: the bottleneck starts almost open
    sigma: float = 1.0  # Gaussian smoothing of lambda (feature-map pixels)
    min_std: float = 0.01
    # IBA's active-neuron filter: an element whose training std is below this, or that is non-zero in at
    # most `active_share` of the training images, carries no capacity (zero in the loss and the map).
    active_std: float = 0.01
    active_share: float = 0.01
    estimator_samples: int = 10000  # training images for the feature mean / std
    # In-the-loop verification (paper Fig. 2): a decision whose credibility at `credibility_site` falls
    # below this threshold is replaced (None: off, the decision is always adopted).
    verify_threshold: float | None = None
    verify_fallback: str = "dense"  # "dense" (all channels of the layer) or "best_code" (most credible row)

    def validate(self) -> None:
        """Settings that would make IBA's loss or gradient NaN / meaningless are an error, not a NaN later."""
        for name in ("beta", "lr", "alpha_init", "sigma", "min_std", "active_std", "active_share"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"bottleneck.{name} must be a finite number, got {value!r}")
        if self.sigma <= 0:
            raise ValueError(f"bottleneck.sigma must be > 0 (Gaussian smoothing of lambda), got {self.sigma}")
        if self.min_std <= 0:
            raise ValueError(f"bottleneck.min_std must be > 0 (it divides the features), got {self.min_std}")
        if self.beta < 0 or self.lr <= 0:
            raise ValueError(f"bottleneck.beta must be >= 0 and bottleneck.lr > 0, got {self.beta}, {self.lr}")
        if not 0 <= self.active_share < 1 or self.active_std < 0:
            raise ValueError("bottleneck.active_share must be in [0, 1) and bottleneck.active_std >= 0")
        if self.steps < 1 or self.copies < 1 or self.estimator_samples < 2:
            raise ValueError("bottleneck.steps and bottleneck.copies must be >= 1, estimator_samples >= 2")
        if self.verify_threshold is not None and not 0 <= self.verify_threshold <= 1:
            raise ValueError(f"bottleneck.verify_threshold must be in [0, 1] or null, got {self.verify_threshold}")
        if self.verify_fallback not in ("dense", "best_code"):
            raise ValueError(f"bottleneck.verify_fallback must be 'dense' or 'best_code', got {self.verify_fallback!r}")


@dataclass
class TrainSettings:
    backbone_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4  # backbone weight decay in the fine-tuning share (Wang et al.'s finetune.py)
    decision_weight_decay: float = 1e-9  # backbone weight decay while the decisions train (Wang's main.py)
    batch_size: int = 128
    augment: bool = False  # Wang et al. train the decision stage without augmentation
    lr_schedule: str = "constant"  # "constant" (Wang et al.) or "cosine" (decay to 0 over the run)
    # Wang et al.'s last stage: gates frozen with deterministic (argmax) decisions, backbone trained alone.
    # The share of the steps given to it (0 = none; their separate 160-epoch stage is out of a short budget).
    finetune_fraction: float = 0.0
    # Standard crop (4 px zero padding) + horizontal flip augmentation during that fine-tuning share only
    # (the decision stage keeps `augment`); the batches are the same images in the same order either way.
    finetune_augment: bool = False
    log_every: int = 50  # steps between log lines (the loss is checked on every step)
    save_every: int = 100  # steps between resumable checkpoints (and one at every epoch's end)
    # common.precision policy of the training forward passes ("auto": bf16 where the device has native bf16);
    # losses, masks' regulariser, IBA, metrics and channel-skipping inference always run in fp32.
    precision: str = "auto"
    val_every_epoch: bool = True  # pick the epoch with the best validation top-1 (never the test set)


@dataclass
class DribSettings:
    """Every DRIB setting, in three sections (``decision``, ``bottleneck``, ``train``) and the shared
    ``target_mac_reduction``; ``--set train.backbone_lr=0.02`` reaches into a section."""

    decision: DecisionSettings = field(default_factory=DecisionSettings)
    bottleneck: BottleneckSettings = field(default_factory=BottleneckSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    # The benchmark's shared cost knob: fraction of the dense start's MACs removed (mean per sample, decision
    # heads included). None: the paper's own setting (decision.target as configured). Set: decision.target
    # becomes the matching MAC fraction (regulariser "macs") and the code books are calibrated on training
    # images when the decisions freeze and on the selected model (`drib.mac_target`), so the achieved
    # reduction lands within +-3 points (tested).
    target_mac_reduction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DribSettings:
        """Build from a (possibly partial) nested dict; unknown keys are an error, not silently ignored."""
        data = dict(data or {})
        target = data.pop("target_mac_reduction", None)
        parts = {"decision": DecisionSettings, "bottleneck": BottleneckSettings, "train": TrainSettings}
        unknown = set(data) - set(parts)
        if unknown:
            raise ValueError(f"unknown DRIB settings section(s) {sorted(unknown)}; expected {sorted(parts)}")
        built = {}
        for name, kind in parts.items():
            section = dict(data.get(name) or {})
            known = {f.name for f in dataclasses.fields(kind)}
            bad = set(section) - known
            if bad:
                raise ValueError(f"unknown key(s) {sorted(bad)} in settings section {name!r}; known: {sorted(known)}")
            built[name] = kind(**section)
        config = cls(**built, target_mac_reduction=None if target is None else float(target))
        config.validate()
        return config

    def validate(self) -> None:
        d, b = self.decision, self.bottleneck
        r = self.target_mac_reduction
        if r is not None and not (isinstance(r, int | float) and math.isfinite(r) and 0 <= r < 1):
            raise ValueError(f"target_mac_reduction must be in [0, 1) or null, got {r!r}")
        if d.actions < 1:
            raise ValueError("decision.actions (m) must be >= 1")
        if not (d.tau_start > 0 and d.tau_end > 0):
            raise ValueError("Gumbel temperatures must be > 0")
        if d.codebook_init not in ("ones", "importance", "clusters"):
            raise ValueError("decision.codebook_init must be 'ones', 'importance' or 'clusters', got "
                             f"{d.codebook_init!r}")
        if not (isinstance(d.init_specificity, int | float) and math.isfinite(d.init_specificity)
                and d.init_specificity >= 0):
            raise ValueError(f"decision.init_specificity must be a finite number >= 0, got {d.init_specificity!r}")
        if d.init_clusters < 1:
            raise ValueError(f"decision.init_clusters must be >= 1, got {d.init_clusters!r}")
        if isinstance(d.balance, bool) or not isinstance(d.balance, int | float) or not math.isfinite(d.balance) \
                or d.balance < 0:
            raise ValueError(f"decision.balance must be a finite number >= 0, got {d.balance!r}")
        if d.regulariser not in ("macs", "density"):
            raise ValueError(f"decision.regulariser must be 'macs' or 'density', got {d.regulariser!r}")
        if not 0 < d.target <= 1:
            raise ValueError("decision.target must be in (0, 1]")
        if self.train.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.train.lr_schedule!r}")
        if not 0 <= self.train.finetune_fraction < 1:
            raise ValueError("train.finetune_fraction must be in [0, 1)")
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be 'auto', 'fp32' or 'bf16', got {self.train.precision!r}")
        if self.train.log_every < 1 or self.train.save_every < 1:
            raise ValueError("train.log_every and train.save_every must be >= 1 (steps)")
        if self.train.weight_decay < 0 or self.train.decision_weight_decay < 0:
            raise ValueError("train.weight_decay and train.decision_weight_decay must be >= 0")
        # Checked here, before the CLI creates anything: the optimisers would refuse them only after the run
        # directory holds config.json and log.txt.
        for name, value in (("train.backbone_lr", self.train.backbone_lr), ("decision.gate_lr", d.gate_lr),
                            ("decision.lam", d.lam)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.train.momentum < 1:
            raise ValueError(f"train.momentum must be in [0, 1), got {self.train.momentum!r}")
        if self.train.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.train.batch_size!r}")
        b.validate()


@dataclass
class Recipe:
    description: str
    backbone: str
    dataset: str
    epochs: float | None
    settings: DribSettings


def read_recipe(path: str | Path) -> Recipe:
    """A recipe file (``common.method.read_recipe_file``: the one layout) with its settings checked."""
    data = read_recipe_file(path)
    epochs = data["epochs"]
    return Recipe(data["description"], data["backbone"], data["dataset"],
                  None if epochs is None else float(epochs), DribSettings.from_dict(data["settings"]))


# Top-level keys of a run's config.json that may change between launches of one run (common.run's
# ``RunDir.claim``): a time budget only stops a run early or lets a stopped one carry on (common.loop).
NOT_IDENTITY = ("seconds",)


def run_identity(backbone: str, dataset: str, val_source: str, seed: int, budget: Any, config: DribSettings,
                 **more: Any) -> dict[str, Any]:
    """What a run directory's config.json records: a launch into it under anything else is refused."""
    return {"backbone": backbone, "dataset": dataset, **more, "val_source": val_source, "seed": seed,
            "budget": {"epochs": budget.epochs, "max_batches": budget.max_batches}, "seconds": budget.seconds,
            "drib": config.to_dict()}
