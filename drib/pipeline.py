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

from .bottleneck import estimate_statistics
from .config import DRIBConfig
from .network import DynamicNetwork
from .sparse_inference import sparse_forward
from .train import train as train_network
from .train import validate
from .verification import bottleneck_site, saliency_function


@dataclass
class TrainedDRIB:
    net: DynamicNetwork
    stats: tuple[Tensor, Tensor]
    config: DRIBConfig
    meta: dict[str, Any]


def input_size_of(data: DatasetSplits) -> tuple[int, int, int]:
    h, w = data.image_size
    return (3, h, w)


def feature_statistics(net: DynamicNetwork, data: DatasetSplits, config: DRIBConfig,
                       device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Mean / std of the bottleneck layer's features (gate open) over training images (IBA's estimator)."""
    gated = bottleneck_site(net, config.bottleneck.site)
    loader = BatchLoader(data.train, 256, train=True, device=device, augment=False, seed=seed)
    gated.gate.open = True
    try:
        return estimate_statistics(net, gated.site.bn, loader, config.bottleneck.estimator_samples)
    finally:
        gated.gate.open = False


def save_model(run: RunDir, trained: TrainedDRIB) -> None:
    atomic_torch_save({"meta": trained.meta, "config": trained.config.to_dict(),
                       "state_dict": trained.net.state_dict(),
                       "ib_mean": trained.stats[0].cpu(), "ib_std": trained.stats[1].cpu()}, run.model_path)


def load_model(run_dir: str | Path, device: torch.device) -> TrainedDRIB:
    """Rebuild a trained network from ``run_dir/model.pt``."""
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
    return TrainedDRIB(net, (blob["ib_mean"].to(device), blob["ib_std"].to(device)), config, meta)


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
            "dataset": data.name, "steps": outcome.steps, "train_seconds": outcome.train_seconds,
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
               "bottleneck_layer": bottleneck_site(net, config.bottleneck.site).site.name}

    def dynamic_forward(images: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_forward(net, images.to(device))

    return MethodResult(model=net, saliency=saliency_function(net, trained.stats, config.bottleneck),
                        dynamic_forward=dynamic_forward, mis_layer=net.backbone.cam_layer(),
                        dynamic_filter_share=dynamic_filter_share(net, val_loader), metrics=metrics,
                        train_seconds=seconds)
