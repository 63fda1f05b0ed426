"""Tiny stand-in methods for the runner tests: no training, so the tests measure the benchmark itself."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from common.backbones import Backbone
from common.data import DatasetSplits
from common.macs import count_macs
from common.method import Budget, MethodResult


def static_copy(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
                device: torch.device, seed: int = 0, settings: dict | None = None) -> MethodResult:
    """The start, unchanged: a static model with no saliency of its own."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return MethodResult(model=copy.deepcopy(start).to(device), metrics={"note": "copy", "answer": 42})


def half_dynamic(start: Backbone, data: DatasetSplits, budget: Budget, out_dir: Path, *,
                 device: torch.device, seed: int = 0, settings: dict | None = None) -> MethodResult:
    """Claims half the dense MACs per sample and brings its own (input-gradient) saliency."""
    model = copy.deepcopy(start).to(device).eval()
    dense = float(count_macs(model, (3, *data.image_size)))

    def dynamic_forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return model(x), torch.full((len(x),), dense / 2, dtype=torch.float64)

    def saliency(x: Tensor, y: Tensor) -> Tensor:
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            score = model(x).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad.abs().sum(1)

    return MethodResult(model=model, saliency=saliency, dynamic_forward=dynamic_forward,
                        dynamic_filter_share=0.5, train_seconds=1.5)


def broken(*args: object, **kwargs: object) -> MethodResult:
    raise RuntimeError("injected failure: this method always breaks")


def interrupted(*args: object, **kwargs: object) -> MethodResult:
    raise KeyboardInterrupt  # what a kill (Ctrl-C) looks like from inside a job


def registry_of(**entries: object) -> dict:
    return {name: (lambda fn=fn: fn) for name, fn in entries.items()}
