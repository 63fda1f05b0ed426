"""Interpretable Neural Network Decoupling (Li, Ji, Lin, Zhang, Yan, Wu, Huang, Shao; ECCV 2020).

Every gated conv gets an architecture controlling module (Eq. 2, ``model.py``) that looks at the
layer's input and selects the filters to compute through Improved SemHash (Eq. 3-5, ``semhash.py``). The
network is trained with Eq. 12 (``losses.py``, ``train.py``): cross-entropy + lambda_m L_mi (paths
informative of the class) + lambda_k L_kl (filter outputs aligned with the selection) + lambda_s L_s
(sparse paths). The calculation paths are the objects of interpretation (``paths.py``, ``explain.py``,
``adversarial.py``); ``execution.py`` runs only the selected filters.

``run_method`` is the benchmark entry and ``load_run`` loads a trained run (contract in ``common.method``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from common.backbones import Backbone
from common.data import BatchLoader, DatasetSplits
from common.macs import count_macs, count_params
from common.method import Budget, MethodResult, shared_metrics
from common.precision import resolve_precision
from common.run import RunDir, pick_device, seed_everything
from common.training import evaluate_top1

from .config import DecouplingSettings, resolve_settings
from .evaluate import freeze_for_deployment, mean_dynamic_macs, val_split_name
from .losses import DecouplingObjective, kl_divergence_loss, mutual_information_loss, sparsity_loss
from .model import ArchitectureController, DecoupledNet, GatedConvBN, backbone_name, load_run, save_decoupled
from .paths import collect_paths, decision_tree, filter_states, hopkins_statistic, occlusion_analysis
from .semhash import improved_semhash, saturating_sigmoid
from .train import build_objective, class_mixed_indices, train_decoupled

__all__ = [
    "ArchitectureController",
    "DecoupledNet",
    "DecouplingObjective",
    "DecouplingSettings",
    "GatedConvBN",
    "collect_paths",
    "decision_tree",
    "filter_states",
    "hopkins_statistic",
    "improved_semhash",
    "kl_divergence_loss",
    "load_run",
    "mutual_information_loss",
    "occlusion_analysis",
    "run_method",
    "saturating_sigmoid",
    "sparsity_loss",
]


def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
               device: torch.device | str | None = None, seed: int = 0,
               settings: dict[str, Any] | None = None) -> MethodResult:
    """Decouple a copy of ``start`` (``start`` itself is not modified) with Eq. 12 for ``budget``, on
    ``device`` (None: ``common.run.pick_device``'s default).

    Resumes from ``out_dir/checkpoint.pt``; writes ``out_dir/model.pt``, the network it returns (``load_run``).
    That is the deployed network (filter states frozen on ``calibration_images`` class-mixed training images)
    with ``dynamic_forward`` (logits and per-sample MACs of the channel-skipping execution), ``mis_layer``
    (the backbone's last feature map), ``dynamic_filter_share`` (share of gated filters whose state depends
    on the input, raw gates on the validation split) and metrics: the shared keys of
    ``common.method.shared_metrics`` on the reported test split (``split`` naming it), ``val_top1`` / ``val_macs``
    on the validation split. The paper's explanations are
    path-level, not pixel saliency: ``saliency`` is None (common Grad-CAM). Per-sample calculation paths:
    ``result.model.paths(images)``. With ``static_twin`` the returned network (and ``model.pt``) is the
    static twin; the decoupled network it comes from is in ``out_dir/decoupled/model.pt``.
    """
    device = pick_device(None if device is None else str(device))
    name = backbone_name(start)
    config = resolve_settings(name, settings)
    seed_everything(seed)
    run = RunDir(out_dir)
    run.write_config({"backbone": name, "dataset": data.name, "budget": vars(budget), "seed": seed,
                      "settings": config.to_dict(), "entry": "run_method"})
    run.write_environment(device)
    model = DecoupledNet(copy.deepcopy(start).cpu(), config.reduction, config.init_bias, config.controller_init)
    size = (3, *data.image_size)
    objective = build_objective(model, data.num_classes, config, size)
    outcome = train_decoupled(model, objective, data, budget, run, config, device, seed)
    # The deployed network runs fp32: states, top-1 and MACs are measured in the precision it runs.
    policy = resolve_precision("fp32", device, channels_last=False)
    model.set_precision(policy)
    val = BatchLoader(data.val, 256, train=False, device=device)
    states = filter_states(collect_paths(model, val))  # raw gates (Eq. 5), as the paper counts them
    # The deployed network: filter states frozen on training images (silent removed, energetic always on).
    codes, deployment = freeze_for_deployment(model, data.train, config.calibration_images, device, seed)

    def save(net: DecoupledNet, path: Path, record: dict[str, Any]) -> None:
        save_decoupled(net, path, name, data.num_classes, config.reduction, config.init_bias, config.controller_init,
                       record)

    dense_macs = float(count_macs(start, size))
    extra: dict[str, Any] = {}
    if config.static_twin:  # the control: one fixed set of filters for every input (decoupling/twin.py)
        from .twin import TWIN_DIR, finetune_static_twin, static_twin

        save(model, Path(out_dir) / "decoupled" / "model.pt", deployment)
        extra = {"decoupled_val_top1": evaluate_top1(model, val),
                 "decoupled_val_macs": mean_dynamic_macs(model, val)}
        threshold = config.static_twin_threshold
        if config.static_twin_match_macs:  # equal cost: the decoupled network's mean MACs on the calibration images
            from .twin import macs_matched_threshold

            calibration = data.train.subset(class_mixed_indices(data.train.labels, len(codes), seed))
            target = mean_dynamic_macs(model, BatchLoader(calibration, 256, train=False, device=device))
            threshold = macs_matched_threshold(model, codes, target, size)
            extra["static_twin_threshold"] = threshold
        model = static_twin(model, codes, threshold)
        deployment = {**deployment, "static_twin_threshold": threshold}
        if config.static_twin_finetune:
            twin_run = RunDir(Path(out_dir) / TWIN_DIR)
            _, twin_seconds = finetune_static_twin(model, data, budget, twin_run, config, device, seed)
            outcome.train_seconds += twin_seconds
        model.set_precision(policy)
        extra["variant"] = "static twin" + (" (fine-tuned)" if config.static_twin_finetune else " (as is)")
    save(model, run.model_path, deployment)
    # the shared figures on the reported test split, as every package reports them; validation beside them
    test = BatchLoader(data.test, 256, train=False, device=device)
    metrics = {**shared_metrics(top1=evaluate_top1(model, test), split=data.test_split_name,
                                macs=mean_dynamic_macs(model, test), dense_macs=dense_macs,
                                params=count_params(model), precision=policy.name,
                                target_mac_reduction=config.target_mac_reduction),
               "val_top1": evaluate_top1(model, val), "val_macs": mean_dynamic_macs(model, val),
               "val_split": val_split_name(data), **extra, "macs_dense": dense_macs, "gate_offset": outcome.gate_offset,
               **{f"{k}_filters": v for k, v in states.fractions.items()},
               "train_steps": outcome.steps, "stopped_by_time": outcome.stopped_by_time}
    share = 0.0 if config.static_twin else states.fractions["dynamic"]
    return MethodResult(model=model, saliency=None, dynamic_forward=model.dynamic_forward,
                        mis_layer=model.backbone.cam_layer(), dynamic_filter_share=share,
                        metrics=metrics, train_seconds=outcome.train_seconds)
