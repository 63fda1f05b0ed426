"""DRIB: Interpreting DNN with Dynamic Reasoning and Information Bottleneck (Si et al., ICPCSEE 2022).

Dynamic reasoning decision module: `drib.decision` (Eq. 2-4), attached to a backbone by `drib.model`,
executed with pre-sliced channel skipping by `drib.sparse_inference`. Information bottleneck verification:
`drib.bottleneck` (per-sample IBA, Schulz et al. 2020) and `drib.verification` (credibility and its
controls, in-the-loop verification). Entry for the benchmark: `run_method`; a trained run directory:
`load_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.backbones import Backbone, build_backbone
from common.data import BatchLoader, DatasetSplits
from common.method import Budget, MethodResult
from common.run import RunDir, pick_device

from .config import NOT_IDENTITY, BottleneckSettings, DecisionSettings, DribSettings, TrainSettings, run_identity
from .decision import DecisionGate, gumbel_softmax_select
from .dynamism import collect_decisions, dynamism_metrics
from .evaluate import accuracy_and_macs
from .model import DynamicNetwork, default_gate_sites
from .sparse_inference import channel_skipping, deploy, sparse_forward
from .train import ensure_statistics, load_run, load_trained, train_run, validate
from .verification import attribution_site, saliency_function

__all__ = [
    "BottleneckSettings",
    "DecisionGate",
    "DecisionSettings",
    "DribSettings",
    "DynamicNetwork",
    "TrainSettings",
    "channel_skipping",
    "default_gate_sites",
    "deploy",
    "gumbel_softmax_select",
    "load_run",
    "run_method",
    "sparse_forward",
]


def dynamic_filter_share(net: DynamicNetwork, batches) -> float:
    """Share of gated filters whose state varies: on for at least 5% of the inputs and off for at least 5%
    (argmax decisions; `drib.dynamism.dynamic_channels`). A filter that one odd image switches is not
    counted."""
    images = torch.cat([x.float() if x.dtype != torch.uint8 else x.float() / 255 for x, _ in batches])
    return float(dynamism_metrics(collect_decisions(net, images))["dynamic_filter_share"])


VARIANTS = ("dynamic", "static")


def variant_settings(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split settings["variant"] off the DRIB config: "dynamic" (DRIB, default) or "static", the control of
    the same recipe with one code-book row per gated layer (m = 1): the importance-pruned start trained with
    the same steps, regulariser, calibration to the same MAC target and fine-tuning share, where the heads
    have nothing to choose. Returns (variant, the nested config dict)."""
    config = {k: v for k, v in settings.items() if k not in ("backbone", "variant")}
    variant = str(settings.get("variant", "dynamic"))
    if variant not in VARIANTS:
        raise ValueError(f"settings['variant'] must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "static":
        decision = dict(config.get("decision") or {})
        decision.update(actions=1, codebook_init="importance")
        config["decision"] = decision
    return variant, config


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
               device: torch.device | str | None = None, seed: int = 0,
               settings: dict[str, Any] | None = None) -> MethodResult:
    """The benchmark's entry: gate ``start`` (pretrained), train within ``budget`` (resumable in out_dir),
    and return the dynamic model, its IBA saliency and its channel-skipping forward with per-sample MACs.

    settings: the dict `DribSettings` takes ({"decision": {...}, "bottleneck": {...}, "train": {...}},
    optionally the shared top-level "target_mac_reduction") plus an optional "backbone" name (otherwise
    recognised from the architecture) and an optional "variant": "dynamic" (default) or "static" (the
    `drib-static` control row: one code-book row per layer, see `variant_settings`). ``device`` None: CUDA
    when available, else CPU.

    metrics: the shared figures (`common.method.SHARED_METRIC_KEYS`) of the channel-skipping network on the
    reported test split in fp32, as `python -m drib evaluate` reports them; DRIB's own on the validation split
    (val_top1, val_mac_reduction, val_gate_density) and "dynamism", the figures of `drib.dynamism` on the
    validation split. dynamic_filter_share: gated channels on for >= 5% of the validation images and off for
    >= 5%.
    """
    settings = dict(settings or {})
    device = pick_device(None if device is None else str(device))
    backbone_name = _backbone_name(start, settings)
    variant, nested = variant_settings(settings)
    config = DribSettings.from_dict(nested)
    out_dir = Path(out_dir)
    run = RunDir(out_dir)
    # A directory of other settings is refused (its model and checkpoint are not this run's).
    run.claim(run_identity(backbone_name, data.name, data.val_source, seed, budget, config),
              what=f"out_dir {out_dir}", fix="use a new out_dir, or delete it", ignore=NOT_IDENTITY)
    if run.model_path.is_file():  # finished earlier: reuse
        trained = load_trained(out_dir, device)
        ensure_statistics(trained, data, device, seed)  # a model.pt of an older layout: re-estimate
        seconds = float(trained.meta.get("train_seconds", 0.0))
    else:
        run.write_environment(device)
        trained, seconds = train_run(start, backbone_name, data, budget, out_dir, config, device, seed)
    net = trained.net
    val_loader = BatchLoader(data.val, 256, train=False, device=device)
    val_top1, val_mac_fraction, val_density = validate(net, val_loader)
    metrics: dict[str, Any] = accuracy_and_macs(net, data, device, target_mac_reduction=config.target_mac_reduction)
    metrics.update({"val_top1": val_top1, "val_mac_reduction": 1.0 - val_mac_fraction,
                    "val_gate_density": val_density, "val_source": data.val_source, "variant": variant,
                    "bottleneck_layer": attribution_site(net, config.bottleneck.site).name})
    # dynamism over the whole validation split (class-interleaved), labels for the class probe
    dynamism = dynamism_metrics(collect_decisions(net, data.val.images.float() / 255), data.val.labels, seed=seed)
    metrics["dynamism"] = {k: v for k, v in dynamism.items() if k != "definitions"}
    metrics["dynamism_definitions"] = dynamism["definitions"]

    def dynamic_forward(images: Tensor) -> tuple[Tensor, Tensor]:
        return sparse_forward(net, images.to(device))

    return MethodResult(model=net, saliency=saliency_function(net, trained.stats, config.bottleneck),
                        dynamic_forward=dynamic_forward, mis_layer=net.backbone.cam_layer(),
                        dynamic_filter_share=float(dynamism["dynamic_filter_share"]), metrics=metrics,
                        train_seconds=seconds)
