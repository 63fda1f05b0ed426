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

from common.run import CheckpointError, atomic_write_text, read_json
from common.stats import beyond_two_se, paired_difference

from .explain_metrics import COLUMNS as EXPLANATION_COLUMNS
from .explain_metrics import FAITHFULNESS, GRIDPG, SANITY
from .jobs import Context, Job, read_metrics
from .metrics import COLUMNS, unpack_correct
from .presets import COMPRESSING, CONTROL_OF, EPOCH_USE

# Reference rows: the baseline model explained by a control map, scored exactly like every method's own map.
CONTROL_ROWS = {"control: random map": "random", "control: centre map": "centre"}
INTERPRETABILITY_COLUMNS = (*EXPLANATION_COLUMNS, "mis", "mis_control", "mis_lift")
# Whose MIS a row's MIS is compared with (same seed): PICNN's own lambda = 0 run, else the plain baseline.
MIS_CONTROL = {"picnn": "picnn-lambda0"}
COST_COLUMNS = tuple(c for c in COLUMNS if c not in INTERPRETABILITY_COLUMNS)

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
    **{f"{e}_{m}": (f"{label} {what}", 1.0, 3)
       for e, label in (("own", "own"), ("gradcam", "Grad-CAM"), ("random", "random"), ("centre", "centre"))
       for m, what in (("deletion_auc", "del. ↓"), ("insertion_auc", "ins. ↑"), ("road_gap", "ROAD gap ↑"))},
    "own_deletion_lift": ("own del. lift ↑", 1.0, 3),
    "own_insertion_lift": ("own ins. lift ↑", 1.0, 3),
    "own_road_lift": ("own ROAD lift ↑", 1.0, 3),
    **{f"{e}_{m}": (f"{label} {what}", 1.0, d)
       for e, label in (("own", "own"), ("gradcam", "Grad-CAM"), ("random", "random"), ("centre", "centre"))
       for m, what, d in (("gridpg", "GridPG ↑", 3), ("gridpg_se", "GridPG SE", 3),
                          ("sanity_spearman", "sanity ρ same image", 2), ("sanity_spearman_se", "sanity ρ SE", 2),
                          ("sanity_floor", "sanity floor", 2), ("sanity_floor_se", "sanity floor SE", 2),
                          ("sanity_depends", "depends on weights", 2))},
    "gridpg_mosaics": ("GridPG mosaics", 1.0, 0),
    "gridpg_qualified": ("GridPG qualified images", 1.0, 0),
    "drift_spearman": ("drift ρ ↑", 1.0, 2),
    "drift_top10": ("drift top-10% ↑", 1.0, 2),
    "mis": ("MIS", 1.0, 4),
    "mis_control": ("MIS of control", 1.0, 4),
    "mis_lift": ("MIS lift ↑", 1.0, 4),
    "dynamic_filter_share": ("dyn. filter share", 1.0, 3),
    "train_seconds": ("train s", 1.0, 0),
}


def collect_runs(ctx: Context, jobs: Sequence[Job]) -> pd.DataFrame:
    """One row per job: its metrics.json, its error.json, or status "pending"; ``target`` is the job's MAC
    target (NaN for rows that do not compress)."""
    rows: list[dict[str, Any]] = []
    for job in jobs:
        path = ctx.run_dir(job)
        ident = {"method": job.method, "seed": job.seed}
        try:  # a corrupt metrics.json or error.json is that job's failed row, never a blocked leaderboard
            if (path / "metrics.json").is_file():
                rows.append({**read_metrics(ctx, job), "target": job.target})
                continue
            if (path / "error.json").is_file():
                failure = read_json(path / "error.json")
                rows.append({**ident, "target": job.target, "status": "failed",
                             "error": str(failure.get("error", "failed"))})
                continue
        except (CheckpointError, AttributeError) as exc:
            rows.append({**ident, "target": job.target, "status": "failed", "error": str(exc)})
            continue
        rows.append({**ident, "target": job.target, "status": "pending"})
    runs = pd.DataFrame(rows)
    for column in (*COLUMNS, "error", "target"):
        if column not in runs:
            runs[column] = np.nan
    runs["target"] = pd.to_numeric(runs["target"], errors="coerce")
    # An undefined figure is written as null (common.run.atomic_write_json): a column of numbers and nulls
    # reads back as objects; make it numeric again, with NaN for the nulls.
    for column in runs.columns:
        values = runs[column].dropna()
        if runs[column].dtype == object and len(values) < len(runs[column]) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            runs[column] = pd.to_numeric(runs[column], errors="coerce")
    return _with_mis_control(_with_delta(runs))


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


