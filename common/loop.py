"""One resumable training loop for every method: each method keeps its own step function and stages.

A method hands :class:`TrainLoop` the things that carry state (modules, optimisers, schedulers: anything with
``state_dict`` / ``load_state_dict``), the number of steps and the time budget, and calls :meth:`TrainLoop.run`
with its step function. The loop owns everything else:

- **one checkpoint layout** (``CHECKPOINT_FORMAT``): stage, step, training seconds, whether the time budget
  stopped it, the method's free-form ``extra`` state (best weights, history), every RNG state (torch CPU,
  every CUDA device, numpy's and Python's global generators) and each stateful object's state dict. It is
  written atomically (``common.run.atomic_torch_save``) and read with ``weights_only=True``;
- **exact resume**: the data order is a function of the step (:func:`batch_stream`; ``BatchLoader`` derives
  each epoch's shuffle and augmentation from ``seed + epoch``), and every RNG is restored, so a run killed at
  any moment and started again ends with the same weights, bit for bit, as one that was never interrupted;
- **finite checks**: the loss of every step, and every floating tensor of the state before any save. A
  non-finite value is a :class:`common.run.NonFiniteLossError` naming the setting to change; nothing is
  written over a good file;
- the step budget, the training-time budget (device time of the steps, synchronised on CUDA), periodic
  callbacks (validation, best-state tracking) and progress.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data.loader import BatchLoader
from .run import NonFiniteLossError, RunDir, atomic_torch_save, load_checkpoint, progress

CHECKPOINT_FORMAT = "icnn-loop/1"


@dataclass
class LoopState:
    """What a stage keeps across steps besides its stateful objects.

    ``extra`` is the method's own resumable state (best weights, validation history, flags): nested dicts and
    lists of tensors, numbers, strings and None, so that it loads with ``weights_only=True``."""

    step: int = 0
    seconds: float = 0.0
    stopped_on_time: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def batch_stream(loader: BatchLoader, start_step: int, per_epoch: int | None = None
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches positioned at ``start_step``: epoch ``start_step // per_epoch``, batch
    ``start_step % per_epoch`` of it. ``per_epoch`` (at most ``len(loader)``; default all of it) caps every epoch,
    as ``Budget.max_batches`` does. The same step always gets the same batch."""
    per_epoch = len(loader) if per_epoch is None else min(per_epoch, len(loader))
    if per_epoch < 1:
        raise ValueError("the training split gives no batch; it needs at least one image")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= per_epoch:
                break
            if i >= skip:
                yield batch
        skip = 0
        epoch += 1


# -- RNG state: every generator a step may draw from -----------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the legacy global generator)
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    for i, cuda_state in enumerate(state.get("cuda", [])):
        if torch.cuda.is_available() and i < torch.cuda.device_count():
            torch.cuda.set_rng_state(cuda_state, i)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],  # noqa: NPY002
                         n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


