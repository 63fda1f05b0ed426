"""The same metrics for every model a method returns (see README "Columns" for exact definitions).

Accuracy and MACs use the whole test set; deletion / insertion AUC and MIS use fixed subsets of it drawn
with ``MetricSpec.subset_seed``, identical for every method and seed. Latency is measured on a CPU copy of
the model, back to back with the preset's start architecture in the same process, so that the speedup is
a ratio of two timings taken under the same machine load.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.backbones import Backbone
from common.data import BatchLoader, DatasetSplits
from common.explain import deletion_curve, grad_cam, insertion_curve, mis, pooled_activations, saliency_to_unit
from common.macs import count_macs, count_params
from common.method import MethodResult
from common.run import progress
from common.training import evaluate_top1, measure_latency

from .presets import MetricSpec

SALIENCY_CHUNK = 32

# The leaderboard's numeric columns, in table order; each job's metrics.json holds all of them.
COLUMNS = (
    "top1", "delta_top1", "dense_macs", "mean_macs", "mac_reduction_pct", "params",
    "latency_b1_ms", "latency_b128_ms", "speedup_b1", "speedup_b128",
    "own_deletion_auc", "own_insertion_auc", "gradcam_deletion_auc", "gradcam_insertion_auc",
    "mis", "dynamic_filter_share", "train_seconds",
)


class MetricsError(RuntimeError):
    """A method returned something the metrics cannot measure (bad saliency shape, non-finite MACs...)."""


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    explanations: dict[str, Tensor]  # images, labels, test indices and the method's own maps (unit scaled)


def find_cam_layer(model: nn.Module) -> nn.Module:
    """The last feature map of ``model``: its (first) ``Backbone``'s ``cam_layer()``, else its last conv.

    Methods may wrap the backbone (gates, heads); the wrapped backbone still names its last feature map.
    """
    for module in model.modules():
        if isinstance(module, Backbone):
            return module.cam_layer()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise MetricsError("the model has no Backbone and no Conv2d: cannot find a layer for Grad-CAM")
    return convs[-1]


def subset_indices(n_total: int, n: int, seed: int) -> Tensor:
    """The first ``n`` of a seeded permutation of the test set: the same images for every model."""
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order[: min(n, n_total)]


def _chunked_maps(fn: Callable[[Tensor, Tensor], Tensor], images: Tensor, labels: Tensor, what: str) -> Tensor:
    maps = []
    for start in range(0, len(images), SALIENCY_CHUNK):
        x, y = images[start:start + SALIENCY_CHUNK], labels[start:start + SALIENCY_CHUNK]
        out = fn(x, y).detach().float()
        if out.dim() == 4 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 3 or out.shape[0] != len(x):
            raise MetricsError(f"{what} returned maps of shape {tuple(out.shape)}; expected B x H x W")
        if not torch.isfinite(out).all():
            raise MetricsError(f"{what} returned non-finite values")
        maps.append(out.cpu())
    return torch.cat(maps)


def _auc_pair(model: nn.Module, images: Tensor, maps: Tensor, labels: Tensor, spec: MetricSpec
              ) -> tuple[float, float]:
    kwargs = {"steps": spec.perturbation_steps, "step_fraction": spec.step_fraction}
    deletion = deletion_curve(model, images, maps, labels, **kwargs).auc.mean().item()
    insertion = insertion_curve(model, images, maps, labels, **kwargs).auc.mean().item()
    return deletion, insertion


@torch.no_grad()
def _dynamic_pass(result: MethodResult, loader: BatchLoader) -> tuple[float, float]:
    """(top-1 % from the dynamic forward, mean per-sample MACs) over the whole test set."""
    assert result.dynamic_forward is not None
    correct, macs, count = 0, 0.0, 0
    for x, y in progress(loader, "dynamic MACs"):
        logits, per_sample = result.dynamic_forward(x)
        per_sample = torch.as_tensor(per_sample, dtype=torch.float64).reshape(-1).cpu()
        if per_sample.numel() != len(x) or not torch.isfinite(per_sample).all():
            raise MetricsError(f"dynamic_forward returned {per_sample.numel()} MAC values for {len(x)} images")
        correct += int((logits.argmax(1) == y).sum())
        macs += float(per_sample.sum())
        count += len(x)
    return 100.0 * correct / count, macs / count


def _latencies(model: nn.Module, start: nn.Module, input_size: tuple[int, int, int], spec: MetricSpec
               ) -> tuple[dict[int, float], dict[int, float]]:
    """Seconds per batch of CPU copies of ``model`` and ``start``, measured in alternating rounds; each
    figure is the minimum over rounds of ``measure_latency``'s median, which is robust to other processes
    competing for the CPU."""
    models = (copy.deepcopy(model).cpu().eval(), copy.deepcopy(start).cpu().eval())
    best: tuple[dict[int, float], dict[int, float]] = ({}, {})
    for _ in range(spec.latency_rounds):
        for which, candidate in enumerate(models):
            for b in spec.latency_batches:
                seconds = measure_latency(candidate, input_size, b, "cpu", repeats=spec.latency_repeats)
                best[which][b] = min(seconds, best[which].get(b, math.inf))
    return best


def _scalar_extras(values: dict[str, Any]) -> dict[str, Any]:
    """The method's own metrics, kept when they are plain numbers, strings or booleans."""
    extras = {}
    for key, value in values.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool | int | float | str):
            extras[f"method.{key}"] = value
    return extras


