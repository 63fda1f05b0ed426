"""The resumable loop: a time-budget stop checkpoints, a second call resumes; NaN losses raise."""

import pytest
import torch

from common.run import NonFiniteLossError, RunDir
from isp.train import run_steps


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    calls = []

    def step(i):
        calls.append(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, step, calls


def test_interrupted_stage_resumes_where_it_stopped(tmp_path):
    run = RunDir(tmp_path)
    model, opt, step, calls = _problem()
    state = run_steps(run, "demo", {"model": model, "optimizer": opt}, 10, step, seconds=0.0)
    assert state.step == 1 and calls == [0]  # out of time after one step, checkpoint written
    model2, opt2, step2, calls2 = _problem()
    state2 = run_steps(run, "demo", {"model": model2, "optimizer": opt2}, 10, step2)
    assert state2.step == 10 and calls2 == list(range(1, 10))
    # the resumed run ends where an uninterrupted one ends
    model3, opt3, step3, _ = _problem()
    run_steps(RunDir(tmp_path / "fresh"), "demo", {"model": model3, "optimizer": opt3}, 10, step3)
    assert torch.allclose(model2.weight, model3.weight, atol=1e-6)


def test_checkpoint_of_another_stage_is_not_resumed(tmp_path):
    run = RunDir(tmp_path)
    model, opt, step, _ = _problem()
    run_steps(run, "first", {"model": model, "optimizer": opt}, 3, step)
    model2, opt2, step2, calls2 = _problem()
    run_steps(run, "second", {"model": model2, "optimizer": opt2}, 3, step2)
    assert calls2 == [0, 1, 2]


def test_nan_loss_raises_a_clear_error(tmp_path):
    model = torch.nn.Linear(1, 1)
    with pytest.raises(NonFiniteLossError, match="isp demo step 0"):
        run_steps(RunDir(tmp_path), "demo", {"model": model}, 5, lambda i: torch.tensor(float("nan")))