def with_control_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus, for every baseline run, one row per control map in the place of the own explanation.

    In a control row the ``own_*`` faithfulness and sanity columns hold the control map's scores on the
    baseline model and the lifts are taken against the random map again (0 for the random row itself).
    """
    base = runs[runs["method"] == "baseline"]
    extra = []
    for name, control in CONTROL_ROWS.items():
        rows = base.copy()
        rows["method"] = name
        for m in FAITHFULNESS:
            if f"{control}_{m}" in rows:
                rows[f"own_{m}"] = rows[f"{control}_{m}"]
        for m in (*GRIDPG, *SANITY):
            if f"{control}_{m}" in rows:
                rows[f"own_{m}"] = rows[f"{control}_{m}"]
        if {"random_deletion_auc", "random_insertion_auc", "random_road_gap"} <= set(rows.columns):
            rows["own_deletion_lift"] = rows["random_deletion_auc"] - rows["own_deletion_auc"]
            rows["own_insertion_lift"] = rows["own_insertion_auc"] - rows["random_insertion_auc"]
            rows["own_road_lift"] = rows["own_road_gap"] - rows["random_road_gap"]
        extra.append(rows)
    return pd.concat([runs, *extra], ignore_index=True) if extra else runs


def _with_mis_control(runs: pd.DataFrame) -> pd.DataFrame:
    """MIS of each run's control (``MIS_CONTROL``, else the baseline) of the same seed, and the lift over it."""
    done = runs["status"] == "finished"
    runs["mis_control"] = np.nan
    for method in runs["method"].unique():
        control = MIS_CONTROL.get(method, "baseline")
        ref = runs[done & (runs["method"] == control)].set_index("seed")["mis"]
        if ref.empty:
            continue
        mine = done & (runs["method"] == method)
        runs.loc[mine, "mis_control"] = runs.loc[mine, "seed"].map(ref).fillna(ref.mean())
    runs["mis_lift"] = runs["mis"] - runs["mis_control"]
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


# The figure each method's paper is about, compared with the same figure of its control row (CONTROL_OF):
# method -> [(column of runs, label, +1: higher is better / -1: lower is better)]. ISP's interpretation term
# (Eq. 10) is not among its run_method metrics; its explanation distance (the selector's RBF code of the
# pruned, fine-tuned network against the original's, on test images) and the Grad-CAM drift stand for it.
MECHANISM_FIGURES: dict[str, list[tuple[str, str, int]]] = {
    "drib": [("top1", "top-1 % at equal MACs ↑", 1)],
    "decoupling": [("top1", "top-1 % at equal MACs ↑", 1)],
    "isp": [("method.rbf_distance", "explanation distance (RBF code L2) ↓", -1),
            ("drift_spearman", "Grad-CAM drift ρ from the start ↑", 1)],
    "picnn": [("mis", "MIS ↑", 1)],
}
MECHANISM_FIELDS = ("method", "control", "difference", "se", "verdict", "pairing")


def verdict(difference: float, se: float, direction: int = 1) -> str:
    """The mechanism table's verdict on ``difference`` (method - control) and its standard error;
    ``direction`` -1 for a figure where lower is better."""
    if not math.isfinite(difference):
        return "not measured"
    if not math.isfinite(se):
        return "no standard error: not judged"
    return {1: "beats its control", -1: "below its control", 0: "no measured difference"}[
        beyond_two_se(direction * difference, se)]


