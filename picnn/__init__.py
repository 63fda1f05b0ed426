"""PICNN (Guo, Yang et al., AAAI 2024): an interpretation pathway that groups the filters of a late conv-layer
into class-specific clusters through a learnable filter-class correspondence matrix P.

Entry for the benchmark: ``run_method``. Pieces: ``config`` (PicnnSettings), ``sampling`` (Eq. 5-10),
``model`` (target layer, P, pathways, Eq. 4), ``losses`` (Eq. 1-3), ``train`` (resumable loop, ``load_run``),
``evaluate`` (ACC1/ACC2/ACC3, MIS, MACs), ``explain`` (class-cluster Grad-CAM).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from common.backbones import Backbone
from common.data import DatasetSplits
from common.method import Budget, MethodResult
from common.run import RunDir, pick_device, seed_everything

from .config import PicnnSettings
from .evaluate import evaluate_picnn, interpretation_accuracies
from .explain import class_cluster_saliency, cluster_grad_cams
from .losses import discrimination_loss, interpretation_loss, picnn_loss, picnn_losses
from .model import PicnnNet, resolve_target
from .sampling import bernoulli_assignment, gumbel_assignment, pseudo_label
from .train import build_picnn, load_run, registry_name, save_model, train_picnn

__all__ = [
    "PicnnNet",
    "PicnnSettings",
    "bernoulli_assignment",
    "build_picnn",
    "class_cluster_saliency",
    "cluster_grad_cams",
    "discrimination_loss",
    "evaluate_picnn",
    "gumbel_assignment",
    "interpretation_accuracies",
    "interpretation_loss",
    "load_run",
    "picnn_loss",
    "picnn_losses",
    "pseudo_label",
    "resolve_target",
    "run_method",
    "train_picnn",
]


def _train_and_evaluate(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path,
                        config: PicnnSettings, device: torch.device, seed: int
                        ) -> tuple[PicnnNet, dict[str, Any], float]:
    seed_everything(seed)
    model = PicnnNet(copy.deepcopy(start), data.num_classes, config.filters, config.target_layer).to(device)
    backbone = registry_name(start)  # what load_run rebuilds (None: a backbone outside common.backbones)
    run = RunDir(out_dir)
    run.write_config({"entry": "run_method", "backbone": backbone or type(start).__name__, "dataset": data.name,
                      "budget": {"epochs": budget.epochs, "seconds": budget.seconds,
                                 "max_batches": budget.max_batches},
                      "seed": seed, "settings": config.to_dict()})
    run.write_environment(device)
    report = train_picnn(model, data, budget, run, config, device, seed)
    save_model(model, run, {"backbone": backbone, "backbone_class": type(start).__name__,
                            "num_classes": data.num_classes,
                            "filters": model.filters, "added_target_conv": model.added_target_conv,
                            "target_layer": config.target_layer, "best_step": report.best_step})
    metrics = evaluate_picnn(model, data.test, split_name=data.test_split_name, assignment=config.assignment,
                             draws=config.eval_draws, mis_samples=config.mis_samples, device=device, seed=seed,
                             precision=config.precision)
    metrics.update(best_val_top1=report.best_val_top1, best_step=report.best_step, steps=report.steps,
                   val_source=data.val_source, lam=config.lam)
    run.write_metrics(metrics)
    return model, metrics, report.train_seconds


def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
               device: torch.device | str | None = None, seed: int = 0, settings: dict[str, Any] | None = None
               ) -> MethodResult:
    """Train PICNN from ``start`` (a copy of it; the caller's backbone is not modified) within ``budget``.

    Resumes from ``out_dir/checkpoint.pt``. Selects the weights with the best validation ACC1, evaluates them
    on ``data.test`` (the shared figures ``top1``, ``split``, ``macs``, ``mac_reduction``, ``params``, ...,
    then ACC2/ACC3 and MIS; written to ``out_dir/metrics.json``; ``load_run(out_dir)`` reloads the model) and
    returns the model with its native saliency (Grad-CAM of the target class from its cluster of filters),
    the target layer as ``mis_layer``, and the measured training seconds. PICNN is a static model:
    ``dynamic_forward`` and ``dynamic_filter_share`` are None.

    With ``settings["control"] = True`` the lambda = 0 control (same architecture, seed, batches, budget and
    test images; its P never trained) is trained too, in ``out_dir/control``, and the metrics gain
    ``control_top1``, ``control_acc2``, ``control_acc3``, ``control_mis`` and ``mis_lift`` = mis - control_mis.
    ``device`` None: CUDA when available, else CPU.
    ``train_seconds`` counts PICNN's own training only.
    """
    config = PicnnSettings.from_dict(settings)
    device = pick_device(None) if device is None else torch.device(device)
    model, metrics, train_seconds = _train_and_evaluate(start, data, budget, Path(out_dir), config, device, seed)
    if config.control:
        control_config = dataclasses.replace(config, lam=0.0, control=False)
        _twin, control, _ = _train_and_evaluate(start, data, budget, Path(out_dir) / "control", control_config,
                                                device, seed)
        metrics.update({f"control_{k}": control[k] for k in ("top1", "acc2", "acc3", "mis")})
        metrics["mis_lift"] = metrics["mis"] - control["mis"]
        RunDir(out_dir).write_metrics(metrics)
    model.eval()
    return MethodResult(model=model, saliency=class_cluster_saliency(model), dynamic_forward=None,
                        mis_layer=model.target_layer, dynamic_filter_share=None, metrics=metrics,
                        train_seconds=train_seconds)
