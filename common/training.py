"""Evaluation loops every method needs; each method's training step stays in its own package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .precision import Precision
from .run import progress


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], desc: str = "predict",
                   precision: Precision | None = None) -> tuple[Tensor, Tensor]:
    """Logits (fp32) and labels (on CPU) for every batch, with the model in eval mode.

    ``precision`` (a :class:`common.precision.Precision`) runs the forward under its autocast and input
    layout (the model itself is not converted); None keeps plain fp32, bit for bit as before.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    prepare = precision.prepare_inputs if precision is not None else (lambda t: t)
    try:
        for x, y in progress(batches, desc):
            with autocast():
                out = model(prepare(x))
            logits.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate_top1(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], desc: str = "evaluate",
                  precision: Precision | None = None) -> float:
    """Top-1 accuracy in percent (``precision``: see :func:`predict_logits`; the count itself is exact)."""
    logits, labels = predict_logits(model, batches, desc, precision)
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


@torch.no_grad()
def measure_latency(model: nn.Module, input_size: tuple[int, int, int], batch_size: int,
                    device: torch.device | str = "cpu", repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per forward pass of one batch (eval mode), timed with ``torch.utils.benchmark.Timer``
    (which synchronises CUDA and fixes the thread count): ``warmup`` untimed passes, then ``repeats``
    single-pass measurements. For side-by-side comparisons of several models use ``common.speed``."""
    from torch.utils import benchmark

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = torch.rand(batch_size, *input_size, device=device)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    try:
        for _ in range(warmup):
            model(x)
        times = [timer.timeit(1).median for _ in range(repeats)]
    finally:
        model.train(was_training)
    return float(torch.tensor(times).median())