def _top1_difference(mine: pd.Series, theirs: pd.Series) -> tuple[float, float, str]:
    """(top-1 difference in points, its SE, how): paired over the same test images when both runs kept their
    per-image correctness, else a binomial SE of the difference of two independent proportions."""
    n = mine.get("top1_images")
    if (isinstance(mine.get("top1_correct"), str) and isinstance(theirs.get("top1_correct"), str)
            and pd.notna(n) and n == theirs.get("top1_images")):
        a = unpack_correct(mine["top1_correct"], int(n)).double()
        b = unpack_correct(theirs["top1_correct"], int(n)).double()
        difference, se, _ = paired_difference(100.0 * a, 100.0 * b)
        return difference, se, f"paired over {int(n)} test images"
    p, q = float(mine["top1"]) / 100, float(theirs["top1"]) / 100
    n = mine.get("top1_images", np.nan)
    if not pd.notna(n):
        return 100 * (p - q), np.nan, "no per-image values or image count"
    se = 100 * math.sqrt((p * (1 - p) + q * (1 - q)) / float(n))
    return 100 * (p - q), se, f"unpaired binomial SE over {int(n)} test images"


def mechanism_table(runs: pd.DataFrame, target: float | None) -> pd.DataFrame:
    """One row per (method, figure) of ``MECHANISM_FIGURES`` whose method and control both ran: the means over
    seeds of the method's and the control's figure, the paired difference (same seed; over the same test
    images where per-image values exist) and its SE, and the verdict. One seed: the SE is the per-image one
    (NaN without per-image values); several: mean and SE of the per-seed differences."""
    done = runs[runs["status"] == "finished"]
    if target is not None:
        done = done[done["target"].isna() | np.isclose(done["target"].fillna(-1.0), target)]
    rows = []
    for method, figures in MECHANISM_FIGURES.items():
        control = CONTROL_OF[method]
        mine, theirs = done[done["method"] == method], done[done["method"] == control]
        if not len(mine) and not len(theirs):
            continue
        seeds = sorted(set(mine["seed"]) & set(theirs["seed"]))
        for column, label, direction in figures:
            pairs = []
            for seed in seeds:
                a, b = mine[mine["seed"] == seed].iloc[0], theirs[theirs["seed"] == seed].iloc[0]
                if column not in a or not (pd.notna(a[column]) and pd.notna(b[column])):
                    continue
                if column == "top1":
                    diff, se, how = _top1_difference(a, b)
                else:
                    diff, se, how = float(a[column]) - float(b[column]), np.nan, "one value per run"
                pairs.append((float(a[column]), float(b[column]), diff, se, how))
            if len(pairs) > 1:
                diffs = np.array([p[2] for p in pairs])
                diff, se = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(len(diffs)))
                how = f"paired by seed, SE over {len(pairs)} seeds"
            elif pairs:
                diff, se, how = pairs[0][2:]
            else:
                diff, se, how = np.nan, np.nan, "no finished pair of the same seed"
            macs = [float(pd.to_numeric(frame["mac_reduction_pct"], errors="coerce").mean())
                    if "mac_reduction_pct" in frame and len(frame) else np.nan for frame in (mine, theirs)]
            rows.append({"method": method, "control_row": control, "figure": column, "label": label,
                         "direction": direction, "seeds": len(pairs),
                         "method_mac_reduction_pct": macs[0], "control_mac_reduction_pct": macs[1],
                         "method_value": float(np.mean([p[0] for p in pairs])) if pairs else np.nan,
                         "control_value": float(np.mean([p[1] for p in pairs])) if pairs else np.nan,
                         "difference": diff, "se": se, "pairing": how, "verdict": verdict(diff, se, direction)})
    return pd.DataFrame(rows)


def _with_mechanism(board: pd.DataFrame, mechanism: pd.DataFrame) -> pd.DataFrame:
    """The mechanism table on the method rows of ``board``: ``mechanism_control`` and, per figure,
    ``mechanism.<figure>.<method|control|difference|se|verdict|pairing>`` (leaderboard.json / .csv)."""
    board = board.copy()
    board["mechanism_control"] = board["method"].map(CONTROL_OF)
    for _, row in mechanism.iterrows():
        mine = board["method"] == row["method"]
        slug = row["figure"].removeprefix("method.")
        for field_name, value in zip(MECHANISM_FIELDS, (row["method_value"], row["control_value"], row["difference"],
                                                        row["se"], row["verdict"], row["pairing"])):
            column = f"mechanism.{slug}.{field_name}"
            if column not in board:
                board[column] = np.nan if field_name not in ("verdict", "pairing") else None
            board.loc[mine, column] = value
    return board


