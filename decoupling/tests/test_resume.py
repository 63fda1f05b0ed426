"""Training through the shared loop (common.loop) on the embedded digits data: a kill in the training stage
and then in the post-processing (gate offset, BN statistics) resumes to the uninterrupted run's weights bit
for bit; a diverging lr exits 2 naming it and writes no weights."""

import pytest
import torch

from common.backbones import build_backbone
from common.loop import TrainLoop, non_finite_tensors
from decoupling import train as train_module
from decoupling.__main__ import main
from decoupling.model import DecoupledNet, save_decoupled


class Killed(BaseException):
    """Stands for a SIGKILL: not an Exception, so the CLI's error guard lets it through."""


# 2 epochs of 3 batches = 6 steps: checkpoints at 2, 3 (epoch end), 4 and 6; steps 5-6 fine-tune under hard
# gates; after the loop the gate offset is bisected, BN re-estimated, the offset bisected again.
TRAIN = ["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "2", "--max-batches", "3",
         "--device", "cpu", "--threads", "1", "--from-scratch", "--precision", "fp32",
         "--set", "batch_size=32", "--set", "checkpoint_every=2", "--set", "finetune_fraction=0.34",
         "--set", "target_mac_reduction=0.3", "--set", "mac_calibration_images=16",
         "--set", "bn_recalibration_batches=2", "--set", "calibration_images=16"]


def _raise_on_call(monkeypatch, owner, name: str, n: int) -> None:
    """Make ``owner.name`` raise :class:`Killed` on its ``n``-th call (it runs normally before)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_kill_in_training_then_in_post_processing_resumes_bit_for_bit(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # killed after step 5, before its checkpoint: the one of step 4 is there
        _raise_on_call(m, TrainLoop, "after_step", 5)
        with pytest.raises(Killed):
            main([*TRAIN, "--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4 and not (out / "model.pt").exists()
    with monkeypatch.context() as m:  # killed in the second offset bisection, after BN was re-estimated
        _raise_on_call(m, train_module, "calibrate_gate_offset", 2)
        with pytest.raises(Killed):
            main([*TRAIN, "--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6 and not (out / "model.pt").exists()
    assert main([*TRAIN, "--out", str(out)]) == 0  # redoes the post-processing from the loop's final checkpoint
    log = (out / "log.txt").read_text()
    assert "resumed at step 4 of 6" in log and "resumed at step 6 of 6" in log
    expected, resumed = _weights(reference), _weights(out)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert main([*TRAIN, "--out", str(out)]) == 0  # and once more: the post-processing is not applied twice
    assert all(torch.equal(expected[k], v) for k, v in _weights(out).items())


@pytest.mark.parametrize("good_model", [False, True], ids=["fresh", "over-a-good-model"])
def test_a_diverging_lr_exits_2_naming_it_and_writes_no_weights(tmp_path, capsys, good_model):
    out = tmp_path / "run"
    if good_model:  # a good model.pt already there must survive
        save_decoupled(DecoupledNet(build_backbone("resnet20", 10)), out / "model.pt", "resnet20", 10, 4, 1.0)
    before = (out / "model.pt").read_bytes() if good_model else None
    args = ["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "1", "--max-batches", "3",
            "--device", "cpu", "--threads", "1", "--from-scratch", "--precision", "fp32",
            "--set", "batch_size=32", "--set", "lr=1e6", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("NaN or infinite" in err[0] or "loss became" in err[0])
    assert "--set lr" in err[0]
    if good_model:
        assert (out / "model.pt").read_bytes() == before
    else:
        assert not (out / "model.pt").exists()
    for path in out.glob("*.pt"):  # whatever is left holds finite weights only
        assert non_finite_tensors(torch.load(path, weights_only=True)) == []