def evaluate_result(result: MethodResult, start: nn.Module, data: DatasetSplits, spec: MetricSpec, *,
                    device: torch.device, batch_size: int = 256) -> Evaluation:
    """Every leaderboard column for one trained model (``delta_top1`` is filled in at aggregation)."""
    model = result.model.to(device).eval()
    h, w = data.image_size
    input_size = (3, h, w)
    test_loader = BatchLoader(data.test, batch_size, train=False, device=device)
    steps = progress(range(6), "metrics", total=6)

    top1 = evaluate_top1(model, test_loader, "test top-1")
    next(steps, None)
    dense_macs = float(count_macs(model, input_size))
    start_macs = float(count_macs(start, input_size))
    metrics: dict[str, Any] = {"top1": top1, "dense_macs": dense_macs, "start_macs": start_macs}
    if result.dynamic_forward is not None:
        metrics["top1_dynamic"], mean_macs = _dynamic_pass(result, test_loader)
        share = result.dynamic_filter_share
        metrics["dynamic_filter_share"] = float("nan") if share is None else float(share)
    else:
        mean_macs = dense_macs
        metrics["dynamic_filter_share"] = 0.0
    metrics.update(mean_macs=mean_macs, mac_reduction_pct=100.0 * (1.0 - mean_macs / start_macs),
                   params=float(count_params(model)))
    next(steps, None)

    own_lat, start_lat = _latencies(model, start, input_size, spec)
    for b in spec.latency_batches:
        metrics[f"latency_b{b}_ms"] = 1000.0 * own_lat[b]
        metrics[f"start_latency_b{b}_ms"] = 1000.0 * start_lat[b]
        metrics[f"speedup_b{b}"] = start_lat[b] / own_lat[b]
    next(steps, None)

    idx = subset_indices(len(data.test), spec.explain_images, spec.subset_seed)
    images = data.test.images[idx].float().div(255.0).to(device)
    labels = data.test.labels[idx].to(device)
    cam_layer = find_cam_layer(model)

    def common_cam(x: Tensor, y: Tensor) -> Tensor:
        return grad_cam(model, cam_layer, x, y)

    gradcam_maps = _chunked_maps(common_cam, images, labels, "Grad-CAM")
    metrics["gradcam_deletion_auc"], metrics["gradcam_insertion_auc"] = _auc_pair(
        model, images, gradcam_maps, labels, spec)
    next(steps, None)
    if result.saliency is not None:
        own_maps = _chunked_maps(result.saliency, images, labels, "the method's saliency")
        metrics["own_deletion_auc"], metrics["own_insertion_auc"] = _auc_pair(model, images, own_maps, labels, spec)
        metrics["own_explainer"] = "method"
    else:  # Decoupling and the baseline: their own explanation is the common Grad-CAM
        own_maps = gradcam_maps
        metrics["own_deletion_auc"] = metrics["gradcam_deletion_auc"]
        metrics["own_insertion_auc"] = metrics["gradcam_insertion_auc"]
        metrics["own_explainer"] = "gradcam"
    next(steps, None)

    metrics["mis"] = float("nan")
    if spec.mis_images > 0:  # 0 switches MIS off (its k-NN estimator costs ~0.02 s per filter and class)
        mis_layer = result.mis_layer if result.mis_layer is not None else cam_layer
        mis_idx = subset_indices(len(data.test), spec.mis_images, spec.subset_seed)
        mis_images = data.test.images[mis_idx].float().div(255.0)
        activations = pooled_activations(model, mis_layer, mis_images, batch_size=batch_size)
        metrics["mis"] = mis(activations, data.test.labels[mis_idx], data.num_classes)
    next(steps, None)

    metrics["train_seconds"] = float(result.train_seconds)
    metrics.update(_scalar_extras(result.metrics))
    optional = ("dynamic_filter_share", "mis")  # NaN when the method gives none / MIS is switched off
    bad = [k for k in COLUMNS if k in metrics and isinstance(metrics[k], float) and not math.isfinite(metrics[k])
           and k not in optional]
    if bad:
        raise MetricsError(f"non-finite metrics {bad}")
    n_fig = min(spec.figure_images, len(idx))
    explanations = {"indices": idx[:n_fig].clone(), "images": data.test.images[idx[:n_fig]].clone(),
                    "labels": labels[:n_fig].cpu(), "maps": saliency_to_unit(own_maps[:n_fig])}
    return Evaluation(metrics, explanations)
