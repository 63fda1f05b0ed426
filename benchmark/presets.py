"""Presets: everything a leaderboard depends on, named once and shared by every method.

A preset fixes the dataset and its validation split, the backbone and its pretrained start, the one
``Budget`` every method gets, the batch size, the seeds, per-method settings and the size of the fixed
test subsets the interpretability metrics run on. Methods read their own keys from ``settings``; the
benchmark adds ``batch_size`` to every method's settings so that all of them train on the same batches.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any

from common.method import Budget

# Control rows: a method with its own mechanism switched off, run through the method's run_method under the
# same budget, data, start and seed: row name -> (method package, settings that override the recipe).
# - drib-static: the same recipe with one code-book row per gated layer (nothing to choose: a static network
#   trained and calibrated to the same MAC target; drib.variant_settings);
# - decoupling-static: the decoupled network with its dynamic filters fixed (on where they fire on most
#   class-mixed training images, the firing-rate threshold bisected so the twin costs the decoupled network's mean
#   MACs), as it is: the same training budget and MACs as its method (decoupling/twin.py);
# - isp-unsteered: the gate search without its interpretation term (gamma1 = 0); its predictor and selector
#   are its own, trained with the same seed and settings as the isp row's;
# - picnn-lambda0: the same pathway and images without the class-cluster loss (evaluation-protocol.md 2).
CONTROL_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "drib-static": ("drib", {"variant": "static"}),
    "picnn-lambda0": ("picnn", {"lam": 0.0}),
    "decoupling-static": ("decoupling", {"static_twin": True, "static_twin_match_macs": True,
                                         "static_twin_finetune": False}),
    "isp-unsteered": ("isp", {"gamma1": 0.0}),
}
# Each method row -> its control row (the pairs of the leaderboard's mechanism table).
CONTROL_OF = {"drib": "drib-static", "picnn": "picnn-lambda0", "decoupling": "decoupling-static",
              "isp": "isp-unsteered"}
# Reference rows (benchmark/reference_pruning.py): L1-norm and random channel pruning, then CE fine-tuning.
REFERENCES = ("l1-prune", "random-prune")
METHODS = ("baseline", "drib", "drib-static", "picnn", "picnn-lambda0", "decoupling", "decoupling-static", "isp",
           "isp-unsteered", *REFERENCES)
# Rows that compress: each runs once per MAC target of the preset and receives ``target_mac_reduction`` (the
# fraction of the dense start's MACs removed, mean per sample for dynamic models) in its settings. The other
# rows (the baseline, PICNN and its control) do not remove MACs and run once, shown beside every target.
COMPRESSING = ("drib", "drib-static", "decoupling", "decoupling-static", "isp", "isp-unsteered", *REFERENCES)
# ``Preset.workers`` value for "one single-thread worker process per core" (CPU presets).
PER_CORE = 0
# Budget fairness: every row gets the same epochs in total; what each spends them on (shown under the table).
EPOCH_USE = {
    "baseline": "all epochs: cross-entropy fine-tuning of the dense start",
    "drib": "decision heads and backbone trained together (Gumbel-softmax decisions, regulariser towards the"
            " MAC target); the recipe's last `finetune_fraction` of the steps fine-tunes under argmax decisions",
    "picnn": "all epochs: cross-entropy + lambda x the class-cluster loss on the added pathway",
    "picnn-lambda0": "all epochs: the same pathway and images with lambda = 0 (the MIS control)",
    "drib-static": "the DRIB recipe's steps, regulariser, MAC calibration and fine-tuning share with one code-book"
                   " row per layer (no decision to learn)",
    "decoupling-static": "the decoupling row's training; then its dynamic filters are fixed at the equal-cost"
                         " firing-rate threshold, no further training (the same budget as its method)",
    "isp-unsteered": "the isp row's stages and shares with gamma1 = 0 in the gate search (its own predictor and"
                     " selector, same seed and settings as the isp row's)",
    "decoupling": "controllers and backbone together (CE + L_mi + L_kl + L_s with the sparsity target); a"
                  " recipe's `finetune_fraction` > 0 adds a CE phase under frozen controllers (see its README)",
    "isp": "30% predictor, 10% selector, 10% gate search (passes over a 5% subset), 50% fine-tuning of the"
           " physically slimmed network",
    "l1-prune": "pruning itself takes no epoch (bisection on filter L1 norms); all epochs: CE fine-tuning",
    "random-prune": "pruning itself takes no epoch (seeded random channels); all epochs: CE fine-tuning",
}


def package_of(method: str) -> str:
    """The package that trains a leaderboard row (a control row names its method's package)."""
    return CONTROL_METHODS.get(method, (method, {}))[0]

# Where each method reads its training batch size (dotted = nested section). The preset's one batch size is
# written there unless the preset's own settings for that method name the key. ISP's selector keeps its
# paper batch of 16: it trains an explainer on a frozen network, not the network itself.
BATCH_SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "baseline": ("batch_size",),
    "drib": ("train.batch_size",),
    "picnn": ("batch_size",),
    "decoupling": ("batch_size",),
    "isp": ("predictor_batch", "gate_batch", "finetune_batch"),
    "l1-prune": ("batch_size",),
    "random-prune": ("batch_size",),
}
# Fine-tuning from a pretrained start: learning rates for methods whose defaults are from-scratch values
# (a method's own recipe file overrides these).
FINETUNE_FALLBACK: dict[str, dict[str, Any]] = {"baseline": {"lr": 0.01}, "decoupling": {"lr": 0.01},
                                                "l1-prune": {"lr": 0.01}, "random-prune": {"lr": 0.01}}


