"""The same metrics for every model a method returns (see README "Columns" for exact definitions).

Accuracy and MACs use the whole test set; deletion / insertion AUC and MIS use fixed subsets of it drawn
with ``MetricSpec.subset_seed``, identical for every method and seed. Latency is measured on the deployed
form (``common.deploy``: BatchNorm folded, channels_last, bf16 weights where the precision policy picks bf16)
of CPU copies of the model and of the preset's start architecture, timed side by side in interleaved calls
(``common.speed``), so that the speedup is a ratio of two like-for-like timings under the same machine load.
"""

from __future__ import annotations

import base64
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.backbones import Backbone
from common.data import BatchLoader, DatasetSplits
from common.deploy import deepcopy_module, deploy
from common.explain import build_mosaics, mis, pooled_activations, saliency_to_unit
from common.macs import count_macs, count_params
from common.method import MethodResult
from common.precision import resolve_precision
from common.run import progress
from common.speed import class_mixed_images, time_side_by_side
from common.training import evaluate_top1, predict_logits

from .explain_metrics import COLUMNS as EXPLANATION_COLUMNS
from .explain_metrics import explanation_columns, gridpg_mosaic_count
from .presets import MetricSpec

SALIENCY_CHUNK = 32

# The leaderboard's numeric columns, in table order; each job's metrics.json holds all of them.
COLUMNS = (
    "top1", "delta_top1", "dense_macs", "mean_macs", "mac_reduction_pct", "params",
    "latency_b1_ms", "latency_b128_ms", "speedup_b1", "speedup_b128",
    *EXPLANATION_COLUMNS,
    "mis", "mis_control", "mis_lift", "dynamic_filter_share", "train_seconds",
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


def latency_bf16(spec: MetricSpec) -> bool:
    """Whether the deployed forms timed for the latency columns hold bf16 weights: the precision policy
    (``spec.precision`` when the preset names one, else ``auto``) resolved for this CPU."""
    return resolve_precision(getattr(spec, "precision", "auto"), "cpu").name == "bf16"


def machine_description(device: torch.device) -> str:
    """The processor (or GPU), the torch thread count and the default training precision policy."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                     platform.processor() or platform.machine())
    policy = resolve_precision("auto", device).describe()
    return f"{where}, {torch.get_num_threads()} torch thread(s), training {policy}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def latency_form(dtype: str) -> str:
    """How the latency columns were measured (``dtype``: ``DeployInfo.dtype``), for metrics.json."""
    return f"deployed (BN folded, channels_last, {dtype}), cpu, {torch.get_num_threads()} thread(s)"


def _latencies(model: nn.Module, start: nn.Module, input_size: tuple[int, int, int], spec: MetricSpec,
               images: Tensor | None = None) -> tuple[dict[int, float], dict[int, float], str]:
    """Seconds per batch of the deployed forms (``common.deploy.deploy``) of CPU copies of ``model`` and
    ``start``, timed side by side (``common.speed.time_side_by_side``: interleaved calls, median) on
    ``images`` (class-mixed test images: per-input execution depends on them; random pixels when None).
    Each figure is the minimum over ``spec.latency_rounds`` rounds, robust to other processes competing
    for the CPU. A deployed form that does not reproduce its model raises ``common.deploy.DeployError``.
    The third value names the form (see :func:`latency_form`)."""
    if images is None:
        images = torch.rand(max(spec.latency_batches), *input_size, generator=torch.Generator().manual_seed(0))
    images = images.cpu()
    bf16 = latency_bf16(spec)
    forms = {name: deploy(deepcopy_module(candidate).cpu().eval(), bf16=bf16, example=images[:8])
             for name, candidate in (("model", model), ("start", start))}
    if forms["model"].deploy_info.dtype != forms["start"].deploy_info.dtype:  # like with like: the start
        forms["start"] = deploy(deepcopy_module(start).cpu().eval(), bf16=bf16, example=images[:8],
                                bf16_weights=False)  # in the model's bf16 autocast fallback
    best: tuple[dict[int, float], dict[int, float]] = ({}, {})
    for _ in range(spec.latency_rounds):
        timing = time_side_by_side(forms, images, spec.latency_batches, min_repeats=spec.latency_repeats,
                                   reference="start")
        for which, name in enumerate(forms):
            for b in spec.latency_batches:
                best[which][b] = min(timing["batches"][b][name]["seconds"], best[which].get(b, math.inf))
    return best[0], best[1], latency_form(forms["model"].deploy_info.dtype)


# Nested method metrics whose scalar entries are kept as ``method.<section>.<key>``: DRIB's dynamism figures,
# ISP's explanation distance and its gate-gradient shares (the other sections are per-layer detail).
FLATTENED_SECTIONS = ("dynamism", "explanation_distance", "gate_gradient_share_summary")


def _scalar_extras(values: dict[str, Any], prefix: str = "method.") -> dict[str, Any]:
    """The method's own metrics, kept when they are plain numbers, strings or booleans (one level of the
    ``FLATTENED_SECTIONS`` dicts too)."""
    extras = {}
    for key, value in values.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool | int | float | str):
            extras[f"{prefix}{key}"] = value
        elif isinstance(value, dict) and prefix == "method." and key in FLATTENED_SECTIONS:
            extras.update(_scalar_extras(value, prefix=f"method.{key}."))
    return extras


def pack_correct(correct: Tensor) -> str:
    """Per-image correctness (bool, test-set order) as base64 of its packed bits: metrics.json stays small."""
    return base64.b64encode(np.packbits(correct.cpu().numpy().astype(bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, count: int) -> Tensor:
    """The inverse of :func:`pack_correct` for ``count`` images."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:count]
    if len(bits) != count:
        raise ValueError(f"packed correctness holds {len(bits)} images, expected {count}")
    return torch.from_numpy(bits.astype(bool))


