"""The shared training loop: exact resume after a kill at any step, finite checks, one checkpoint layout."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from common.data import ImageTensors
from common.data.loader import BatchLoader
from common.loop import CHECKPOINT_FORMAT, TrainLoop, batch_stream, rng_state, set_rng_state
from common.run import CheckpointError, NonFiniteLossError, RunDir, atomic_torch_save, seed_everything


class Killed(RuntimeError):
    """Stands for a SIGKILL: raised after a step, before its checkpoint."""


def _data(n: int = 40) -> ImageTensors:
    gen = torch.Generator().manual_seed(0)
    return ImageTensors(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen),
                        torch.arange(n) % 4)


def _train(tmp, total: int, kill_at: int | None = None, lr: float = 0.1, save_every: int = 3,
           seconds: float | None = None, nan_at: int | None = None) -> tuple[nn.Module, TrainLoop]:
    """A toy run whose every step draws from torch (dropout), numpy and Python RNGs and the loader."""
    seed_everything(1)  # what every launch does first; a checkpoint then restores the RNGs it saved
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    loader = BatchLoader(_data(), 8, train=True, seed=3)
    loop = TrainLoop(RunDir(tmp), "toy", {"model": model, "opt": opt, "sched": sched}, total,
                     save_every=save_every, fix="lower --set lr", seconds=seconds)
    if kill_at is not None:
        def after(step: int) -> None:
            if step == kill_at:
                raise Killed
        loop.after_step = after  # type: ignore[method-assign]

    def step(i: int, batch) -> torch.Tensor:
        x, y = batch
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3  # noqa: NPY002
        loss = nn.functional.cross_entropy(model(x + noise), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loop.state.extra.setdefault("losses", []).append(float(loss.detach()))
        return loss * float("nan") if i == nan_at else loss

    loop.run(step, batches=lambda s: batch_stream(loader, s, per_epoch=4))
    return model, loop


@pytest.mark.parametrize("kill_at", [1, 4, 5, 9])
def test_resume_after_kill_is_bit_identical(tmp_path, kill_at):
    reference, ref_loop = _train(tmp_path / "ref", 11)
    with pytest.raises(Killed):
        _train(tmp_path / "killed", 11, kill_at=kill_at)
    resumed, loop = _train(tmp_path / "killed", 11)
    assert loop.resumed == (kill_at >= 3)  # a kill before the first checkpoint starts again from nothing
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert loop.state.step == 11
    # the steps replayed after the last checkpoint give the same losses as the first time
    assert loop.state.extra["losses"][-1] == ref_loop.state.extra["losses"][-1]


def test_a_diverging_loss_stops_with_the_setting_to_change_and_keeps_the_good_checkpoint(tmp_path):
    with pytest.raises(Killed):
        _train(tmp_path, 30, kill_at=4)  # a good checkpoint at step 3
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"step 6: the loss became nan.*lower --set lr"):
        _train(tmp_path, 30, nan_at=5)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    loop = TrainLoop(RunDir(tmp_path), "s", {"model": model}, 2, fix="lower --set lr")

    def step(i: int) -> torch.Tensor:
        with torch.no_grad():
            model.weight[0, 0] = float("inf")  # finite loss, broken weights
        return torch.tensor(0.5)

    with pytest.raises(NonFiniteLossError, match=r"weight.*lower --set lr"):
        loop.run(step)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_checkpoint_layout_and_weights_only_load(tmp_path):
    _train(tmp_path, 5)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["stage"] == "toy" and ckpt["step"] == 5
    assert set(ckpt["state"]) == {"model", "opt", "sched"} and set(ckpt["rng"]) >= {"torch", "numpy", "python"}


def test_another_stage_checkpoint_is_ignored_and_a_foreign_one_refused(tmp_path):
    _train(tmp_path, 5)
    model = nn.Linear(2, 2)
    loop = TrainLoop(RunDir(tmp_path), "next-stage", {"model": model}, 3)
    assert not loop.resumed and loop.state.step == 0
    atomic_torch_save({"model": model.state_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="delete it"):
        TrainLoop(RunDir(tmp_path), "next-stage", {"model": model}, 3)


def test_time_budget_stops_saves_and_counts_as_finished(tmp_path):
    _, loop = _train(tmp_path, 50, seconds=1e-9)
    assert loop.state.step == 1 and loop.state.stopped_on_time and loop.finished
    _, again = _train(tmp_path, 50, seconds=1e-9)  # the same budget: nothing more to do
    assert again.resumed and again.state.step == 1
    _, longer = _train(tmp_path, 50)  # no time cap: carries on to the end
    assert longer.state.step == 50


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_batch_stream_is_a_function_of_the_step():
    loader = BatchLoader(_data(), 8, train=True, seed=5)
    full = [x for (x, _), _ in zip(batch_stream(loader, 0, per_epoch=3), range(9))]
    tail = [x for (x, _), _ in zip(batch_stream(loader, 4, per_epoch=3), range(5))]
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail))
