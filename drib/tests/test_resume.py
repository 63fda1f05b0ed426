"""DRIB on the shared loop (common.loop): exact resume after a kill, config identity, non-finite weights."""

from __future__ import annotations

import json

import pytest
import torch

import drib.train as drib_train
from common.backbones import build_backbone
from common.data import load_dataset
from common.loop import CHECKPOINT_FORMAT, TrainLoop, non_finite_tensors
from common.method import Budget
from drib.__main__ import main
from drib.config import DribSettings

# Two epochs of three steps: the decisions train in the first (Gumbel noise), the second is the fine-tuning
# share, whose start calibrates the code books ("ones" code books keep every channel, so the 50% MAC target
# really moves them). A checkpoint after every step: a kill at step k resumes from step k - 1.
SETTINGS = {"decision": {"actions": 4, "codebook_init": "ones"},
            "bottleneck": {"steps": 2, "copies": 2, "estimator_samples": 32},
            "train": {"batch_size": 16, "log_every": 1, "save_every": 1, "finetune_fraction": 0.5,
                      "finetune_augment": True},
            "target_mac_reduction": 0.5}
BUDGET = Budget(epochs=2, max_batches=3)
TINY_CLI = {"decision": {"actions": 3}, "bottleneck": {"steps": 2, "copies": 2, "estimator_samples": 32},
            "train": {"batch_size": 16}}
TINY_RECIPE = {"description": "tiny test recipe", "backbone": "resnet20", "dataset": "digits", "epochs": 1,
               "settings": TINY_CLI}


class Killed(RuntimeError):
    """Stands for a SIGKILL between a step and its checkpoint."""


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    data.val = data.val.subset(range(48))
    data.test = data.test.subset(range(16))
    return data


def _train(digits, out):
    torch.manual_seed(0)  # the start is the same network on every launch (the benchmark passes one)
    start = build_backbone("resnet20", num_classes=digits.num_classes)
    return drib_train.train_run(start, "resnet20", digits, BUDGET, out, DribSettings.from_dict(SETTINGS),
                                torch.device("cpu"), seed=3)[0]


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(drib_train, "CALIBRATION_IMAGES", 32)
        out = tmp_path_factory.mktemp("reference")
        return _train(digits, out), out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 5])
def test_kill_and_resume_ends_with_the_uninterrupted_weights(digits, reference, tmp_path, monkeypatch, kill_at):
    """kill_at 3: the checkpoint of step 2 resumes mid-decision stage (the RNGs must be restored), validates
    epoch 1 and calibrates; kill_at 5: the one of step 4 (calibrated, epoch 1's best kept) must not calibrate
    again."""
    monkeypatch.setattr(drib_train, "CALIBRATION_IMAGES", 32)
    ref, ref_dir = reference
    calls = {"n": 0}

    def killing(self, step):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed

    monkeypatch.setattr(TrainLoop, "after_step", killing)
    with pytest.raises(Killed):
        _train(digits, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(drib_train, "CALIBRATION_IMAGES", 32)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == kill_at - 1
    assert ckpt["extra"]["calibrated"] == (kill_at == 5)
    assert (ckpt["extra"]["best"] or {}).get("epoch") == (1 if kill_at == 5 else None)
    resumed = _train(digits, tmp_path)
    assert f"resumed at step {kill_at - 1} of 6" in (tmp_path / "log.txt").read_text()

    ref_state, res_state = ref.net.state_dict(), resumed.net.state_dict()
    assert ref_state.keys() == res_state.keys()
    assert [k for k in ref_state if not torch.equal(ref_state[k], res_state[k])] == []
    assert all(torch.equal(ref.stats[k].mean, resumed.stats[k].mean) for k in ref.stats)
    # the same selection, and one calibration when the decisions froze (it moved the code books), as uninterrupted
    for key in ("val_top1", "val_mac_fraction", "selected_epoch", "steps", "calibration"):
        assert resumed.meta[key] == ref.meta[key], key
    assert [c["when"] for c in ref.meta["calibration"]] == ["decisions frozen", "selected model"]
    assert ref.meta["calibration"][0]["scale"] != 1.0
    history = [torch.load(d / "checkpoint.pt", weights_only=True)["extra"]["history"] for d in (ref_dir, tmp_path)]
    assert history[0] == history[1] and [h["step"] for h in history[0]] == [3, 6]


def _cli(run, config, *extra):
    return main(["train", "--dataset", "digits", "--from-scratch", "--epochs", "1", "--out", str(run),
                 "--config", str(config), "--device", "cpu", "--threads", "1", *extra])


def _files(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


@pytest.mark.slow
def test_cli_refuses_another_config_and_resumes_the_same(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RECIPE))
    run = tmp_path / "run"
    assert _cli(run, config, "--max-batches", "2") == 0
    before = _files(run)
    capsys.readouterr()
    # another value of a setting: refused before anything is loaded, naming the key; nothing is touched
    assert _cli(run, config, "--max-batches", "2", "--set", "train.backbone_lr=0.02") == 2
    err = capsys.readouterr().err
    assert "drib.train.backbone_lr: 0.01 -> 0.02" in err and err.count("\n") == 1
    assert _cli(run, config, "--max-batches", "3") == 2
    assert "budget.max_batches: 2 -> 3" in capsys.readouterr().err
    assert _files(run) == before
    # the same config (a time budget is not part of it): the finished run is found, nothing trains again
    assert _cli(run, config, "--max-batches", "2", "--budget-seconds", "1000") == 0
    assert (run / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert json.loads((run / "config.json").read_text())["seconds"] == 1000


@pytest.mark.slow
def test_a_diverging_backbone_lr_exits_2_and_writes_no_weights(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_RECIPE))
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"a good model from before")  # must survive the failed run
    assert _cli(run, config, "--max-batches", "3", "--set", "train.backbone_lr=1e6") == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "lower --set train.backbone_lr" in err and err.count("\n") == 1
    assert (run / "model.pt").read_bytes() == b"a good model from before"
    if (run / "checkpoint.pt").exists():  # an earlier checkpoint may stay: it is finite
        assert non_finite_tensors(torch.load(run / "checkpoint.pt", weights_only=True)) == []
