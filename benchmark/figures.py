"""pareto.png (top-1 against mean MACs), faithfulness.png (own-map insertion lift against top-1) and
explanations.png (each method's own maps on the same images)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from common.run import CheckpointError, load_checkpoint

from .jobs import Context, Job

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _save(fig: plt.Figure, path: Path) -> None:
    """Save through a temporary file and a rename, like every other output."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


def pareto_figure(curves: pd.DataFrame, path: Path, dense: tuple[float, float] | None = None) -> None:
    """Top-1 against mean MACs: one line per compressing method through its MAC targets (error bars: std
    over seeds), rows that do not compress as single points, the dense start as a star."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    plotted = 0
    for i, (method, rows) in enumerate(curves.groupby("method", sort=False)):
        rows = rows[rows["top1_mean"].map(_finite) & rows["mean_macs_mean"].map(_finite)]
        if not len(rows):
            continue
        rows = rows.sort_values("mean_macs_mean")
        xerr = rows["mean_macs_std"].where(rows["mean_macs_std"].map(_finite), 0.0) / 1e6
        yerr = rows["top1_std"].where(rows["top1_std"].map(_finite), 0.0)
        seeds = ", ".join(sorted({str(int(n)) for n in rows["seeds_finished"]}))
        ax.errorbar(rows["mean_macs_mean"] / 1e6, rows["top1_mean"], xerr=xerr, yerr=yerr,
                    marker=MARKERS[i % len(MARKERS)], markersize=7, capsize=3, alpha=0.85,
                    linestyle="-" if len(rows) > 1 else "none", label=f"{method} (seeds: {seeds})")
        plotted += 1
    if dense is not None:
        ax.plot(dense[0] / 1e6, dense[1], marker="*", markersize=14, color="black", linestyle="none",
                label="dense start (no training)")
    if not plotted:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean MACs per image (M)")
    ax.set_ylabel("top-1 on the reported test split (%)")
    ax.set_title("accuracy against cost, one line per method through its MAC targets")
    ax.grid(alpha=0.3)
    if plotted or dense is not None:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def faithfulness_figure(curves: pd.DataFrame, path: Path) -> None:
    """The main interpretability figure against top-1: each row's own-map tiled-insertion lift over a random
    map on the same model (0 = no better than noise), one marker per (method, target)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    column = "own_insertion_lift_mean"
    plotted = 0
    if column in curves:
        for i, (method, rows) in enumerate(curves.groupby("method", sort=False)):
            rows = rows[rows["top1_mean"].map(_finite) & rows[column].map(_finite)]
            if not len(rows):
                continue
            yerr = rows["own_insertion_lift_std"].where(rows["own_insertion_lift_std"].map(_finite), 0.0)
            ax.errorbar(rows["top1_mean"], rows[column], yerr=yerr, marker=MARKERS[i % len(MARKERS)],
                        markersize=7, capsize=3, linestyle="none", alpha=0.85, label=method)
            for _, row in rows.iterrows():
                if _finite(row.get("target")):
                    ax.annotate(f"{100 * row['target']:.0f}%", (row["top1_mean"], row[column]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
            plotted += 1
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.text(0.01, 0.02, "dashed: a random map on the same model", transform=ax.transAxes, fontsize=7, color="grey")
    if not plotted:
        ax.text(0.5, 0.5, "no finished runs with faithfulness metrics yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("top-1 on the reported test split (%)")
    ax.set_ylabel("own map: tiled insertion AUC − random map's")
    ax.set_title("faithfulness of each row's own explanation against accuracy (labels: MAC target)")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def _first_explanations(ctx: Context, jobs: Sequence[Job], method: str) -> dict | None:
    """explanations.pt of the method's finished run with the lowest seed."""
    for job in sorted((j for j in jobs if j.method == method), key=lambda j: j.seed):
        path = ctx.run_dir(job) / "explanations.pt"
        if (ctx.run_dir(job) / "metrics.json").is_file() and path.is_file():
            try:
                return load_checkpoint(path)
            except CheckpointError:
                return None
    return None


def explanations_figure(ctx: Context, jobs: Sequence[Job], methods: Sequence[str], path: Path) -> None:
    """Row 0: the test images; then one row per finished method: its own explanation over the image."""
    found = [(m, e) for m in methods if (e := _first_explanations(ctx, jobs, m)) is not None]
    if not found:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
        _save(fig, path)
        return
    reference = found[0][1]
    images = reference["images"].permute(0, 2, 3, 1).numpy()
    cols = len(images)
    fig, axes = plt.subplots(len(found) + 1, cols, figsize=(1.6 * cols + 1, 1.6 * (len(found) + 1)),
                             squeeze=False)
    for c in range(cols):
        axes[0, c].imshow(images[c])
        axes[0, c].set_title(f"label {int(reference['labels'][c])}", fontsize=7)
    axes[0, 0].set_ylabel("input", fontsize=8)
    for r, (method, expl) in enumerate(found, start=1):
        same = bool((expl["indices"][:cols] == reference["indices"][:cols]).all())
        for c in range(min(cols, len(expl["maps"]))):
            axes[r, c].imshow(images[c].mean(axis=2), cmap="gray")
            axes[r, c].imshow(expl["maps"][c].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(method if same else f"{method} (other images!)", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("each method's own explanation (unit-scaled), same test images", fontsize=9)
    _save(fig, path)