def mechanism_markdown(mechanism: pd.DataFrame) -> str:
    """The mechanism table as markdown (differences: method - control)."""
    if mechanism.empty:
        return "No method ran beside its control row.\n"

    def number(value: float) -> str:
        return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else "–"

    def macs(r: pd.Series) -> str:
        a, b = r["method_mac_reduction_pct"], r["control_mac_reduction_pct"]
        return f"{a:.1f} / {b:.1f}" if math.isfinite(a) and math.isfinite(b) else "–"

    body = [[r["method"], r["control_row"], r["label"], str(r["seeds"]), macs(r), number(r["method_value"]),
             number(r["control_value"]), number(r["difference"]), number(r["se"]), r["pairing"], r["verdict"]]
            for _, r in mechanism.iterrows()]
    headers = ["method", "control row", "figure", "seeds", "MAC red. % method / control", "method", "control",
               "difference", "SE", "pairing", "verdict"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


# Dynamism of the dynamic rows (method.* columns from each method's run_method metrics): DRIB's
# drib.dynamism figures on the validation split, Decoupling's share of dynamic filters.
DYNAMIC_ROWS = ("drib", "drib-static", "decoupling", "decoupling-static")
DYNAMISM_COLUMNS: dict[str, tuple[str, int]] = {
    "dynamic_filter_share": ("dyn. filter share", 3),
    "method.dynamism.max_top_row_share": ("top-row share (max over layers) ↓", 3),
    "method.dynamism.min_rows_over_5pct": ("rows ≥ 5% (min over layers) ↑", 0),
    "method.dynamism.mean_usage_perplexity": ("usage perplexity (mean) ↑", 2),
    "method.dynamism.mask_difference": ("pair mask difference ↑", 3),
    "method.dynamism.probe_top1": ("class probe %", 1),
    "method.dynamism.probe_shuffled_top1": ("probe, shuffled labels %", 1),
    "method.dynamism.probe_over_shuffled": ("probe - shuffled (points) ↑", 1),
    "method.dynamic_filters": ("dynamic filters (raw gates)", 3),
}


def dynamism_markdown(board: pd.DataFrame) -> str:
    """The dynamic rows with their dynamism figures (mean ± std over seeds); "–": not measured by that method."""
    rows = board[board["method"].isin(DYNAMIC_ROWS)]
    if rows.empty:
        return ""
    headers = ["method", *(label for label, _ in DYNAMISM_COLUMNS.values())]
    body = [[r["method"], *(_cell(r.get(f"{c}_mean", np.nan), r.get(f"{c}_std", np.nan), 1.0, d)
                            for c, (_, d) in DYNAMISM_COLUMNS.items())] for _, r in rows.iterrows()]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


TARGET_TOLERANCE_PCT = 3.0  # a compressing row whose mean achieved MAC reduction is further off is flagged


def target_check(target: float | None, achieved_pct: float) -> str:
    """"50 ✓" when the achieved mean MAC reduction is within ``TARGET_TOLERANCE_PCT`` points of ``target``,
    "50 ✗ miss" when not; "–" for rows without a target."""
    if target is None or not math.isfinite(target):
        return "–"
    goal = 100 * target
    if not math.isfinite(achieved_pct):
        return f"{goal:.0f}"
    return f"{goal:.0f} ✓" if abs(achieved_pct - goal) <= TARGET_TOLERANCE_PCT else f"{goal:.0f} ✗ miss"


def target_board(runs: pd.DataFrame, methods: Sequence[str], target: float | None) -> pd.DataFrame:
    """The leaderboard of one MAC target: the compressing rows run at ``target`` and the rows that do not
    compress (run once, repeated in every target's table), with the control rows when the baseline ran.
    ``target`` None: a preset without targets (each method at its own setting), every run."""
    if target is None:
        mine = runs
    else:
        mine = runs[runs["target"].isna() | np.isclose(runs["target"].fillna(-1.0), target)]
    controls = list(CONTROL_ROWS) if "baseline" in methods else []  # the controls explain the baseline model
    board = aggregate(with_control_rows(mine), [*methods, *controls])
    compressing = board["method"].isin(list(COMPRESSING))
    board["target"] = np.where(compressing, np.nan if target is None else target, np.nan)
    board["on_target"] = [target_check(t, a) for t, a in zip(board["target"], board["mac_reduction_pct_mean"])]
    board["table_target"] = target
    return _with_mechanism(board, mechanism_table(runs, target))


def _cell(mean: float, std: float, scale: float, decimals: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{decimals}f}"
    return text if std is None or not math.isfinite(std) else f"{text} ± {std * scale:.{decimals}f}"


MIN_TIMED_CALLS = 10  # fewer timed calls per batch size than this (repeats x rounds) cannot carry a speed figure
TIMING_COLUMNS = tuple(c for c in COLUMNS if c.startswith(("latency_", "speedup_")))


def timing_too_short(spec: Any) -> bool:
    """Whether a preset's latency settings are too short for the latency / speedup columns to mean anything."""
    return spec.latency_repeats * spec.latency_rounds < MIN_TIMED_CALLS


def _se_note(row: pd.Series, column: str) -> str:
    """" (SE x)": the mean over seeds of a column's standard error over images, when it has one."""
    se = row.get(f"{column}_se_mean")
    if se is None or not isinstance(se, float) or not math.isfinite(se) or not math.isfinite(row[f"{column}_mean"]):
        return ""
    return f" (SE {se * DISPLAY[column][1]:.{DISPLAY[column][2]}f})"


def markdown_table(board: pd.DataFrame, columns: Sequence[str] = COLUMNS, with_target: bool = False,
                   blank: Sequence[str] = ()) -> str:
    """Columns ending in ``_se`` are shown inside their base column's cell as "(SE x)", not on their own."""
    columns = [c for c in columns if not (c.endswith("_se") and c[:-3] in columns)]
    headers = ["method", "seeds", *(["target MAC red. %"] if with_target else []), *(DISPLAY[c][0] for c in columns),
               "error"]
    body = []
    for _, row in board.iterrows():
        seeds = f"{row['seeds_finished']}/{row['seeds_total']}"
        if row["status"] != "ok":
            seeds += f" ({row['status']})"
        cells = ["–" if c in blank else _cell(row[f"{c}_mean"], row[f"{c}_std"], *DISPLAY[c][1:])
                 + _se_note(row, c) for c in columns]
        error = str(row["error"])
        target = [row.get("on_target", "–")] if with_target else []
        body.append([row["method"], seeds, *target, *cells, error[:160] + ("…" if len(error) > 160 else "")])
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _method_metrics_section(board: pd.DataFrame) -> str:
    lines = []
    for _, row in board.iterrows():
        items = [f"{c[len('method.'):-len('_mean')]} = {row[c]:.4g}" for c in board.columns
                 if c.startswith("method.") and c.endswith("_mean") and pd.notna(row[c])]
        target = row.get("target")
        at = f" (target {100 * target:.0f}%)" if isinstance(target, float) and math.isfinite(target) else ""
        if items:
            lines.append(f"- **{row['method']}**{at}: " + ", ".join(items))
    return "\n".join(lines)


def write_leaderboard(ctx: Context, jobs: Sequence[Job], methods: Sequence[str]) -> dict[str, Path]:
    """Write leaderboard.{md,csv,json} (one table per MAC target), runs.csv, pareto.png, faithfulness.png and
    explanations.png under the preset folder."""
    from .figures import explanations_figure, faithfulness_figure, pareto_figure

    out = ctx.results_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(ctx, jobs)
    preset = ctx.preset
    targets: list[float | None] = list(preset.targets) or [None]
    boards = [target_board(runs, methods, t) for t in targets]
    board = leaderboard_frame(runs, methods, targets)
    text = _header(ctx, runs)
    for target, one in zip(targets, boards):
        methods_only = one[~one["method"].isin(list(CONTROL_ROWS))]
        if target is None:
            title, note = "Each method at its own setting", "No MAC target: each row at its recipe's own sparsity.\n\n"
        else:
            title = f"Target: {100 * target:.0f}% fewer MACs than the dense start"
            note = (f"Compressing rows ran with `target_mac_reduction = {target:g}`; ✓: the achieved mean MAC"
                    f" reduction is within {TARGET_TOLERANCE_PCT:g} points of it, ✗ miss: it is not. Rows without"
                    " a target do not compress and are the same runs in every table.\n\n")
        short = timing_too_short(preset.metrics)
        footnote = (f"Latency and speedup left empty: this preset times {preset.metrics.latency_repeats} call(s) x"
                    f" {preset.metrics.latency_rounds} round(s), too few to mean anything (the raw figures are in"
                    " runs.csv); the `cifar10-cpu` preset times enough for them.\n\n") if short else ""
        text += (f"## {title}\n\n### Accuracy and cost\n\n" + note
                 + markdown_table(methods_only, COST_COLUMNS, with_target=True,
                                  blank=TIMING_COLUMNS if short else ()) + "\n\n" + footnote
                 + "### Interpretability, beside its controls\n\n"
                 + markdown_table(one, ("top1", *INTERPRETABILITY_COLUMNS)) + "\n\n"
                 + "### Mechanism: each method beside its own control row\n\n" + _MECHANISM_NOTE
                 + mechanism_markdown(mechanism_table(runs, target)) + "\n")
        dynamism = dynamism_markdown(one)
        if dynamism:
            text += "### Dynamism of the dynamic rows\n\n" + _DYNAMISM_NOTE + dynamism + "\n"
    text += _INTERPRETABILITY_NOTE
    extras = _method_metrics_section(board[~board["method"].isin(list(CONTROL_ROWS))])
    if extras:
        text += "\nMethod-specific metrics (means over seeds):\n\n" + extras + "\n"
    text += "\nWhat each row spends the shared epoch budget on:\n\n" + "\n".join(
        f"- **{m}**: {EPOCH_USE.get(m, 'see its package README')}" for m in methods) + "\n"
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "json": out / "leaderboard.json",
             "runs": out / "runs.csv", "pareto": out / "pareto.png", "faithfulness": out / "faithfulness.png",
             "explanations": out / "explanations.png"}
    _atomic_text(paths["md"], text)
    _atomic_text(paths["csv"], board.to_csv(index=False))
    _atomic_text(paths["json"], board.to_json(orient="records", indent=2) + "\n")  # NaN -> null
    _atomic_text(paths["runs"], runs.drop(columns=["top1_correct"], errors="ignore").to_csv(index=False))
    curves = board[~board["method"].isin(list(CONTROL_ROWS))]
    pareto_figure(curves, paths["pareto"], dense=_dense_point(runs))
    faithfulness_figure(curves, paths["faithfulness"])
    explanations_figure(ctx, jobs, methods, paths["explanations"])
    return paths


