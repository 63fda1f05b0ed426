"""A resumable optimisation loop shared by the stages: checkpoint.pt holds the stage name, the step, every
module and optimiser state and the RNG, and is rewritten every ``save_every`` steps and on a time-budget stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from common.data import BatchLoader
from common.run import RunDir, atomic_torch_save, check_finite, load_checkpoint, progress

CHECK_EVERY = 50


@dataclass
class LoopState:
    """What a stage keeps across steps besides its modules: free-form tensors or numbers (best model, ...)."""

    step: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def batch_stream(loader: BatchLoader, start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches, positioned at ``start_step`` of the loader's epoch sequence (for resuming)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_step, per_epoch)
    loader.set_epoch(epoch)
    while True:
        for i, batch in enumerate(loader):
            if skip and i < skip:
                continue
            yield batch
        skip = 0


def run_steps(run: RunDir, stage: str, stateful: dict[str, Any], total_steps: int,
              step_fn: Callable[[int], Tensor], *, seconds: float | None = None, save_every: int = 200,
              on_period: Callable[[int, LoopState], None] | None = None, period: int | None = None,
              log=None) -> LoopState:
    """Run ``step_fn(step) -> loss`` until ``total_steps`` or ``seconds`` of training time.

    ``stateful`` maps names to modules / optimisers (anything with state_dict). ``on_period`` runs every
    ``period`` steps and at the end (validation, best-model tracking through ``LoopState.extra``).
    """
    state = LoopState()
    ckpt_path = run.checkpoint_path
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("stage") == stage:
            for name, obj in stateful.items():
                obj.load_state_dict(ckpt["state"][name])
            state = LoopState(ckpt["step"], ckpt["seconds"], ckpt.get("extra", {}))
            torch.set_rng_state(ckpt["rng"])
            if log:
                log.info("%s: resumed at step %d", stage, state.step)

    def save() -> None:
        atomic_torch_save({"stage": stage, "step": state.step, "seconds": state.seconds, "extra": state.extra,
                           "rng": torch.get_rng_state(),
                           "state": {k: v.state_dict() for k, v in stateful.items()}}, ckpt_path)

    bar = progress(range(state.step, total_steps), desc=stage, total=total_steps - state.step)
    for step in bar:
        start = time.perf_counter()
        loss = step_fn(step)
        if loss.is_cuda:  # CUDA runs asynchronously: wait for the step so the time budget counts device time
            torch.cuda.synchronize(loss.device)
        if step % CHECK_EVERY == 0:
            check_finite(loss, f"isp {stage} step {step}")
            if log:
                log.info("%s step %d/%d loss %.4f", stage, step, total_steps, float(loss.detach()))
        state.seconds += time.perf_counter() - start
        state.step = step + 1
        done = state.step == total_steps
        out_of_time = seconds is not None and state.seconds >= seconds
        if on_period is not None and period and (state.step % period == 0 or done or out_of_time):
            on_period(state.step, state)
        if state.step % save_every == 0 or done or out_of_time:
            save()
        if out_of_time:
            if log:
                log.info("%s: time budget of %.0f s reached at step %d/%d", stage, seconds, state.step,
                         total_steps)
            break
    return state
