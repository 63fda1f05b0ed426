"""Training cost side by side: the steps of several training methods timed in alternation on the same batches.

Step times of two methods are only comparable under the same machine load, so :func:`time_steps` draws one
batch per round and runs every step on it in turn, in reverse order every other round (no step always runs
on the cache another one warmed), drops the ``warmup`` rounds and gives each step's median seconds.
:func:`cross_entropy_step` is the reference a method is timed against: a plain cross-entropy SGD step of a
backbone under a ``common.precision`` policy, the step the benchmark's baseline trains with. A method's cost
module (``decoupling/cost.py``, ``drib/cost.py``) builds its own steps, times them with the reference and adds
what its run does besides steps (calibrations, validations), timed once with :func:`timed_call`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import Precision

StepFn = Callable[[Tensor, Tensor], object]  # one optimisation step on a batch (x, y)


def timed_call(fn: Callable[..., object], *args: Any, device: torch.device | str | None = None,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one ``fn(*args)`` takes; on a CUDA ``device`` the queued work is waited for on both sides."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    began = clock()
    fn(*args)
    if cuda:
        torch.cuda.synchronize(device)
    return clock() - began


def time_steps(steps: Mapping[str, StepFn], batches: Iterator[tuple[Tensor, Tensor]], rounds: int, *,
               warmup: int = 3, device: torch.device | str | None = None,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of every ``steps[name](x, y)`` over ``rounds`` timed rounds.

    Each of ``warmup + rounds`` rounds takes the next batch of ``batches`` and calls every step on it, in the
    order of ``steps`` on even rounds and reversed on odd ones; the first ``warmup`` rounds are not counted."""
    if not steps:
        raise ValueError("time_steps needs at least one step")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        x, y = next(batches)
        for name in names if i % 2 == 0 else names[::-1]:
            seconds = timed_call(steps[name], x, y, device=device, clock=clock)
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def cross_entropy_step(model: nn.Module, precision: Precision, *, lr: float, momentum: float = 0.0,
                       weight_decay: float = 0.0, nesterov: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """A plain cross-entropy training step of ``model`` (converted in place to the policy's memory format) with
    its own SGD optimiser: the forward under the policy's autocast, the loss in fp32, one backward, one
    update. The step returns the loss."""
    precision.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)

    def step(x: Tensor, y: Tensor) -> Tensor:
        model.train()
        with precision.autocast():
            logits = model(precision.prepare_inputs(x))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step