_MECHANISM_NOTE = (
    "Each method's paper figure beside the same figure of its control row (the method with its mechanism"
    " switched off, same budget, data, start and seed): difference = method - control, paired by seed, over the"
    " same test images where per-image values exist; SE over seeds when there are several. \"beats its control\""
    " / \"below its control\" only beyond two SE in the better / worse direction, else \"no measured"
    " difference\"; a figure with one value per run and one seed has no SE and is not judged. ISP's"
    " interpretation term (Eq. 10) is not in its run metrics: its explanation distance and the Grad-CAM drift"
    " stand for it.\n\n")
_DYNAMISM_NOTE = (
    "From each method's own run metrics on the validation split: DRIB's choices per gated layer (share of"
    " images on the most used channel set, channel sets serving >= 5% of the images, expected share of gated"
    " channels on which two images' masks differ, a class probe from the choices beside the same probe on"
    " shuffled labels); Decoupling's share of filters whose raw gate depends on the input. \"–\": not measured"
    " by that method (or constant: a static control has one channel set).\n\n")
_INTERPRETABILITY_NOTE = (
    "Interpretability columns: faithfulness of each row's own explanation (tiled deletion / insertion on a"
    " blurred canvas, ROAD gap), the same metrics for Grad-CAM and for random and centred maps on the same"
    " model, the own map's lift over the random map, and Grad-CAM drift from the start. The two control rows"
    " explain the baseline model with a random and a centred map: a method's own map that does not beat them is"
    " no better than noise or centre bias.\n\n"
    "- GridPG: on seeded 2 x 2 mosaics of held-out images of four distinct classes that the start classifies"
    " correctly alone, the share of positive attribution inside the cell whose class is explained (mean over"
    " cells, SE over cells); random and centre maps score 0.25 by construction, so only a map above them by"
    " more than two SE localises the object rather than the image centre.\n"
    "- Sanity ρ same image / sanity floor: Spearman correlation of the trained model's map with the map of the"
    " same model with every weight reset (project reset `kaiming`), beside the correlation with the reset"
    " map of another image (the floor, what any two maps of this explainer share); read ρ against the floor,"
    " not against 0: depends on weights = 1 where ρ is within two SE of the floor and below 1, and a map"
    " that keeps ρ = 1 (random, centre) is blind to the weights.\n")