@dataclass(frozen=True)
class StartSpec:
    """Where the pretrained start comes from.

    kind "weights": load ``<weights dir>/<file>`` (the published checkpoints).
    kind "scratch": train the backbone from random init with plain cross-entropy for ``epochs`` (smoke
    presets on datasets without published weights); the result is cached in the preset's results folder.
    """

    kind: str
    file: str | None = None
    epochs: float = 0.0
    lr: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in ("weights", "scratch"):
            raise ValueError(f"start kind must be 'weights' or 'scratch', got {self.kind!r}")
        if self.kind == "weights" and not self.file:
            raise ValueError("a 'weights' start needs a file name")


@dataclass(frozen=True)
class MetricSpec:
    """Sizes of the fixed, seeded test subsets the metrics use (full test set for accuracy and MACs).

    explain_images: images for the faithfulness metrics and drift. mis_images: images for MIS (0: no MIS).
    figure_images: columns of explanations.png. game_points / tile: recorded points and tile side (None:
    2 px at 32 px) of the tiled deletion and insertion games; road_fractions: ROAD's removal fractions;
    sanity_images / sanity_stages: images and cascade stages of the randomisation sanity test.
    latency_repeats: timed forward passes per round; latency_rounds: alternating rounds of (model, start),
    the minimum is kept.
    """

    explain_images: int = 200
    mis_images: int = 1000
    figure_images: int = 6
    game_points: int = 33
    tile: int | None = None
    road_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sanity_images: int = 16
    sanity_stages: int = 3
    latency_repeats: int = 20
    latency_rounds: int = 3
    latency_batches: tuple[int, ...] = (1, 128)
    subset_seed: int = 0


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    backbone: str
    start: StartSpec
    epochs: float
    batch_size: int = 128
    max_batches: int | None = None
    seconds: float | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    # target_mac_reduction of every compressing row (one job per target); () = each method's own setting
    targets: tuple[float, ...] = (0.5,)
    val_fraction: float = 0.1
    methods: tuple[str, ...] = METHODS
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: str | None = None  # method config name, e.g. "{backbone}_{dataset}_cpu" (see method_settings)
    recipe_epochs: bool = False  # keep the recipes' own stage lengths (paper preset) instead of the budget
    metrics: MetricSpec = field(default_factory=MetricSpec)
    description: str = ""
    # Jobs at once, each in its own single-thread worker process (PER_CORE: one per core on a CPU device, 1 on
    # a GPU); 1: one after another in this process at its thread count. Not part of a run's identity: N
    # workers give the figures of a 1-thread serial run.
    workers: int = 1

    def budget(self) -> Budget:
        """The one budget every method of this preset gets."""
        return Budget(epochs=self.epochs, seconds=self.seconds, max_batches=self.max_batches)

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if not 0 < float(t) < 1]
        if bad:
            raise ValueError(f"targets must be fractions of MACs removed in (0, 1), got {list(self.targets)}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be a positive integer (0: one per core), got {self.workers!r}")

    def method_settings(self, method: str, target: float | None = None) -> dict[str, Any]:
        """The settings handed to ``run_method``.

        Layers, later wins: the preset's fallback ``settings[method]``; the method's own recipe
        ``<method>/configs/<recipe>.json`` (its ``*epochs`` keys dropped unless ``recipe_epochs``: the
        shared budget decides the length); the preset's batch size at every key of ``BATCH_SIZE_KEYS``;
        ``target_mac_reduction = target`` for a compressing row.
        """
        package = package_of(method)
        settings = copy.deepcopy(self.settings.get(package, {}))
        if self.recipe and method != "baseline":
            recipe = read_recipe(package, self.recipe.format(backbone=self.backbone, dataset=self.dataset))
            settings = _merged(settings, recipe if self.recipe_epochs else _without_epoch_keys(recipe))
        settings = _merged(settings, CONTROL_METHODS.get(method, (package, {}))[1])
        for dotted in BATCH_SIZE_KEYS.get(package, ()):
            *sections, key = dotted.split(".")
            node = settings
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = self.batch_size
        if target is not None:
            if method not in COMPRESSING:
                raise ValueError(f"{method!r} does not compress: it has no MAC target")
            settings["target_mac_reduction"] = float(target)
        return settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_recipe(method: str, name: str) -> dict[str, Any]:
    """The ``settings`` of ``<method>/configs/<name>.json`` (every recipe is ``{description, backbone, dataset,
    epochs, settings}``); {} when the package or file is missing."""
    try:
        text = resources.files(method).joinpath("configs", f"{name}.json").read_text()
    except (ImportError, FileNotFoundError, NotADirectoryError, OSError):
        return {}
    config = json.loads(text)
    if not isinstance(config.get("settings"), dict):
        raise ValueError(f"{method}/configs/{name}.json has no 'settings' section; recipes are "
                         "{description, backbone, dataset, epochs, settings}")
    return dict(config["settings"])


