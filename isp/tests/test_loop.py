"""ISP on the shared resumable loop (common.loop): a run killed mid-stage and resumed ends with the weights of
an uninterrupted one, bit for bit; diverging weights are never saved (exit 2, the setting to lower); a run
directory written under another config is refused with the keys that differ."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import load_dataset
from common.loop import CHECKPOINT_FORMAT, TrainLoop
from common.method import Budget
from isp.__main__ import main
from isp.config import IspSettings
from isp.train import STAGES, Pipeline, load_backbone

# Every stage a few steps long with a checkpoint every 2 steps (checkpoint_every), so that a kill can land
# mid-stage after a checkpoint; the selector validates every 2 steps, so its best-decoder choice is resumed too.
SETTINGS = {"predictor_epochs": 1, "selector_epochs": 1, "gate_epochs": 1, "finetune_epochs": 1,
            "predictor_batch": 8, "selector_batch": 8, "gate_batch": 16, "finetune_batch": 16,
            "subset_fraction": 0.05, "selector_val_images": 16, "selector_val_every": 2, "gate_lr": 1.5,
            "target_mac_reduction": 0.4, "finetune_lr": 0.01, "checkpoint_every": 2, "precision": "fp32"}
MAX_BATCHES = 4
TRAINED = ("classifier.pt", "predictor.pt", "selector.pt", "targets.pt", "gates.pt", "slim.pt")


class Killed(RuntimeError):
    """Stands for a SIGKILL after a step, before its checkpoint."""


def _train(out: Path, start, data) -> Pipeline:
    """The training stages of the pipeline (evaluation left out: it trains nothing)."""
    pipeline = Pipeline(out, start, data, Budget(1, max_batches=MAX_BATCHES), IspSettings.from_dict(SETTINGS),
                        torch.device("cpu"), seed=0)
    for stage in STAGES[:-1]:
        pipeline.run(stage)
    return pipeline


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    data = load_dataset("digits")
    torch.manual_seed(0)
    start = build_backbone("resnet20", data.num_classes)
    out = tmp_path_factory.mktemp("isp_reference")
    _train(out, start, data)
    return out, start, data


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_backbone(path).state_dict()


def test_killed_mid_stage_and_resumed_ends_bit_identical(reference, tmp_path, monkeypatch):
    ref, start, data = reference
    # killed twice: in the selector (after its step-2 checkpoint, which holds the validation history and best
    # decoder so far) and in the fine-tuning (after its step-2 checkpoint)
    kills = {("selector", 3), ("finetune", 3)}
    seen: list[tuple[str, int, bool]] = []

    def after_step(self: TrainLoop, step: int) -> None:
        seen.append((self.stage, step, self.resumed))
        if (self.stage, step) in kills:
            kills.discard((self.stage, step))
            raise Killed

    monkeypatch.setattr(TrainLoop, "after_step", after_step)
    out = tmp_path / "run"
    for _ in range(2):
        with pytest.raises(Killed):
            _train(out, start, data)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 2  # the kill is mid-stage, after a save
    _train(out, start, data)
    assert not kills
    # each resumed stage replays step 3 from its step-2 checkpoint
    assert ("selector", 3, True) in seen and ("finetune", 3, True) in seen

    for name in ("predictor.pt", "slim.pt", "model.pt"):
        resumed = _state(out / name)
        for key, value in _state(ref / name).items():
            assert torch.equal(value, resumed[key]), (name, key)
    for name in ("selector.pt", "gates.pt", "targets.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (ref, out))
        tensors = a["state_dict"].items() if "state_dict" in a else [(k, v) for k, v in a.items()
                                                                    if isinstance(v, torch.Tensor)]
        for key, value in tensors:
            other = b["state_dict"][key] if "state_dict" in b else b[key]
            assert torch.equal(value, other), (name, key)
    # the validation-chosen decoder: the same choice from the same history
    chosen = [json.loads((d / "selector_selection.json").read_text()) for d in (ref, out)]
    assert chosen[0] == chosen[1] and [h["step"] for h in chosen[0]["val_history"]] == [0, 2, 4]


def _cli(out: Path, *extra: str) -> int:
    sets = [arg for key, value in SETTINGS.items() if key != "finetune_lr" for arg in ("--set", f"{key}={value}")]
    return main(["train", "--dataset", "digits", "--from-scratch", "--out", str(out), "--device", "cpu",
                 "--threads", "1", "--max-batches", str(MAX_BATCHES), *sets, *extra])


def test_diverging_fine_tuning_exits_2_and_saves_no_model(reference, tmp_path, capsys):
    ref, *_ = reference
    out = tmp_path / "run"
    out.mkdir()
    # the stages before fine-tuning do not depend on its learning rate: reuse the reference's artefacts
    for name in TRAINED:
        shutil.copy(ref / name, out / name)
    before = {name: (out / name).read_bytes() for name in TRAINED}
    for _ in range(2):  # and again: the failed stage starts over and fails the same way
        assert _cli(out, "--set", "finetune_lr=1e6") == 2
        err = capsys.readouterr().err
        # the loss (checked every step) or the weights (checked before every save), whichever breaks first
        assert re.search(r"isp finetune step \d+: .*(NaN or infinite|the loss became).*nothing was saved.*"
                         r"lower --set finetune_lr \(it is 1e\+06\)", err), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
        assert {name: (out / name).read_bytes() for name in TRAINED} == before
        if (out / "checkpoint.pt").exists():  # only finite checkpoints are ever written
            ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
            assert all(torch.isfinite(v).all() for v in ckpt["state"]["model"].values() if v.is_floating_point())


def test_train_into_a_run_of_another_config_is_refused_with_the_keys_that_differ(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, "--stage", "predictor") == 0
    config, predictor = (out / "config.json").read_bytes(), (out / "predictor.pt").read_bytes()
    assert _cli(out, "--stage", "predictor", "--set", "predictor_lr=0.001", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "settings.predictor_lr: 0.0001 -> 0.001" in err and "budget.epochs: 1.0 -> 2.0" in err
    assert "new --out" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.json").read_bytes() == config and (out / "predictor.pt").read_bytes() == predictor
    # the same config resumes; a time budget is not part of the identity (a larger one continues a stage)
    assert _cli(out, "--stage", "predictor", "--budget-seconds", "600") == 0
    assert json.loads((out / "config.json").read_text())["seconds"] == 600
    assert (out / "predictor.pt").read_bytes() == predictor  # finished stage: skipped, not retrained
