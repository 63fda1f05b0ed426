"""Every method trains through ``common.loop.TrainLoop``: killed at a step and run again, ``run_method`` ends with
the weights of a run that was never interrupted, bit for bit (issue 26: one resumable training loop)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from benchmark.presets import COMPRESSING
from benchmark.registry import default_registry
from common.loop import TrainLoop
from common.run import seed_everything

METHODS = ("drib", "picnn", "decoupling", "isp")


class Killed(RuntimeError):
    """Stands for a SIGKILL between a step and its checkpoint."""


def _run(method: str, smoke, out: Path):
    preset, data, start = smoke
    seed_everything(0)
    entry = default_registry()[method]()
    return entry(copy.deepcopy(start), data, preset.budget(), out, device=torch.device("cpu"), seed=0,
                 settings=preset.method_settings(method, 0.5 if method in COMPRESSING else None))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_kill_and_resume_gives_the_uninterrupted_weights(method, smoke, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TrainLoop.after_step

    def counting(self, step):
        calls["n"] += 1
        original(self, step)

    monkeypatch.setattr(TrainLoop, "after_step", counting)
    reference = _run(method, smoke, tmp_path / "reference")
    steps = calls["n"]
    assert steps >= 2, f"{method} took {steps} loop steps: it does not train through common.loop.TrainLoop"

    kill_at = steps // 2 + 1  # mid-run: some stages finished, one interrupted

    def killing(self, step):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed

    calls["n"] = 0
    monkeypatch.setattr(TrainLoop, "after_step", killing)
    with pytest.raises(Killed):
        _run(method, smoke, tmp_path / "killed")
    monkeypatch.setattr(TrainLoop, "after_step", original)
    resumed = _run(method, smoke, tmp_path / "killed")

    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    assert ref_state.keys() == res_state.keys()
    differ = [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])]
    assert not differ, f"{method}: {len(differ)} tensors differ after kill and resume, e.g. {differ[:3]}"
