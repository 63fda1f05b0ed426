"""MAC targets: compressing rows run once per target with the target in their settings, the others once;
the leaderboard has one table per target and flags a row whose achieved reduction misses its target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmark.leaderboard import leaderboard_frame, target_board, target_check
from benchmark.metrics import COLUMNS
from benchmark.presets import COMPRESSING, get_preset
from benchmark.runner import plan_jobs


def test_compressing_rows_run_once_per_target_and_get_it_in_their_settings() -> None:
    preset = get_preset("smoke", seeds=(0, 1), targets=(0.3, 0.5))
    jobs = plan_jobs(preset)
    for method in preset.methods:
        mine = [j for j in jobs if j.method == method]
        if method in COMPRESSING:
            assert sorted({j.target for j in mine}) == [0.3, 0.5] and len(mine) == 4
            assert preset.method_settings(method, 0.3)["target_mac_reduction"] == 0.3
        else:
            assert {j.target for j in mine} == {None} and len(mine) == 2
            assert "target_mac_reduction" not in preset.method_settings(method)
            with pytest.raises(ValueError, match="does not compress"):
                preset.method_settings(method, 0.5)
    names = [j.name for j in jobs]
    assert len(set(names)) == len(names) and "l1-prune-t30-seed1" in names and "baseline-seed0" in names


@pytest.mark.parametrize("targets", [(0.0,), (1.0,), (-0.2,)])
def test_a_target_outside_zero_one_is_refused(targets: tuple) -> None:
    with pytest.raises(ValueError, match="targets"):
        get_preset("smoke", targets=targets)


def test_target_check_flags_a_miss_beyond_three_points() -> None:
    assert target_check(0.5, 48.0) == "50 ✓"
    assert target_check(0.5, 53.0) == "50 ✓"
    assert target_check(0.5, 46.9) == "50 ✗ miss"
    assert target_check(None, 10.0) == "–"


def _runs() -> pd.DataFrame:
    rows = [{"method": "baseline", "seed": 0, "target": np.nan, "status": "finished", "top1": 91.0,
             "mac_reduction_pct": 0.0, "mean_macs": 40e6},
            {"method": "l1-prune", "seed": 0, "target": 0.3, "status": "finished", "top1": 90.0,
             "mac_reduction_pct": 30.2, "mean_macs": 28e6},
            {"method": "l1-prune", "seed": 0, "target": 0.5, "status": "finished", "top1": 88.0,
             "mac_reduction_pct": 41.0, "mean_macs": 24e6}]
    runs = pd.DataFrame(rows)
    for column in (*COLUMNS, "error"):
        if column not in runs:
            runs[column] = np.nan
    return runs


def test_one_board_per_target_keeps_the_uncompressed_rows_and_flags_misses() -> None:
    runs = _runs()
    at30 = target_board(runs, ["baseline", "l1-prune"], 0.3).set_index("method")
    at50 = target_board(runs, ["baseline", "l1-prune"], 0.5).set_index("method")
    assert at30.loc["baseline", "top1_mean"] == at50.loc["baseline", "top1_mean"] == 91.0
    assert at30.loc["l1-prune", "top1_mean"] == 90.0 and at50.loc["l1-prune", "top1_mean"] == 88.0
    assert at30.loc["l1-prune", "on_target"] == "30 ✓" and at50.loc["l1-prune", "on_target"] == "50 ✗ miss"
    assert "control: random map" in at30.index  # the controls explain the baseline in every table
    frame = leaderboard_frame(runs, ["baseline", "l1-prune"], [0.3, 0.5])
    assert sorted(frame[frame["method"] == "l1-prune"]["top1_mean"]) == [88.0, 90.0]
    assert len(frame[frame["method"] == "baseline"]) == 1  # run once, listed once
    assert frame[frame["method"] == "baseline"]["target"].isna().all()


@pytest.mark.slow
def test_the_gpu_preset_runs_its_three_targets_on_tiny_data(tmp_path) -> None:
    """The ``cifar10`` preset (ResNet-56, targets 30/50/70%, meant for a GPU) as written, shrunk to the
    embedded digits, one batch and a random ResNet-56 start: every target's row finishes on target."""
    import json
    from dataclasses import replace

    import torch

    from benchmark.presets import MetricSpec
    from benchmark.runner import run_preset
    from common.backbones import build_backbone

    weights = tmp_path / "weights"
    weights.mkdir()
    preset = get_preset("cifar10")
    torch.save(build_backbone(preset.backbone, 10).state_dict(), weights / preset.start.file)
    tiny = replace(preset, dataset="digits", epochs=1, max_batches=1, seeds=(0,), methods=("baseline", "l1-prune"),
                   metrics=MetricSpec(explain_images=4, mis_images=0, figure_images=2, game_points=5,
                                      road_fractions=(0.5,), sanity_images=2, sanity_stages=1, latency_repeats=1,
                                      latency_rounds=1, latency_batches=(1,)))
    paths = run_preset(tiny, tmp_path / "results", weights_dir=str(weights), device="cpu")
    records = pd.DataFrame(json.loads(paths["json"].read_text()))
    pruned = records[records["method"] == "l1-prune"].sort_values("target")
    assert list(pruned["target"]) == [0.3, 0.5, 0.7]
    assert list(pruned["on_target"]) == ["30 ✓", "50 ✓", "70 ✓"]
    assert all(f"## Target: {t}% fewer MACs" in paths["md"].read_text() for t in (30, 50, 70))
