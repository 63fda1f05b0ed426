"""Done-when: ``python -m benchmark --preset smoke`` writes every output, one filled row per method."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from benchmark.__main__ import main
from benchmark.metrics import COLUMNS
from benchmark.presets import METHODS


def test_smoke_preset_fills_every_column_for_all_five_methods(results_with_start: Path) -> None:
    assert main(["--preset", "smoke", "--out", str(results_with_start), "--device", "cpu"]) == 0
    out = results_with_start / "smoke"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "pareto.png", "explanations.png"):
        assert (out / name).stat().st_size > 0, name
    board = pd.DataFrame(json.loads((out / "leaderboard.json").read_text())).set_index("method")
    assert list(board.index) == list(METHODS)
    errors = {m: board.loc[m, "error"] for m in METHODS if board.loc[m, "status"] != "ok"}
    assert not errors, errors
    empty = {m: [c for c in COLUMNS if pd.isna(board.loc[m, f"{c}_mean"])] for m in METHODS}
    assert not any(empty.values()), empty
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv["method"]) == list(METHODS)
    table = (out / "leaderboard.md").read_text()
    assert all(f"| {m}" in table for m in METHODS)
