"""Done-when: ``python -m benchmark --preset smoke`` writes every output, one filled row per method (at the 50%
MAC target), the four control rows, the mechanism table and the dynamism columns of the dynamic rows. (Several
targets per preset: test_targets.py, and the GPU preset's three targets on tiny data.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmark.__main__ import main
from benchmark.leaderboard import CONTROL_ROWS, MECHANISM_FIGURES
from benchmark.metrics import COLUMNS
from benchmark.presets import COMPRESSING, CONTROL_METHODS, CONTROL_OF, METHODS


@pytest.mark.slow
def test_smoke_preset_fills_every_column_for_all_five_methods(results_with_start: Path) -> None:
    assert main(["--preset", "smoke", "--out", str(results_with_start), "--device", "cpu"]) == 0
    out = results_with_start / "smoke"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "pareto.png", "explanations.png"):
        assert (out / name).stat().st_size > 0, name
    records = pd.DataFrame(json.loads((out / "leaderboard.json").read_text()))
    rows = [*METHODS, *CONTROL_ROWS]
    assert list(records["method"]) == rows
    assert list(records[records["method"].isin(COMPRESSING)]["target"].unique()) == [0.5]
    errors = {(r.method, r.target): r.error for r in records.itertuples() if r.status != "ok"}
    assert not errors, errors
    empty = {(r["method"], r["target"]): [c for c in COLUMNS if pd.isna(r[f"{c}_mean"])]
             for _, r in records.iterrows()}
    assert not any(empty.values()), empty
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv["method"]) == list(records["method"])
    board = records.set_index("method")
    # The control rows carry the control maps' scores in the place of an own explanation.
    random_row = board.loc["control: random map"]
    assert random_row["own_insertion_auc_mean"] == random_row["random_insertion_auc_mean"]
    assert random_row["own_insertion_lift_mean"] == 0.0
    assert board.loc["control: centre map", "own_sanity_spearman_mean"] == 1.0  # blind to the weights
    # PICNN's MIS stands beside its lambda = 0 control; every other row beside the plain baseline's.
    assert board.loc["picnn", "mis_control_mean"] == board.loc["picnn-lambda0", "mis_mean"]
    assert board.loc["drib", "mis_control_mean"] == board.loc["baseline", "mis_mean"]
    table = (out / "leaderboard.md").read_text()
    assert all(f"| {m}" in table for m in METHODS)
    assert "## Target: 50% fewer MACs" in table
    # The printed table is filled too: the preset times enough calls for the latency and speedup columns.
    assert "Latency and speedup left empty" not in table
    # Every method beside its control row: figures, paired difference, SE and a verdict in words.
    assert set(CONTROL_METHODS) <= set(records["method"])
    assert table.count("### Mechanism: each method beside its own control row") == 1
    for method, figures in MECHANISM_FIGURES.items():
        row = board.loc[method]
        assert row["mechanism_control"] == CONTROL_OF[method]
        for column, _, _ in figures:
            slug = column.removeprefix("method.")
            for field in ("method", "control", "difference"):
                assert pd.notna(row[f"mechanism.{slug}.{field}"]), (method, slug, field)
            assert row[f"mechanism.{slug}.verdict"] in ("beats its control", "no measured difference",
                                                        "below its control", "no standard error: not judged")
        assert f"| {method} " in table.split("### Mechanism")[1]
    for method in ("drib", "decoupling"):  # top-1 paired over the same test images
        assert pd.notna(board.loc[method, "mechanism.top1.se"])
        assert str(board.loc[method, "mechanism.top1.pairing"]).startswith("paired over")
    # The dynamism figures of the dynamic rows, from their run metrics.
    assert "### Dynamism of the dynamic rows" in table
    for method in ("drib", "drib-static"):
        for column in ("max_top_row_share", "min_rows_over_5pct", "mask_difference"):
            assert pd.notna(board.loc[method, f"method.dynamism.{column}_mean"]), (method, column)
    assert board.loc["drib-static", "method.dynamism.max_top_row_share_mean"] == 1.0  # one row per layer
    assert pd.notna(board.loc["decoupling", "method.dynamic_filters_mean"])
