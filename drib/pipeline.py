"""From a pretrained backbone to a trained DRIB run directory, and back: build, train, save, load.

model.pt holds the backbone name, class count, input size, the DRIB config, the state dict (backbone and
gates) and the bottleneck's feature statistics (estimated once on training data after training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.backbones import Backbone, build_backbone
from common.data import BatchLoader, DatasetSplits
from common.method import Budget, MethodResult
from common.run import RunDir, atomic_torch_save, load_checkpoint, seed_everything

from .bottleneck import FeatureStats, estimate_statistics_sites
from .config import DRIBConfig
from .model import DynamicNetwork
from .sparse_inference import sparse_forward
from .train import train as train_network
from .train import validate
from .verification import attribution_site, credibility_site, saliency_function


@dataclass
class TrainedDRIB:
    net: DynamicNetwork
    stats: dict[str, FeatureStats]  # per bottleneck site key (see drib.verification.Site)
    config: DRIBConfig
    meta: dict[str, Any]


def input_size_of(data: DatasetSplits) -> tuple[int, int, int]:
    h, w = data.image_size
    return (3, h, w)


def feature_statistics(net: DynamicNetwork, data: DatasetSplits, config: DRIBConfig,
                       device: torch.device, seed: int = 0) -> dict[str, FeatureStats]:
    """IBA's estimator on training images, for both bottleneck sites: the attribution site with the network
    as deployed, the credibility site with its layer's gate open (see drib.verification)."""
    b = config.bottleneck
    loader = BatchLoader(data.train, 256, train=True, device=device, augment=False, seed=seed)
    site = attribution_site(net, b.site)
    stats = dict(zip(site.keys, estimate_statistics_sites(net, site.modules, loader, b.estimator_samples,
                                                          b.active_std, b.active_share)))
    cred = credibility_site(net, b.credibility_site)
    assert cred.gated is not None
    cred.gated.gate.open = True
    try:
        loader = BatchLoader(data.train, 256, train=True, device=device, augment=False, seed=seed)
        stats.update(zip(cred.keys, estimate_statistics_sites(net, cred.modules, loader, b.estimator_samples,
                                                              b.active_std, b.active_share)))
    finally:
        cred.gated.gate.open = False
    return stats


def ensure_statistics(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, seed: int = 0) -> bool:
    """Estimate the bottleneck statistics if model.pt lacks those of the configured sites; True if it did."""
    b = trained.config.bottleneck
    needed = attribution_site(trained.net, b.site).keys + credibility_site(trained.net, b.credibility_site).keys
    if all(k in trained.stats for k in needed):
        return False
    trained.stats = feature_statistics(trained.net, data, trained.config, device, seed)
    return True


def save_model(run: RunDir, trained: TrainedDRIB) -> None:
    atomic_torch_save({"meta": trained.meta, "config": trained.config.to_dict(),
                       "state_dict": trained.net.state_dict(),
                       "ib_stats": {k: v.as_dict() for k, v in trained.stats.items()}}, run.model_path)


def load_model(run_dir: str | Path, device: torch.device) -> TrainedDRIB:
    """Rebuild a trained network from ``run_dir/model.pt`` (statistics of an older layout are dropped:
    `ensure_statistics` re-estimates them)."""
    run = RunDir(run_dir)
    if not run.model_path.is_file():
        raise FileNotFoundError(f"{run.model_path} not found: train into {run.path} first (python -m drib train)")
    blob = load_checkpoint(run.model_path, map_location=device)
    meta = blob["meta"]
    config = DRIBConfig.from_dict(blob["config"])
    backbone = build_backbone(meta["backbone"], num_classes=meta["num_classes"])
    net = DynamicNetwork(backbone, config.decision, input_size=tuple(meta["input_size"]))
    net.load_state_dict(blob["state_dict"])
    net.to(device).eval()
    stats = {k: FeatureStats.from_dict(v).to(device) for k, v in blob.get("ib_stats", {}).items()}
    return TrainedDRIB(net, stats, config, meta)


