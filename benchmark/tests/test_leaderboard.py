"""Aggregation over seeds, Δ against the baseline of the same seed, presets and CLI errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.leaderboard import _with_delta, aggregate, markdown_table
from benchmark.metrics import COLUMNS
from benchmark.presets import get_preset


def _runs() -> pd.DataFrame:
    rows = [
        {"method": "baseline", "seed": 0, "status": "finished", "top1": 90.0},
        {"method": "baseline", "seed": 1, "status": "finished", "top1": 92.0},
        {"method": "m", "seed": 0, "status": "finished", "top1": 89.0},
        {"method": "m", "seed": 1, "status": "finished", "top1": 93.0},
        {"method": "m", "seed": 2, "status": "failed", "error": "RuntimeError: x"},
    ]
    runs = pd.DataFrame(rows)
    for column in (*COLUMNS, "error"):
        if column not in runs:
            runs[column] = np.nan
    return _with_delta(runs)


def test_delta_pairs_seeds_and_std_is_the_sample_std() -> None:
    runs = _runs()
    m = runs[runs["method"] == "m"].set_index("seed")
    assert m.loc[0, "delta_top1"] == pytest.approx(-1.0)  # 89 - 90 (seed 0's baseline)
    assert m.loc[1, "delta_top1"] == pytest.approx(1.0)  # 93 - 92 (seed 1's baseline)
    assert math.isnan(m.loc[2, "delta_top1"])
    board = aggregate(runs, ["baseline", "m"]).set_index("method")
    assert board.loc["m", "top1_mean"] == pytest.approx(91.0)
    assert board.loc["m", "top1_std"] == pytest.approx(np.std([89.0, 93.0], ddof=1))
    assert board.loc["m", "status"] == "partial"
    assert board.loc["m", "seeds_finished"] == 2 and board.loc["m", "seeds_failed"] == 1
    assert "RuntimeError: x" in board.loc["m", "error"]
    table = markdown_table(board.reset_index())
    assert "91.00 ± 2.83" in table and "2/3 (partial)" in table


def test_batch_size_reaches_every_method_under_its_own_key() -> None:
    preset = get_preset("cifar10-cpu", batch_size=96)
    assert preset.method_settings("drib")["train"]["batch_size"] == 96
    assert preset.method_settings("picnn")["batch_size"] == 96
    isp = preset.method_settings("isp")
    assert isp["predictor_batch"] == isp["gate_batch"] == isp["finetune_batch"] == 96
    assert preset.budget() == get_preset("cifar10-cpu").budget()  # one Budget for all methods
    assert get_preset("smoke", seconds=5.0).budget().seconds == 5.0


@pytest.mark.slow
def test_cli_reports_missing_weights_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["--preset", "cifar10-cpu", "--out", str(tmp_path), "--weights-dir", str(tmp_path / "nowhere"),
                 "--methods", "baseline"])
    assert code == 2
    assert "--weights-dir" in capsys.readouterr().err


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("imagenet-on-a-toaster")