def _without_epoch_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """Drop every ``*epochs`` key (at any depth): under a shared budget the preset decides the length."""
    return {k: _without_epoch_keys(v) if isinstance(v, dict) else v
            for k, v in settings.items() if not k.endswith("epochs")}


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _paper_preset() -> Preset:
    """Each method's own paper recipe (``<method>/configs/<backbone>_cifar10.json``) with its own stage
    lengths; methods whose length follows ``Budget.epochs`` get 200 epochs (the longest CIFAR schedule of
    the four papers). Equal budgets are not the point of this preset: reproducing the papers is."""
    return Preset(
        name="paper", dataset="cifar10", backbone="resnet56",
        start=StartSpec("weights", "resnet56-4bfd9763.th"), epochs=200.0, batch_size=128,
        settings={"baseline": {"lr": 0.01}}, recipe="{backbone}_{dataset}", recipe_epochs=True, targets=(),
        metrics=MetricSpec(explain_images=500, mis_images=5000, figure_images=6),
        description="each method's paper recipe (<method>/configs/), its own stage lengths; needs a GPU",
    )


# The smoke preset shrinks what each method measures on itself as well as the budget: the post-training MAC
# calibrations bisect on 256 training images instead of 1,000-2,000 (on digits they were most of a row's time).
SMOKE_SETTINGS: dict[str, dict[str, Any]] = {
    "baseline": {"lr": 0.01},
    "decoupling": {"calibration_images": 256, "mac_calibration_images": 256},
}


def _static_presets() -> dict[str, Preset]:
    smoke = Preset(
        name="smoke", dataset="digits", backbone="resnet20",
        start=StartSpec("scratch", epochs=4, lr=0.1), epochs=1, batch_size=64, max_batches=3, seeds=(0,),
        targets=(0.5,), settings=SMOKE_SETTINGS,
        metrics=MetricSpec(explain_images=8, mis_images=120, figure_images=4, game_points=9,
                           road_fractions=(0.2, 0.5, 0.8), sanity_images=4, sanity_stages=2,
                           latency_repeats=5, latency_rounds=2),
        description="embedded digits, ResNet-20 briefly trained from scratch as the start, 3 batches per row, MAC"
                    " target 50%: every row, control row and column, in minutes",
        workers=PER_CORE,
    )
    # The main job: one seed at the 50% target. Budget: 1 epoch per row is what fits the hour on 2 cores (3
    # epochs measured at about 100 minutes; benchmark/README.md); L1-norm pruning at 50% needs more than 8
    # epochs to come within 1.5 points of dense (measured: 8 epochs, lr 0.02 -> 1.72 points below on the
    # held-out half), which no eight-row job fits into an hour here.
    cpu_metrics = MetricSpec(explain_images=64, mis_images=1000, figure_images=6, latency_repeats=5,
                             latency_rounds=2)
    cifar_cpu = Preset(
        name="cifar10-cpu", dataset="cifar10", backbone="resnet20",
        start=StartSpec("weights", "resnet20-12fca82f.th"), epochs=1.0, batch_size=128, max_batches=None,
        seeds=(0,), targets=(0.5,), settings=FINETUNE_FALLBACK, recipe="{backbone}_{dataset}_cpu",
        metrics=cpu_metrics,
        workers=PER_CORE,
        description="pretrained ResNet-20, 1 epoch per row, MAC target 50%, seed 0, 2 CPU cores",
    )
    cifar_cpu_full = replace(
        cifar_cpu, name="cifar10-cpu-full", seeds=(0, 1, 2), targets=(0.3, 0.5),
        description="pretrained ResNet-20, 1 epoch per row, MAC targets 30% and 50%, seeds 0-2, 2 CPU cores")
    cifar = Preset(
        name="cifar10", dataset="cifar10", backbone="resnet56",
        start=StartSpec("weights", "resnet56-4bfd9763.th"), epochs=30, batch_size=128, seeds=(0, 1, 2),
        targets=(0.3, 0.5, 0.7), settings=FINETUNE_FALLBACK, recipe="{backbone}_{dataset}",
        metrics=MetricSpec(explain_images=500, mis_images=5000, figure_images=6),
        description="pretrained ResNet-56, 30 epochs per row, MAC targets 30/50/70%, 3 seeds, one GPU",
    )
    return {p.name: p for p in (smoke, cifar_cpu, cifar_cpu_full, cifar)}


def list_presets() -> list[str]:
    return [*_static_presets(), "paper"]


def get_preset(name: str, **overrides: Any) -> Preset:
    """The preset called ``name`` with dataclass fields replaced by ``overrides`` (None values ignored)."""
    presets = _static_presets()
    if name == "paper":
        preset = _paper_preset()
    elif name in presets:
        preset = presets[name]
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(preset, **overrides)
