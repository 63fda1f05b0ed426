"""ISP: Interpretations Steered Network Pruning via Amortized Inferred Saliency Maps (Ganjdanesh, Gao and
Huang, ECCV 2022), as a pipeline of resumable stages on top of ``common``.

Entry for the benchmark (common.method's contract): ``run_method(start, data, budget, out_dir, *, device=None,
seed=0, settings=None)``, and ``load_run(path, *, device=None)``, the trained network of a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.backbones import Backbone
from common.data import DatasetSplits
from common.method import Budget, MethodResult
from common.run import pick_device

from .artefacts import load_run
from .config import IspSettings
from .selector import Selector
from .train import Pipeline

__all__ = ["IspSettings", "Pipeline", "Selector", "load_run", "run_method"]


def run_method(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
               device: torch.device | str | None = None, seed: int = 0, settings: dict[str, Any] | None = None
               ) -> MethodResult:
    """Run (or resume) the whole ISP pipeline from the pretrained ``start`` and return the slim model.

    ``budget.epochs`` is shared over the stages (30% predictor, 10% selector, 10% gate search as passes over
    the 5% subset, 50% fine-tuning) unless ``settings`` fixes a stage's epochs; ``budget.seconds`` is split
    in the same shares. The returned model is the physically pruned, fine-tuned network (static: no
    ``dynamic_forward``); ``saliency`` is the selector with the slim network as its encoder, returning the
    RBF Bernoulli map of Eq. 4-5 for the given targets; ``metrics`` is the run's metrics.json (the shared
    keys of ``common.method.SHARED_METRIC_KEYS`` and ISP's own). ``device=None``: ``common.run.pick_device``.
    """
    device = pick_device(None if device is None else str(device))
    config = IspSettings.from_dict(settings)
    pipeline = Pipeline(out_dir, start, data, budget, config, device, seed)
    pipeline.run_dir.write_config({"method": "isp", "backbone": pipeline.name, "dataset": data.name,
                                   "budget": {"epochs": budget.epochs, "seconds": budget.seconds,
                                              "max_batches": budget.max_batches},
                                   "seed": seed, "settings": config.to_dict()})
    pipeline.run_dir.write_environment(device)
    pipeline.run()
    model = pipeline.final_model()
    selector = Selector(model, pipeline.decoder())
    metrics = pipeline.run_dir.read_metrics()
    return MethodResult(model=model, saliency=selector.saliency, dynamic_forward=None,
                        mis_layer=model.cam_layer(), dynamic_filter_share=None, metrics=metrics,
                        train_seconds=pipeline.train_seconds())
