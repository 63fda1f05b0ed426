"""drib seeds: paired differences over seeds read from metrics.json, on planted figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drib.__main__ import main
from drib.seeds import paired, render_markdown, seeds_table


def _metrics(top1: float, twin: float, macs: float = 20e6, twin_macs: float = 20.5e6) -> dict:
    return {"top1": top1, "macs": macs, "mac_reduction": 0.5,
            "static_twin": {"top1": twin, "macs_without_heads": twin_macs, "mac_reduction_without_heads": 0.49},
            "dynamism": {"max_top_row_share": 0.9, "min_rows_over_5pct": 1, "mean_usage_perplexity": 1.5,
                         "mask_difference": 0.05, "dynamic_filter_share": 0.2, "probe_over_shuffled": 12.0},
            "credibility_own": 0.7, "credibility_other": None, "credibility_other_differs_share": 0.0}


def _write(root: Path, name: str, metrics: dict) -> Path:
    run = root / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_a_planted_gap_beyond_two_standard_errors_is_called_and_noise_is_not():
    assert paired([80.0, 81.0, 79.5], [85.0, 85.5, 84.8])["verdict"] == "b beats a"
    assert paired([80.0, 82.0, 79.0], [80.5, 80.0, 80.2])["verdict"] == "no measured difference"
    result = paired([3.0, 5.0], [1.0, 2.0])
    assert result["differences"] == [2.0, 3.0] and result["mean_difference"] == 2.5
    assert result["se"] == pytest.approx(0.5)


def test_seeds_table_pairs_each_dynamic_run_with_its_twin_and_static_run(tmp_path):
    dynamic = [_write(tmp_path, f"d{i}", _metrics(79.0 + i, 80.0 + i)) for i in range(3)]
    static = [_write(tmp_path, f"s{i}", {"top1": 84.0 + i, "macs": 19.9e6, "mac_reduction": 0.51}) for i in range(3)]
    table = seeds_table(dynamic, static)
    assert table["drib_minus_twin"]["top1"]["differences"] == [-1.0, -1.0, -1.0]
    assert table["drib_minus_static"]["top1"]["mean_difference"] == pytest.approx(-5.0)
    assert table["drib_minus_static"]["top1"]["verdict"] == "b beats a"
    assert table["mean"]["twin_top1"] == pytest.approx(81.0)
    assert table["mean"]["credibility_own"] == pytest.approx(0.7)
    assert "| credibility other (a differing selection) | - | - | - | - |" in render_markdown(table)


def test_cli_writes_the_table_and_names_a_run_without_evaluate(tmp_path, capsys):
    dynamic = [_write(tmp_path, f"d{i}", _metrics(79.0 + i, 80.0 + i)) for i in range(2)]
    runs = [arg for d in dynamic for arg in ("--run", str(d))]
    assert main(["seeds", *runs, "--out", str(tmp_path / "out")]) == 0
    assert "static twin (a) top-1" in (tmp_path / "out" / "seeds.md").read_text()
    assert json.loads((tmp_path / "out" / "seeds.json").read_text())["per_seed"][1]["top1"] == 80.0
    (tmp_path / "bare").mkdir()
    assert main(["seeds", "--run", str(dynamic[0]), "--run", str(tmp_path / "bare")]) == 2
    assert "drib evaluate" in capsys.readouterr().err
