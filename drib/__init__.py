"""DRIB: Interpreting DNN with Dynamic Reasoning and Information Bottleneck (Si et al., ICPCSEE 2022).

Dynamic reasoning decision module: `drib.decision` (Eq. 2-4), attached to a backbone by `drib.model`,
executed with pre-sliced channel skipping by `drib.sparse_inference`. Information bottleneck verification:
`drib.bottleneck` (per-sample IBA, Schulz et al. 2020) and `drib.verification` (credibility and its
controls, in-the-loop verification). Entry for the benchmark: `run_method`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.backbones import Backbone, build_backbone
from common.data import BatchLoader, DatasetSplits
from common.method import Budget, MethodResult
from common.run import RunDir

from .config import NOT_IDENTITY, BottleneckConfig, DecisionConfig, DRIBConfig, TrainConfig, run_identity
from .decision import DecisionGate, gumbel_softmax_select
from .mac_target import achieved_reduction
from .model import DynamicNetwork, default_gate_sites
from .sparse_inference import channel_skipping, deploy, sparse_forward
from .train import ensure_statistics, load_model, train_run, validate
from .verification import attribution_site, saliency_function

__all__ = [
    "BottleneckConfig",
    "DRIBConfig",
    "DecisionConfig",
    "DecisionGate",
    "DynamicNetwork",
    "TrainConfig",
    "channel_skipping",
    "default_gate_sites",
    "deploy",
    "gumbel_softmax_select",
    "load_model",
    "run_method",
    "sparse_forward",
]


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

    settings: a nested DRIB config ({"decision": {...}, "bottleneck": {...}, "train": {...}}, optionally the
    shared top-level "target_mac_reduction") plus an optional "backbone" name (otherwise recognised from
    the architecture).
    """
    settings = dict(settings or {})
    device = torch.device(device)
    backbone_name = _backbone_name(start, settings)
    config = DRIBConfig.from_dict({k: v for k, v in settings.items() if k != "backbone"})
    out_dir = Path(out_dir)
    run = RunDir(out_dir)
    # A directory of another config is refused (its model and checkpoint are not this run's).
    run.claim(run_identity(backbone_name, data.name, data.val_source, seed, budget, config),
              what=f"out_dir {out_dir}", fix="use a new out_dir, or delete it", ignore=NOT_IDENTITY)
    if run.model_path.is_file():  # finished earlier: reuse
        trained = load_model(out_dir, device)
        ensure_statistics(trained, data, device, seed)  # a model.pt of an older layout: re-estimate
        seconds = float(trained.meta.get("train_seconds", 0.0))
    else:
        run.write_environment(device)
        trained, seconds = train_run(start, backbone_name, data, budget, out_dir, config, device, seed)
    net = trained.net
    val_loader = BatchLoader(data.val, 256, train=False, device=device)
    val_top1, val_mac_fraction, val_density = validate(net, val_loader)
    # mac_reduction: against the dense backbone (heads included), as the shared knob defines it
    val_images = data.val.images[:2048].to(device).float() / 255  # a prefix of the class-interleaved val split
    metrics = {"val_top1": val_top1, "val_mac_reduction": 1.0 - val_mac_fraction, "val_gate_density": val_density,
               "mac_reduction": achieved_reduction(net, val_images),
               "target_mac_reduction": config.target_mac_reduction,
               "bottleneck_layer": attribution_site(net, config.bottleneck.site).name,
               "val_source": data.val_source}

    def dynamic_forward(images: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_forward(net, images.to(device))

    return MethodResult(model=net, saliency=saliency_function(net, trained.stats, config.bottleneck),
                        dynamic_forward=dynamic_forward, mis_layer=net.backbone.cam_layer(),
                        dynamic_filter_share=dynamic_filter_share(net, val_loader), metrics=metrics,
                        train_seconds=seconds)