def train_run(start: Backbone, backbone_name: str, data: DatasetSplits, budget: Budget, out_dir: Path,
              config: DRIBConfig, device: torch.device, seed: int = 0) -> tuple[TrainedDRIB, float]:
    """Wrap ``start`` with gates, train, estimate the bottleneck statistics and write model.pt."""
    seed_everything(seed)
    run = RunDir(out_dir)
    net = DynamicNetwork(start, config.decision, input_size=input_size_of(data)).to(device)
    if config.decision.codebook_init == "importance" and not run.checkpoint_path.is_file():
        pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
        images = data.train.subset(pick[: config.decision.init_images]).images.to(device).float() / 255
        keep = net.init_codebooks(net.channel_importance(images), config.decision, seed)
        run.logger("drib").info("code books initialised by importance: each action keeps %.3f of the channels",
                                keep)
    outcome = train_network(net, data, budget, out_dir, config, device, seed)
    stats = feature_statistics(net, data, config, device, seed)
    meta = {"backbone": backbone_name, "num_classes": data.num_classes, "input_size": list(input_size_of(data)),
            "dataset": data.name, "val_source": data.val_source, "steps": outcome.steps,
            "train_seconds": outcome.train_seconds,
            "selected_epoch": outcome.selected_epoch, "val_top1": outcome.val_top1,
            "val_mac_fraction": outcome.val_mac_fraction}
    trained = TrainedDRIB(net.eval(), stats, config, meta)
    save_model(run, trained)
    return trained, outcome.train_seconds


def dynamic_filter_share(net: DynamicNetwork, batches) -> float:
    """Share of gated filters that are on for some inputs and off for others (argmax decisions)."""
    ever_on = [torch.zeros(g.site.channels, dtype=torch.bool) for g in net.gated]
    ever_off = [torch.zeros(g.site.channels, dtype=torch.bool) for g in net.gated]
    for masks in (net.channel_masks(x) for x, _ in batches):
        for k, mask in enumerate(masks):
            active = (mask != 0).cpu()
            ever_on[k] |= active.any(0)
            ever_off[k] |= (~active).any(0)
    dynamic = sum(int((on & off).sum()) for on, off in zip(ever_on, ever_off))
    return dynamic / sum(len(on) for on in ever_on)


def _backbone_name(start: Backbone, settings: dict[str, Any]) -> str:
    if "backbone" in settings:
        return str(settings["backbone"])
    from common.backbones import list_backbones

    for name in list_backbones():  # identify by architecture: same module types and shapes
        candidate = build_backbone(name, num_classes=start.classifier.out_features)
        own, other = start.state_dict(), candidate.state_dict()
        if own.keys() == other.keys() and all(own[k].shape == other[k].shape for k in own):
            return name
    raise ValueError("cannot tell which backbone `start` is; pass settings={'backbone': NAME}")


def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
               device: torch.device | str = "cpu", seed: int = 0, settings: dict | None = None) -> MethodResult:
    """The benchmark's entry: gate ``start`` (pretrained), train within ``budget`` (resumable in out_dir),
    and return the dynamic model, its IBA saliency and its channel-skipping forward with per-sample MACs.

    settings: a nested DRIB config ({"decision": {...}, "bottleneck": {...}, "train": {...}}) plus an
    optional "backbone" name (otherwise recognised from the architecture).
    """
    settings = dict(settings or {})
    device = torch.device(device)
    backbone_name = _backbone_name(start, settings)
    config = DRIBConfig.from_dict({k: v for k, v in settings.items() if k != "backbone"})
    out_dir = Path(out_dir)
    run = RunDir(out_dir)
    if run.model_path.is_file():  # finished earlier: reuse
        trained = load_model(out_dir, device)
        seconds = float(trained.meta.get("train_seconds", 0.0))
    else:
        run.write_config({"backbone": backbone_name, "dataset": data.name, "seed": seed, "budget": vars(budget),
                          "drib": config.to_dict()})
        run.write_environment(device)
        trained, seconds = train_run(start, backbone_name, data, budget, out_dir, config, device, seed)
    net = trained.net
    val_loader = BatchLoader(data.val, 256, train=False, device=device)
    val_top1, val_mac_fraction, val_density = validate(net, val_loader)
    metrics = {"val_top1": val_top1, "val_mac_reduction": 1.0 - val_mac_fraction, "val_gate_density": val_density,
               "bottleneck_layer": attribution_site(net, config.bottleneck.site).name,
               "val_source": data.val_source}

    def dynamic_forward(images: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_forward(net, images.to(device))

    return MethodResult(model=net, saliency=saliency_function(net, trained.stats, config.bottleneck),
                        dynamic_forward=dynamic_forward, mis_layer=net.backbone.cam_layer(),
                        dynamic_filter_share=dynamic_filter_share(net, val_loader), metrics=metrics,
                        train_seconds=seconds)
