"""The leaderboard's figures: coinciding methods stay distinguishable, explanation rows say which explainer
they show and what each model predicted, and a degenerate panel says why it is degenerate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmark.figures import (
    _row_label,
    explanations_figure,
    faithfulness_figure,
    method_style,
    pareto_figure,
)
from benchmark.jobs import Context, Job
from benchmark.presets import get_preset


def _curves() -> pd.DataFrame:
    rows = [("baseline", np.nan, 70.0, 40e6), ("drib", 0.5, 60.0, 20e6), ("isp", 0.5, 60.0, 20e6),
            ("drib", 0.3, 65.0, 28e6), ("isp", 0.3, 64.0, 28e6)]
    return pd.DataFrame([{"method": m, "target": t, "top1_mean": a, "top1_std": 0.5, "mean_macs_mean": c,
                          "mean_macs_std": 0.0, "seeds_finished": 1, "own_insertion_lift_mean": 0.1,
                          "own_insertion_lift_std": np.nan} for m, t, a, c in rows])


def test_methods_at_the_same_point_are_labelled_and_styled_apart(tmp_path: Path) -> None:
    notes = pareto_figure(_curves(), tmp_path / "pareto.png", dense=(41e6, 71.0))
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    assert notes == ["drib = isp at the same point (MACs (M) 20, top-1 60)"]
    styles = [method_style(i, 3) for i in range(3)]
    for key in ("color", "marker", "markersize"):
        assert len({str(s[key]) for s in styles}) == 3, key  # every method differs in all three
    assert styles[0]["markersize"] > styles[-1]["markersize"] and styles[0]["zorder"] < styles[-1]["zorder"]
    assert faithfulness_figure(_curves(), tmp_path / "faith.png")[0].startswith("drib = isp")


def test_an_empty_pareto_figure_says_why(tmp_path: Path) -> None:
    empty = _curves().iloc[0:0]
    assert pareto_figure(empty, tmp_path / "p.png") == ["no finished runs yet"]
    nan = _curves().assign(top1_mean=np.nan)
    assert "no finished run has finite top-1 and MACs" in pareto_figure(nan, tmp_path / "p.png")


def _write_run(ctx: Context, job: Job, maps: torch.Tensor, explainer: str, preds: list[int] | None) -> None:
    run = ctx.run_dir(job)
    run.mkdir(parents=True)
    expl = {"indices": torch.arange(3), "images": torch.zeros(3, 3, 8, 8, dtype=torch.uint8),
            "labels": torch.tensor([0, 1, 2]), "maps": maps}
    if preds is not None:
        expl["preds"] = torch.tensor(preds)
    torch.save(expl, run / "explanations.pt")
    (run / "metrics.json").write_text(json.dumps({"status": "finished", "top1": 50.0, "own_explainer": explainer,
                                                  "target_mac_reduction": job.target}))


def test_explanation_rows_name_their_explainer_and_flag_constant_maps(tmp_path: Path) -> None:
    ctx = Context(get_preset("smoke"), tmp_path / "smoke")
    varied = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    constant = varied.clone()
    constant[1] = 0.0
    jobs = [Job("baseline", 0), Job("drib", 0, 0.5)]
    _write_run(ctx, jobs[0], varied, "gradcam", preds=[0, 2, 2])
    _write_run(ctx, jobs[1], constant, "method", preds=[0, 1, 2])
    out = tmp_path / "explanations.png"
    notes = explanations_figure(ctx, jobs, ["baseline", "drib"], out)
    assert out.stat().st_size > 5000
    assert notes == ["drib: the map of image 1 is constant (0); it ranks no pixel above another, so it explains "
                     "nothing"]
    assert "Grad-CAM" in _row_label("baseline", {"own_explainer": "gradcam"})
    assert _row_label("drib", {"own_explainer": "method", "target_mac_reduction": 0.5}) == "drib @50%\nits own map"


def test_runs_without_predictions_say_so(tmp_path: Path) -> None:
    ctx = Context(get_preset("smoke"), tmp_path / "smoke")
    _write_run(ctx, Job("baseline", 0), torch.rand(3, 8, 8), "gradcam", preds=None)
    notes = explanations_figure(ctx, [Job("baseline", 0)], ["baseline"], tmp_path / "e.png")
    assert any("recorded no predictions" in n for n in notes)
    assert explanations_figure(ctx, [], ["baseline"], tmp_path / "none.png") == ["no finished runs yet"]
