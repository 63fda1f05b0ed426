"""PICNN on the shared training loop: a run killed mid-epoch resumes to the same weights, bit for bit; a diverged
run is refused with the setting to change and never writes weights."""

import shutil

import pytest
import torch

from common.loop import CHECKPOINT_FORMAT, TrainLoop
from common.run import NonFiniteLossError, RunDir
from picnn import build_picnn
from picnn.__main__ import main
from picnn.train import save_model

# 2 epochs of 3 steps, a checkpoint every 2 steps and at every epoch end (steps 2, 3, 4, 6).
ARGS = ["train", "--backbone", "resnet20", "--dataset", "digits", "--batch-size", "16", "--max-batches", "3",
        "--epochs", "2", "--device", "cpu", "--threads", "1", "--from-scratch", "--mis-samples", "50",
        "--set", "checkpoint_every=2"]


class Killed(BaseException):
    """Stands for a SIGKILL after a step and before its checkpoint (BaseException: no handler catches it)."""


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _history(out) -> list[dict]:
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and set(ckpt["state"]) == {"model", "optimizer", "scheduler"}
    return [{k: v for k, v in entry.items() if k != "train_seconds"} for entry in ckpt["extra"]["history"]]


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*ARGS, "--out", str(reference)]) == 0
    calls = []

    def kill_at_fifth(self: TrainLoop, step: int) -> None:
        calls.append(step)
        if len(calls) == 5:  # after step 5: the step-4 checkpoint exists, epoch 2 is half done
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "after_step", kill_at_fifth)
        with pytest.raises(Killed):
            main([*ARGS, "--out", str(killed)])
    assert not (killed / "model.pt").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 4
    assert main([*ARGS, "--out", str(killed)]) == 0
    assert "resumed from step 4 of 6" in (killed / "log.txt").read_text()
    ref, got = _weights(reference / "model.pt"), _weights(killed / "model.pt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    last = [torch.load(out / "checkpoint.pt", weights_only=True)["state"]["model"] for out in (reference, killed)]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])  # the last weights too, not only the best
    assert _history(killed) == _history(reference) and len(_history(reference)) == 2  # one validation per epoch


def test_a_diverging_lr_exits_2_naming_the_setting_and_writes_no_weights(tmp_path, capsys):
    out = tmp_path / "diverged"
    assert main([*ARGS, "--set", "lr=1e12", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # the weights turn non-finite at step 2 (checked before its checkpoint), the loss at step 3
    assert "step 2: " in err and "became NaN or infinite" in err and "nothing was saved" in err, err
    assert "lower --set lr" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
    # A good model.pt already there survives a diverging run (same file, same bytes).
    good = tmp_path / "good"
    save_model(build_picnn("resnet20", 10), RunDir(good), {"backbone": "resnet20", "num_classes": 10,
                                                           "filters": None})
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(good / "model.pt", again / "model.pt")
    assert main([*ARGS, "--set", "lr=1e12", "--out", str(again)]) == 2
    assert (again / "model.pt").read_bytes() == (good / "model.pt").read_bytes()


def test_non_finite_weights_are_never_written_to_model_pt(tmp_path):
    model = build_picnn("resnet20", 10)
    run = RunDir(tmp_path)
    save_model(model, run, {"backbone": "resnet20"})
    before = run.model_path.read_bytes()
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    refused = r"model.pt: .*tensor\(s\) became NaN.*classifier.weight.*nothing was saved; lower --set lr"
    with pytest.raises(NonFiniteLossError, match=refused):
        save_model(model, run, {"backbone": "resnet20"})
    assert run.model_path.read_bytes() == before


@pytest.mark.slow
def test_run_method_resumes_into_the_same_out_dir(tmp_path, monkeypatch):
    """The benchmark's entry: killed mid-run and called again with the same out_dir, it ends as if never
    stopped (same selected weights and test metrics)."""
    from common.backbones import build_backbone
    from common.data import load_dataset
    from common.method import Budget
    from picnn import run_method

    data = load_dataset("digits")
    data.train, data.val, data.test = data.train.subset(range(96)), data.val.subset(range(32)), data.test.subset(
        range(40))
    settings = {"batch_size": 16, "eval_draws": 1, "mis_samples": 40, "checkpoint_every": 2}

    def run(out):
        torch.manual_seed(5)  # the same start weights for both runs
        return run_method(build_backbone("resnet20", data.num_classes), data, Budget(epochs=1), out,
                          device="cpu", seed=3, settings=settings)

    reference = run(tmp_path / "reference")
    with monkeypatch.context() as patch:
        patch.setattr(TrainLoop, "after_step", lambda self, step: _raise(step == 3))
        with pytest.raises(Killed):
            run(tmp_path / "killed")
    resumed = run(tmp_path / "killed")
    ref, got = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    timing = ("train_seconds",)
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == {
        k: v for k, v in reference.metrics.items() if k not in timing}


def _raise(kill: bool) -> None:
    if kill:
        raise Killed
