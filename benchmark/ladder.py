"""Budget ladder: one preset's rows run at several epoch budgets, so that a reader sees whether the ranking is a
property of the methods or of the budget.

Each rung is the base preset with ``epochs`` replaced (and the ladder's rows and metric sizes): an ordinary
preset whose runs live in ``<out>/<ladder>/e<epochs>/`` and whose leaderboard is written there as usual. The
jobs of every rung share one pool of workers, longest first, so that no core idles while a rung finishes.
``ladder.md`` / ``ladder.csv`` / ``ladder.png`` put the rungs side by side: top-1 against budget, one line per
row, the dense start marked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from common.run import atomic_save_figure, atomic_write_text, pick_device, run_lock

from .figures import method_style
from .jobs import Context, Job, is_finished, run_job
from .leaderboard import collect_runs, write_leaderboard
from .presets import MetricSpec, Preset, get_preset
from .runner import (
    NoRunsError,
    _check_identities,
    _load_inputs,
    _run_worker_pairs,
    job_states,
    plan_jobs,
    resolve_workers,
)
from .start import prepare_start, start_path

# Longest rows first (measured train seconds per epoch at one thread, main job): a worker that is handed a short
# job last finishes with the others instead of after them.
COST_ORDER = ("drib", "decoupling", "isp", "picnn", "baseline", "l1-prune", "random-prune")


@dataclass(frozen=True)
class Ladder:
    name: str
    base: str  # the preset whose rungs these are
    budgets: tuple[float, ...]
    methods: tuple[str, ...]
    metrics: MetricSpec | None = None  # None: the base preset's
    description: str = ""

    def rung(self, epochs: float) -> Preset:
        """The base preset at ``epochs`` epochs per row, with the ladder's rows and metric sizes."""
        base = get_preset(self.base)
        return replace(base, name=f"{self.name}-e{epochs:g}", epochs=float(epochs), methods=self.methods,
                       metrics=self.metrics or base.metrics,
                       description=f"{self.description}; rung of {epochs:g} epoch(s)")


LADDERS = {
    "cifar10-cpu-ladder": Ladder(
        name="cifar10-cpu-ladder", base="cifar10-cpu", budgets=(1.0, 3.0, 9.0),
        methods=("baseline", "drib", "picnn", "decoupling", "isp", "l1-prune", "random-prune"),
        # Smaller explanation subsets than the main job's: the ladder's question is top-1 against budget; the
        # interpretability columns are still written, with wider standard errors.
        metrics=MetricSpec(explain_images=32, mis_images=500, figure_images=4, latency_repeats=5,
                           latency_rounds=2),
        description="the main job (pretrained ResNet-20, MAC target 50%, seed 0) at 1, 3 and 9 epochs per row, "
                    "without the control rows"),
}


def rung_dir(results: Path, epochs: float) -> Path:
    return results / f"e{epochs:g}"


def run_ladder(ladder: Ladder, out: str | os.PathLike = "results", *, data_root: str | None = None,
               weights_dir: str | None = None, device: str | None = None, skip_training: bool = False,
               replace_changed: bool = False, val_source: str | None = None, download: bool = False,
               wait: bool = False, workers: int | None = None, threads: int = 1) -> dict[str, Path]:
    """Run every unfinished job of every rung (one pool, longest first), write each rung's leaderboard and the
    ladder's table and figure; returns the ladder's output paths. Resumable like ``run_preset``."""
    results = Path(out) / ladder.name
    rungs = [(epochs, ladder.rung(epochs)) for epochs in ladder.budgets]
    contexts = {epochs: Context(preset, rung_dir(results, epochs), data_root, weights_dir, device, val_source,
                                download) for epochs, preset in rungs}
    plans = {epochs: plan_jobs(preset) for epochs, preset in rungs}
    lock = contextlib.nullcontext() if skip_training else run_lock(
        results, wait=wait, what=f"--out {out} (ladder {ladder.name})")
    with lock:
        for epochs, _ in rungs:
            _check_identities(contexts[epochs], plans[epochs], replace_changed=replace_changed,
                              aggregate_only=skip_training)
        if skip_training and not any(job_states(contexts[e], plans[e])[state] for e, _ in rungs
                                     for state in ("finished", "failed")):
            raise NoRunsError(f"--aggregate-only: no run of ladder {ladder.name!r} under {results}; check --out "
                              f"(now {out}), or run without --aggregate-only first")
        pending = [(job, contexts[epochs]) for epochs, _ in sorted(rungs, key=lambda r: -r[0])
                   for job in sorted(plans[epochs], key=lambda j: _cost_rank(j.method))
                   if not is_finished(contexts[epochs], job)]
        if pending and not skip_training:
            first = contexts[ladder.budgets[0]]
            data = _load_inputs(first, weights_dir)
            count = resolve_workers(first.preset, workers, device)
            if first.preset.start.kind == "scratch":  # trained here once, before workers race; every rung shares it
                prepare_start(first.preset, data, first.results_dir, weights_dir=weights_dir,
                              device=pick_device(device))
                cached = start_path(first.preset, first.results_dir, data.val_source)
                for epochs, preset in rungs[1:]:
                    target = start_path(preset, contexts[epochs].results_dir, data.val_source)
                    if not target.is_file():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(cached, target)
            if count > 1:
                _run_worker_pairs(pending, count, threads)
            else:
                for job, ctx in pending:
                    run_job(job, ctx, None, data=data)
        for epochs, preset in rungs:
            write_leaderboard(contexts[epochs], plans[epochs], preset.methods)
        return write_ladder(ladder, results, {e: (contexts[e], plans[e]) for e in ladder.budgets})


