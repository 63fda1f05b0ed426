"""Aggregate finished runs into the leaderboard: mean ± std over seeds, one row per method.

leaderboard.csv / leaderboard.json hold ``<column>_mean`` and ``<column>_std`` (sample std, ddof=1; NaN
with one seed), ``seeds_finished``, ``seeds_failed``, ``status`` and ``error``; runs.csv holds every
(method, seed) row. leaderboard.md shows the same numbers formatted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from common.run import CheckpointError, read_json

from .jobs import Context, Job, read_metrics
from .metrics import COLUMNS

# column -> (markdown header, scale, decimals)
DISPLAY: dict[str, tuple[str, float, int]] = {
    "top1": ("top-1 %", 1.0, 2),
    "delta_top1": ("Δ top-1", 1.0, 2),
    "dense_macs": ("dense MACs (M)", 1e-6, 2),
    "mean_macs": ("mean MACs (M)", 1e-6, 2),
    "mac_reduction_pct": ("MAC red. %", 1.0, 1),
    "params": ("params (K)", 1e-3, 1),
    "latency_b1_ms": ("CPU ms b1", 1.0, 2),
    "latency_b128_ms": ("CPU ms b128", 1.0, 1),
    "speedup_b1": ("speedup b1", 1.0, 2),
    "speedup_b128": ("speedup b128", 1.0, 2),
    "own_deletion_auc": ("own del. AUC ↓", 1.0, 3),
    "own_insertion_auc": ("own ins. AUC ↑", 1.0, 3),
    "gradcam_deletion_auc": ("Grad-CAM del. AUC ↓", 1.0, 3),
    "gradcam_insertion_auc": ("Grad-CAM ins. AUC ↑", 1.0, 3),
    "mis": ("MIS", 1.0, 4),
    "dynamic_filter_share": ("dyn. filter share", 1.0, 3),
    "train_seconds": ("train s", 1.0, 0),
}


def collect_runs(ctx: Context, jobs: Sequence[Job]) -> pd.DataFrame:
    """One row per job: its metrics.json, its error.json, or status "pending"."""
    rows: list[dict[str, Any]] = []
    for job in jobs:
        path = ctx.run_dir(job)
        try:  # a corrupt metrics.json or error.json is that job's failed row, never a blocked leaderboard
            if (path / "metrics.json").is_file():
                rows.append(read_metrics(ctx, job))
                continue
            if (path / "error.json").is_file():
                failure = read_json(path / "error.json")
                rows.append({"method": job.method, "seed": job.seed, "status": "failed",
                             "error": str(failure.get("error", "failed"))})
                continue
        except (CheckpointError, AttributeError) as exc:
            rows.append({"method": job.method, "seed": job.seed, "status": "failed", "error": str(exc)})
            continue
        rows.append({"method": job.method, "seed": job.seed, "status": "pending"})
    runs = pd.DataFrame(rows)
    for column in (*COLUMNS, "error"):
        if column not in runs:
            runs[column] = np.nan
    return _with_delta(runs)


def _with_delta(runs: pd.DataFrame) -> pd.DataFrame:
    """Δ top-1 against the baseline run of the same seed (else the baseline's mean over seeds)."""
    done = runs["status"] == "finished"
    base = runs[done & (runs["method"] == "baseline")].set_index("seed")["top1"]
    if base.empty:
        runs["delta_top1"] = np.nan
        return runs
    reference = runs["seed"].map(base).fillna(base.mean())
    runs["delta_top1"] = np.where(done, runs["top1"] - reference, np.nan)
    return runs


def aggregate(runs: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """One row per method (in ``methods`` order) with mean and std of every numeric column over seeds."""
    extras = sorted(c for c in runs.columns if c.startswith("method.") and pd.api.types.is_numeric_dtype(runs[c]))
    rows = []
    for method in methods:
        mine = runs[runs["method"] == method]
        done = mine[mine["status"] == "finished"]
        failed = mine[mine["status"] == "failed"]
        row: dict[str, Any] = {"method": method, "seeds_finished": len(done), "seeds_failed": len(failed),
                               "seeds_total": len(mine)}
        if len(done) == len(mine) and len(mine):
            row["status"] = "ok"
        elif len(done):
            row["status"] = "partial"
        else:
            row["status"] = "failed" if len(failed) else "pending"
        row["error"] = "; ".join(sorted(set(failed["error"].astype(str)))) if len(failed) else ""
        for column in (*COLUMNS, *extras):
            values = pd.to_numeric(done[column], errors="coerce") if column in done else pd.Series(dtype=float)
            row[f"{column}_mean"] = values.mean() if len(values) else np.nan
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float, scale: float, decimals: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{decimals}f}"
    return text if std is None or not math.isfinite(std) else f"{text} ± {std * scale:.{decimals}f}"


def markdown_table(board: pd.DataFrame) -> str:
    headers = ["method", "seeds", *(DISPLAY[c][0] for c in COLUMNS), "error"]
    body = []
    for _, row in board.iterrows():
        seeds = f"{row['seeds_finished']}/{row['seeds_total']}"
        if row["status"] != "ok":
            seeds += f" ({row['status']})"
        cells = [_cell(row[f"{c}_mean"], row[f"{c}_std"], *DISPLAY[c][1:]) for c in COLUMNS]
        error = str(row["error"])
        body.append([row["method"], seeds, *cells, error[:160] + ("…" if len(error) > 160 else "")])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _method_metrics_section(board: pd.DataFrame) -> str:
    lines = []
    for _, row in board.iterrows():
        items = [f"{c[len('method.'):-len('_mean')]} = {row[c]:.4g}" for c in board.columns
                 if c.startswith("method.") and c.endswith("_mean") and pd.notna(row[c])]
        if items:
            lines.append(f"- **{row['method']}**: " + ", ".join(items))
    return "\n".join(lines)


def write_leaderboard(ctx: Context, jobs: Sequence[Job], methods: Sequence[str]) -> dict[str, Path]:
    """Write leaderboard.{md,csv,json}, runs.csv, pareto.png and explanations.png under the preset folder."""
    from .figures import explanations_figure, pareto_figure

    out = ctx.results_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(ctx, jobs)
    board = aggregate(runs, methods)
    preset = ctx.preset
    budget = preset.budget()
    header = (f"# Leaderboard: preset `{preset.name}`\n\n"
              f"{preset.dataset}, {preset.backbone}, start: {preset.start.kind}"
              f"{' ' + preset.start.file if preset.start.file else ''}; budget {budget.epochs} epochs"
              f"{f', max {budget.max_batches} batches/epoch' if budget.max_batches else ''}"
              f"{f', {budget.seconds} s' if budget.seconds else ''}; batch {preset.batch_size}; "
              f"seeds {', '.join(map(str, preset.seeds))} (mean ± sample std over finished seeds).\n\n")
    extras = _method_metrics_section(board)
    text = header + markdown_table(board) + "\n"
    if extras:
        text += "\nMethod-specific metrics (means over seeds):\n\n" + extras + "\n"
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "json": out / "leaderboard.json",
             "runs": out / "runs.csv", "pareto": out / "pareto.png", "explanations": out / "explanations.png"}
    _atomic_text(paths["md"], text)
    _atomic_text(paths["csv"], board.to_csv(index=False))
    _atomic_text(paths["json"], board.to_json(orient="records", indent=2) + "\n")  # NaN -> null
    _atomic_text(paths["runs"], runs.to_csv(index=False))
    pareto_figure(board, paths["pareto"])
    explanations_figure(ctx, jobs, methods, paths["explanations"])
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