# -- finite checks ----------------------------------------------------------------------------------------


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors in ``obj`` (nested dicts, lists, tuples, state dicts) holding NaN or inf."""
    bad: list[str] = []
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "tensor")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            bad += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            bad += non_finite_tensors(value, f"{prefix}[{i}]")
    return bad


def require_finite(obj: Any, where: str, fix: str) -> None:
    """:class:`NonFiniteLossError` when ``obj`` holds a non-finite floating tensor: call it before saving
    weights, so that a diverged run never writes over a good file."""
    bad = non_finite_tensors(obj)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(f"{where}: {len(bad)} tensor(s) became NaN or infinite ({shown}); nothing was "
                                 f"saved; {fix}")


def _loss_value(loss: Tensor | float) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


# -- the loop -------------------------------------------------------------------------------------------------

StepFn = Callable[..., Tensor]
PeriodFn = Callable[[int, LoopState], None]


class TrainLoop:
    """A resumable loop over ``total_steps`` steps of one training stage, checkpointed in ``run``.

    ``stateful`` maps names to objects with ``state_dict`` / ``load_state_dict`` (modules, optimisers,
    schedulers, a method's objective). ``seconds`` caps the training time (the sum of the steps' device time);
    when it runs out the loop saves and stops, and the stage counts as finished (a resume with a larger
    ``seconds`` carries on). ``fix`` ends every non-finite error: the setting to change, e.g. "lower --set
    lr". ``where`` names the stage in messages and logs.

    The checkpoint (``run.checkpoint_path``) belongs to one stage: a checkpoint of another stage (an earlier
    stage of the same run, which has written its own result file) is ignored and replaced.
    """

    def __init__(self, run: RunDir, stage: str, stateful: Mapping[str, Any], total_steps: int, *,
                 seconds: float | None = None, save_every: int = 200, fix: str = "lower the learning rate",
                 where: str | None = None, log: Any = None, log_every: int = 50,
                 device: torch.device | str | None = None) -> None:
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.run_dir = run
        self.stage = stage
        self.stateful = dict(stateful)
        self.total_steps = total_steps
        self.seconds = seconds
        self.save_every = save_every
        self.fix = fix
        self.where = where or stage
        self.log = log
        self.log_every = log_every
        self.device = torch.device(device) if device is not None else None
        self.state = LoopState()
        self.resumed = False
        self._restore()

    # -- checkpoint -----------------------------------------------------------------------------------------

    def _restore(self) -> None:
        path = self.run_dir.checkpoint_path
        if not path.is_file():
            return
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise _foreign_checkpoint(path)
        if ckpt.get("stage") != self.stage:
            return
        missing = [name for name in self.stateful if name not in ckpt.get("state", {})]
        if missing:
            raise _foreign_checkpoint(path, f"it lacks the state of {missing}")
        for name, obj in self.stateful.items():
            obj.load_state_dict(ckpt["state"][name])
        self.state = LoopState(int(ckpt["step"]), float(ckpt["seconds"]), bool(ckpt["stopped_on_time"]),
                               dict(ckpt.get("extra", {})))
        if self.state.stopped_on_time and (self.seconds is None or self.state.seconds < self.seconds):
            self.state.stopped_on_time = False  # a larger time budget continues a run stopped on time
        set_rng_state(ckpt["rng"])
        self.resumed = True
        self._info("%s: resumed at step %d of %d", self.where, self.state.step, self.total_steps)

    def save(self) -> None:
        """Write the checkpoint now (atomically, after checking every tensor is finite)."""
        states = {name: obj.state_dict() for name, obj in self.stateful.items()}
        require_finite({"state": states, "extra": self.state.extra}, f"{self.where} step {self.state.step}",
                       self.fix)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.state.step,
                           "seconds": self.state.seconds, "stopped_on_time": self.state.stopped_on_time,
                           "extra": self.state.extra, "rng": rng_state(), "state": states},
                          self.run_dir.checkpoint_path)

    # -- running ----------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_on_time

    def run(self, step_fn: StepFn, *, batches: Callable[[int], Iterator[Any]] | None = None,
            on_period: PeriodFn | None = None, period: int | None = None, period_at_start: bool = False,
            desc: str | None = None) -> LoopState:
        """Run the remaining steps. ``step_fn(step)`` (or ``step_fn(step, batch)`` with ``batches``, a function
        of the first step that returns the batch iterator from there, e.g. ``lambda s: batch_stream(loader,
        s)``) does one optimisation step and returns its loss.

        ``on_period(done, state)`` runs every ``period`` steps, at the last step and when time runs out (before
        the checkpoint is saved, so what it puts in ``state.extra`` is saved with it), and before the first step
        with ``period_at_start``."""
        state = self.state
        if on_period is not None and period_at_start and state.step == 0 and self.total_steps > 0:
            on_period(0, state)
        if self.finished:
            return state
        stream = batches(state.step) if batches is not None else None
        bar = progress(range(state.step, self.total_steps), desc=desc or self.where,
                       total=self.total_steps - state.step)
        for step in bar:
            began = time.perf_counter()
            loss = step_fn(step, next(stream)) if stream is not None else step_fn(step)
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # CUDA is asynchronous: the time budget counts device time
            value = _loss_value(loss)
            state.seconds += time.perf_counter() - began
            if not math.isfinite(value):
                raise NonFiniteLossError(f"{self.where} step {step + 1}: the loss became {value}; nothing was "
                                         f"saved over the last checkpoint; {self.fix}")
            state.step = step + 1
            if self.log is not None and (state.step % self.log_every == 0 or state.step == 1):
                self.log.info("%s step %d/%d loss %.4f", self.where, state.step, self.total_steps, value)
            done = state.step == self.total_steps
            out_of_time = self.seconds is not None and state.seconds >= self.seconds
            state.stopped_on_time = out_of_time and not done
            if on_period is not None and period and (state.step % period == 0 or done or out_of_time):
                on_period(state.step, state)
            self.after_step(state.step)
            if state.step % self.save_every == 0 or done or out_of_time:
                self.save()
            if out_of_time:
                self._info("%s: time budget of %.0f s reached at step %d of %d", self.where, self.seconds,
                           state.step, self.total_steps)
                break
        return state

    def after_step(self, step: int) -> None:
        """Called after every step, before its checkpoint (a seam for tests that simulate a kill)."""

    def _info(self, message: str, *args: Any) -> None:
        if self.log is not None:
            self.log.info(message, *args)


def _foreign_checkpoint(path: Any, why: str = "it was not written by this project's training loop") -> Exception:
    from .run import CheckpointError

    return CheckpointError(f"checkpoint {path} cannot be resumed ({why}); delete it to train that stage again")
