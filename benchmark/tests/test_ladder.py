"""The budget ladder: every rung is its preset at that budget, resumable, and the ladder's table and figure
show top-1 against budget for every row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.ladder import LADDERS, Ladder, run_ladder
from benchmark.presets import get_preset
from benchmark.start import start_path

TINY = Ladder(name="smoke-ladder", base="smoke", budgets=(1.0, 2.0), methods=("baseline", "l1-prune"),
              description="smoke at 1 and 2 epochs")


def test_the_cifar_ladder_is_the_main_job_at_three_budgets() -> None:
    ladder = LADDERS["cifar10-cpu-ladder"]
    assert ladder.budgets == (1.0, 3.0, 9.0)
    base = get_preset(ladder.base)
    for epochs in ladder.budgets:
        rung = ladder.rung(epochs)
        assert rung.epochs == epochs and rung.targets == base.targets == (0.5,) and rung.seeds == (0,)
        assert rung.start == base.start and rung.recipe == base.recipe
        assert set(ladder.methods) == {"baseline", "drib", "picnn", "decoupling", "isp", "l1-prune", "random-prune"}


def test_a_ladder_refuses_budget_flags() -> None:
    assert main(["--preset", "cifar10-cpu-ladder", "--epochs", "2"]) == 2


@pytest.mark.slow
def test_ladder_runs_every_rung_then_resumes_without_training(tmp_path: Path, smoke_start: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = TINY.rung(TINY.budgets[0])
    cached = start_path(first, tmp_path / TINY.name / "e1")
    cached.parent.mkdir(parents=True)
    shutil.copy(smoke_start, cached)  # the session's smoke start: the ladder copies it to the other rung
    paths = run_ladder(TINY, tmp_path, device="cpu", workers=1)
    frame = pd.read_csv(paths["csv"])
    assert set(frame["status"]) == {"finished"}
    assert sorted(frame["epochs"].unique()) == [1.0, 2.0]
    assert set(frame["method"]) == {"baseline", "l1-prune"}  # one MAC target: rows keep their names
    for epochs in (1, 2):
        rung = tmp_path / TINY.name / f"e{epochs}"
        assert (rung / "leaderboard.md").is_file()
        config = json.loads((rung / "runs" / "baseline-seed0" / "config.json").read_text())
        assert config["budget"]["epochs"] == float(epochs)
    text = paths["md"].read_text()
    assert "top-1 at 1 ep. (rank)" in text and "| baseline |" in text
    assert paths["figure"].stat().st_size > 0
    # finished rungs are read back, never trained again
    monkeypatch.setattr("benchmark.ladder.run_job", lambda *a, **k: pytest.fail("a finished job ran again"))
    again = run_ladder(TINY, tmp_path, device="cpu", workers=1)
    assert pd.read_csv(again["csv"])["top1"].tolist() == frame["top1"].tolist()
