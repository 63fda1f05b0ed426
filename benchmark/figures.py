"""pareto.png (top-1 against mean MACs) and explanations.png (each method's own maps on the same images)."""

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


def pareto_figure(board: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    plotted = 0
    for i, (_, row) in enumerate(board.iterrows()):
        if not np.isfinite(row["top1_mean"]) or not np.isfinite(row["mean_macs_mean"]):
            continue
        xerr = row["mean_macs_std"] / 1e6 if np.isfinite(row["mean_macs_std"]) else 0.0
        yerr = row["top1_std"] if np.isfinite(row["top1_std"]) else 0.0
        ax.errorbar(row["mean_macs_mean"] / 1e6, row["top1_mean"], xerr=xerr, yerr=yerr,
                    marker=MARKERS[i % len(MARKERS)], markersize=8, capsize=3, linestyle="none",
                    label=f"{row['method']} (n={row['seeds_finished']})")
        plotted += 1
    if not plotted:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("mean MACs per image (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy against cost (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
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
