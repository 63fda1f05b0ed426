"""Measurements of a trained decoupled network: accuracy, per-sample MACs, CPU time, filter states,
adversarial-path detection."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.data import BatchLoader, ImageTensors
from common.macs import count_macs, count_params
from common.run import progress
from common.training import evaluate_top1

from .analysis import FilterStates, classify_filters, layer_slices
from .model import DecoupledNet


@torch.no_grad()
def mean_dynamic_macs(model: DecoupledNet, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    per_sample = [model.dynamic_forward(x)[1] for x, _ in progress(batches, "dynamic MACs")]
    return float(torch.cat(per_sample).mean())


@torch.no_grad()
def cpu_latency_per_image(forward: nn.Module | Any, images: Tensor, warmup: int = 5) -> float:
    """Median seconds per single-image forward on one CPU thread (the paper's CPU-time protocol)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(min(warmup, len(images))):
            forward(images[i:i + 1])
        times = []
        for i in range(len(images)):
            start = time.perf_counter()
            forward(images[i:i + 1])
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times))


def cpu_speedup(model: DecoupledNet, dense: nn.Module, images: Tensor) -> dict[str, float]:
    """Dense backbone vs the gathered execution (only the selected filters are computed), CPU, batch 1."""
    model_cpu = model.to("cpu")
    dense = dense.to("cpu").eval()
    images = images.to("cpu")
    dense_s = cpu_latency_per_image(dense, images)
    with model_cpu.inference(gathered=True):
        gathered_s = cpu_latency_per_image(model_cpu, images)
    return {"cpu_ms_dense": 1000 * dense_s, "cpu_ms_decoupled": 1000 * gathered_s,
            "cpu_speedup": dense_s / gathered_s}


def state_metrics(states: FilterStates) -> dict[str, Any]:
    fractions = states.fractions
    return {"energetic_filters": fractions["energetic"], "silent_filters": fractions["silent"],
            "dynamic_filters": fractions["dynamic"],
            "filter_states_per_layer": {name: counts for name, counts in zip(states.layer_names, states.per_layer)}}


def evaluate_model(model: DecoupledNet, dense: nn.Module, test: ImageTensors, val: ImageTensors | None,
                   device: torch.device, batch_size: int = 256, latency_images: int = 100) -> dict[str, Any]:
    """Everything but the adversarial detection: top-1 (test and val), MACs, params, CPU time, states."""
    size = tuple(test.images.shape[1:])
    model.to(device).eval()
    test_batches = BatchLoader(test, batch_size, train=False, device=device)
    correct, macs, codes = 0, [], []
    with torch.no_grad():
        for x, y in progress(test_batches, "test: top-1, MACs, paths"):
            logits, per_sample = model.dynamic_forward(x)
            correct += int((logits.argmax(1) == y).sum())
            macs.append(per_sample)
            codes.append(torch.cat([g.last_mask for g in model.gated_layers], 1).cpu().numpy().astype(np.uint8))
    metrics: dict[str, Any] = {"top1": 100.0 * correct / len(test)}
    if val is not None and len(val):
        metrics["val_top1"] = evaluate_top1(model, BatchLoader(val, batch_size, train=False, device=device))
    macs_dense = count_macs(dense.to(device), size)
    metrics["macs_mean"] = float(torch.cat(macs).mean())
    metrics["macs_dense"] = float(macs_dense)
    metrics["mac_reduction"] = 1.0 - metrics["macs_mean"] / macs_dense
    metrics["macs_controllers"] = float(model.dense_macs(size) - macs_dense)
    metrics["params"] = count_params(model)
    metrics["params_dense"] = count_params(dense)
    states = classify_filters(np.concatenate(codes), layer_slices(model.layer_channels), model.layer_names)
    metrics.update(state_metrics(states))
    sample = test.images[: min(latency_images, len(test))].float().div(255)
    metrics.update(cpu_speedup(model, dense, sample))
    model.to(device)
    return metrics