def evaluate_result(result: MethodResult, start: nn.Module, data: DatasetSplits, spec: MetricSpec, *,
                    device: torch.device, batch_size: int = 256) -> Evaluation:
    """Every leaderboard column for one trained model (``delta_top1`` is filled in at aggregation)."""
    model = result.model.to(device).eval()
    h, w = data.image_size
    input_size = (3, h, w)
    test_loader = BatchLoader(data.test, batch_size, train=False, device=device)
    steps = progress(range(6), "metrics", total=6)

    logits, test_labels = predict_logits(model, test_loader, "test top-1")  # evaluate_top1's pass, kept per image
    correct = logits.argmax(1) == test_labels
    top1 = 100.0 * correct.double().mean().item()
    next(steps, None)
    dense_macs = float(count_macs(model, input_size))
    start_macs = float(count_macs(start, input_size))
    start_top1 = evaluate_top1(start.to(device).eval(), test_loader, "start top-1")  # the dense point of pareto.png
    metrics: dict[str, Any] = {"top1": top1, "start_top1": start_top1, "dense_macs": dense_macs,
                               "start_macs": start_macs,
                               # per-image correctness behind top1: paired differences between rows
                               "top1_correct": pack_correct(correct), "top1_images": len(correct)}
    if result.dynamic_forward is not None:
        metrics["top1_dynamic"], mean_macs = _dynamic_pass(result, test_loader)
        share = result.dynamic_filter_share
        metrics["dynamic_filter_share"] = float("nan") if share is None else float(share)
    else:
        mean_macs = dense_macs
        metrics["dynamic_filter_share"] = 0.0
    metrics.update(mean_macs=mean_macs, mac_reduction_pct=100.0 * (1.0 - mean_macs / start_macs),
                   params=float(count_params(model)))
    # the shared schema's names (common.method.SHARED_METRIC_KEYS) beside the leaderboard's columns
    metrics.update(macs=mean_macs, mac_reduction=1.0 - mean_macs / start_macs, precision="fp32")
    next(steps, None)

    latency_images = class_mixed_images(data.test, max(spec.latency_batches), spec.subset_seed)
    own_lat, start_lat, metrics["latency_form"] = _latencies(model, start, input_size, spec, latency_images)
    metrics["machine"] = machine_description(device)
    for b in spec.latency_batches:
        metrics[f"latency_b{b}_ms"] = 1000.0 * own_lat[b]
        metrics[f"start_latency_b{b}_ms"] = 1000.0 * start_lat[b]
        metrics[f"speedup_b{b}"] = start_lat[b] / own_lat[b]
    next(steps, None)

    idx = subset_indices(len(data.test), spec.explain_images, spec.subset_seed)
    images = data.test.images[idx].float().div(255.0).to(device)
    labels = data.test.labels[idx].to(device)
    cam_layer = find_cam_layer(model)
    start = start.to(device).eval()

    def maps_of(fn: Callable[[Tensor, Tensor], Tensor], what: str) -> Tensor:
        return _chunked_maps(fn, images, labels, what)

    # GridPG mosaics: seeded, from test images the start classifies correctly alone (the same for every row)
    count = gridpg_mosaic_count(spec)
    pool = subset_indices(len(data.test), max(10 * count, 100), spec.subset_seed)
    mosaics = build_mosaics(start, data.test.images[pool], data.test.labels[pool], count, seed=spec.subset_seed,
                            indices=pool)
    explained, own_maps = explanation_columns(model, start, cam_layer, find_cam_layer(start), result.saliency,
                                              maps_of, images, labels, spec, mosaics)
    metrics.update(explained)
    # Decoupling and the baseline have no explainer of their own: theirs is the common Grad-CAM.
    metrics["own_explainer"] = "method" if result.saliency is not None else "gradcam"
    metrics["split"] = data.test_split_name
    next(steps, None)
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
    if "own_gridpg_reason" in metrics:  # the own explanation cannot run on a mosaic: the row says why
        optional += ("own_gridpg", "own_gridpg_se")
    if "gridpg_reason" in metrics:
        optional += tuple(c for c in EXPLANATION_COLUMNS if "gridpg" in c)
    bad = [k for k in COLUMNS if k in metrics and isinstance(metrics[k], float) and not math.isfinite(metrics[k])
           and k not in optional]
    if bad:
        raise MetricsError(f"non-finite metrics {bad}")
    n_fig = min(spec.figure_images, len(idx))
    with torch.no_grad():  # the prediction each figure panel names (the per-input execution where there is one)
        shown = images[:n_fig]  # the first images of the seeded random subset (subset_indices)
        logits = result.dynamic_forward(shown)[0] if result.dynamic_forward is not None else model.eval()(shown)
    explanations = {"indices": idx[:n_fig].clone(), "images": data.test.images[idx[:n_fig]].clone(),
                    "labels": labels[:n_fig].cpu(), "maps": saliency_to_unit(own_maps[:n_fig]),
                    "preds": logits.argmax(1).cpu(), "classes": list(data.classes)}
    return Evaluation(metrics, explanations)