def _header(ctx: Context, runs: pd.DataFrame) -> str:
    preset = ctx.preset
    budget = preset.budget()
    header = (f"# Leaderboard: preset `{preset.name}`\n\n"
              f"{preset.dataset}, {preset.backbone}, start: {preset.start.kind}"
              f"{' ' + preset.start.file if preset.start.file else ''}; budget {budget.epochs} epochs"
              f"{f', max {budget.max_batches} batches/epoch' if budget.max_batches else ''}"
              f"{f', {budget.seconds} s' if budget.seconds else ''} for every row; batch {preset.batch_size}; "
              f"MAC targets {', '.join(f'{100 * t:.0f}%' for t in preset.targets) or 'none (own settings)'}; "
              f"seeds {', '.join(map(str, preset.seeds))} (mean ± sample std over finished seeds).\n\n")
    splits = sorted(set(runs["split"].dropna().astype(str))) if "split" in runs else []
    for column, label in (("machine", "Ran on"), ("latency_form", "Latency measured on the")):
        values = sorted(set(runs[column].dropna().astype(str))) if column in runs else []
        if values:
            header += f"{label} {' / '.join(values)}.\n\n"
    halves = any("half" in t for t in splits)
    header += (f"Every figure is measured on the {' / '.join(splits) or 'test split'}"
               f"{'; validation (any selection) is the other half of the test set' if halves else ''}."
               " Arrows: ↓ lower is better, ↑ higher is better.\n\n")
    return header


def leaderboard_frame(runs: pd.DataFrame, methods: Sequence[str], targets: Sequence[float | None]) -> pd.DataFrame:
    """leaderboard.csv / .json: the boards of every target, one row per (row, target); a row that does not
    compress (target NaN) appears once, as do the control rows. Without the control rows these are the
    points of the trade-off curves."""
    boards = [target_board(runs, methods, t) for t in targets]
    board = pd.concat(boards, ignore_index=True).drop_duplicates(subset=["method", "target"])
    return board.drop(columns="table_target").reset_index(drop=True)


def _dense_point(runs: pd.DataFrame) -> tuple[float, float] | None:
    """(dense MACs, top-1 of the start) for the marker of the dense start, when a finished run reports them."""
    done = runs[runs["status"] == "finished"]
    if not len(done) or "dense_macs" not in done or "start_top1" not in done:
        return None
    macs, top1 = pd.to_numeric(done["dense_macs"], errors="coerce"), pd.to_numeric(done["start_top1"], errors="coerce")
    if not (macs.notna().any() and top1.notna().any()):
        return None
    return float(macs.dropna().iloc[0]), float(top1.dropna().iloc[0])


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(text, path)  # a unique temporary name: concurrent writers never collide