def _cost_rank(method: str) -> int:
    return COST_ORDER.index(method) if method in COST_ORDER else len(COST_ORDER)


def ladder_frame(ladder: Ladder, rungs: dict[float, tuple[Context, Sequence[Job]]]) -> pd.DataFrame:
    """One row per (row, budget): top-1, its difference from the baseline at that budget, MAC reduction, status."""
    frames = []
    for epochs, (ctx, jobs) in rungs.items():
        runs = collect_runs(ctx, jobs)
        runs = runs.assign(epochs=epochs)
        frames.append(runs)
    runs = pd.concat(frames, ignore_index=True)
    targets = runs["target"].dropna().unique()
    if len(targets) > 1:  # one line per (row, MAC target) when the base preset has several targets
        runs["method"] = [m if pd.isna(t) else f"{m} @{100 * t:.0f}%" for m, t in zip(runs["method"], runs["target"])]
    keep = ["method", "epochs", "seed", "status", "top1", "delta_top1", "mac_reduction_pct", "mean_macs",
            "start_top1", "train_seconds"]
    for column in keep:
        if column not in runs:
            runs[column] = float("nan")
    return runs[keep].sort_values(["method", "epochs"], key=lambda s: s.map(_row_order(ladder)) if s.name ==
                                  "method" else s, ignore_index=True)


def _row_order(ladder: Ladder) -> Callable[[str], tuple[int, str]]:
    """Sort key for row labels: the ladder's row order, then the label (its MAC target)."""
    def rank(label: str) -> tuple[int, str]:
        method = label.split(" @")[0]
        return (ladder.methods.index(method) if method in ladder.methods else len(ladder.methods), label)
    return rank


def ladder_markdown(ladder: Ladder, frame: pd.DataFrame) -> str:
    """Top-1 per row and budget (rank in brackets), then the MAC reduction each row reached."""
    done = frame[frame["status"] == "finished"]
    budgets = list(ladder.budgets)
    top1 = done.pivot_table(index="method", columns="epochs", values="top1", aggfunc="mean")
    ranks = top1.rank(ascending=False, method="min")
    macs = done.pivot_table(index="method", columns="epochs", values="mac_reduction_pct", aggfunc="mean")
    header = "| row | " + " | ".join(f"top-1 at {e:g} ep. (rank)" for e in budgets) + " | " + " | ".join(
        f"MACs removed at {e:g} ep." for e in budgets) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(budgets))]
    for method in sorted(frame["method"].unique(), key=_row_order(ladder)):
        cells = []
        for e in budgets:
            if method in top1.index and e in top1.columns and pd.notna(top1.at[method, e]):
                cells.append(f"{top1.at[method, e]:.2f} ({int(ranks.at[method, e])})")
            else:
                status = frame[(frame["method"] == method) & (frame["epochs"] == e)]["status"]
                cells.append(str(status.iloc[0]) if len(status) else "–")
        for e in budgets:
            value = macs.at[method, e] if method in macs.index and e in macs.columns else float("nan")
            cells.append(f"{value:.1f}%" if pd.notna(value) else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    start = pd.to_numeric(done["start_top1"], errors="coerce").dropna()
    dense = f"Dense start (no training): top-1 {start.iloc[0]:.2f}%.\n\n" if len(start) else ""
    return (f"# Budget ladder `{ladder.name}`\n\n{ladder.description}. Top-1 on the reported test split (%), one "
            f"seed; rank 1 = best at that budget. Each rung's full leaderboard: `e<epochs>/leaderboard.md`.\n\n"
            + dense + "\n".join(lines) + "\n")


def ladder_figure(ladder: Ladder, frame: pd.DataFrame, path: Path) -> None:
    """Top-1 against epochs per row (log-spaced budgets), the dense start as a dashed line."""
    done = frame[frame["status"] == "finished"]
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    labels = sorted(frame["method"].unique(), key=_row_order(ladder))
    for i, method in enumerate(labels):
        rows = done[done["method"] == method].groupby("epochs")["top1"].mean()
        if len(rows):
            ax.plot(rows.index, rows.values, label=method, linestyle="-", **method_style(i, len(labels)))
    start = pd.to_numeric(done["start_top1"], errors="coerce").dropna()
    if len(start):
        ax.axhline(float(start.iloc[0]), color="black", linestyle="--", linewidth=1, label="dense start")
    if not len(done):
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_xticks(list(ladder.budgets), [f"{e:g}" for e in ladder.budgets])
    ax.set_xlabel("epochs per row (training budget)")
    ax.set_ylabel("top-1 on the reported test split (%)")
    ax.set_title(f"{ladder.name}: top-1 against budget")
    ax.grid(alpha=0.3)
    if len(done):
        ax.legend(fontsize=7, loc="best")
    atomic_save_figure(fig, path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def write_ladder(ladder: Ladder, results: Path, rungs: dict[float, tuple[Context, Sequence[Job]]]) -> dict[str, Path]:
    results.mkdir(parents=True, exist_ok=True)
    frame = ladder_frame(ladder, rungs)
    paths = {"md": results / "ladder.md", "csv": results / "ladder.csv", "figure": results / "ladder.png"}
    atomic_write_text(ladder_markdown(ladder, frame), paths["md"])
    atomic_write_text(frame.to_csv(index=False), paths["csv"])
    ladder_figure(ladder, frame, paths["figure"])
    return paths
