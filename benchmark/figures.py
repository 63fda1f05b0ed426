"""pareto.png (top-1 against mean MACs), faithfulness.png (own-map insertion lift against top-1) and
explanations.png (each row's explanation on the same test images).

Every figure says what it shows and why it may look empty: methods get a colour, a marker and a size of
their own (a smaller marker is drawn on top, so two rows at the same point both stay visible, and the point
is labelled with every row it holds); explanation rows name the explainer actually used (a row without an
explainer of its own shows the common Grad-CAM, and says so), every panel carries the label and, where the
run recorded it, the predicted class, the colour scale has a bar, and a constant map says that it is
constant instead of showing a blank square. Each function returns the notes it wrote on the figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from common.run import CheckpointError, atomic_save_figure, load_checkpoint

from .jobs import Context, Job, read_metrics

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
COLOURS = plt.get_cmap("tab10").colors
EXPLANATION_CMAP = "jet"
EXPLANATION_KEYS = ("indices", "images", "labels", "maps")  # what every explanations.pt holds (preds optional)
CONSTANT_SPREAD = 1e-6  # a map whose max - min is below this is constant: no pixel ranked above another


def _save(fig: plt.Figure, path: Path) -> None:
    """Save through a uniquely named temporary file and a rename, like every other output (two processes
    writing one figure never share a temporary; a failed write leaves none behind)."""
    atomic_save_figure(fig, path, dpi=130, bbox_inches="tight")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def method_style(index: int, count: int) -> dict[str, Any]:
    """Colour, marker and size of the ``index``-th of ``count`` methods: all three differ between methods,
    and later methods are smaller and drawn on top, so coinciding points remain distinguishable."""
    return {"color": COLOURS[index % len(COLOURS)], "marker": MARKERS[index % len(MARKERS)],
            "markersize": 11.0 - 6.0 * index / max(1, count - 1), "zorder": 3 + index,
            "markeredgecolor": "black", "markeredgewidth": 0.6}


def _coinciding(points: dict[str, list[tuple[float, float]]], x_tol: float, y_tol: float
                ) -> list[tuple[float, float, list[str]]]:
    """Points shared (within the tolerances) by more than one method: (x, y, methods)."""
    flat = [(x, y, m) for m, pts in points.items() for x, y in pts]
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, m in flat:
        for gx, gy, names in groups:
            if abs(gx - x) <= x_tol and abs(gy - y) <= y_tol:
                if m not in names:
                    names.append(m)
                break
        else:
            groups.append((x, y, [m]))
    return [g for g in groups if len(g[2]) > 1]


def _label_coinciding(ax: plt.Axes, points: dict[str, list[tuple[float, float]]], notes: list[str],
                      xlabel: str, ylabel: str) -> None:
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    if not xs:
        return
    x_tol = 0.005 * max(1e-9, max(xs) - min(xs), abs(max(xs)))
    y_tol = 0.005 * max(1e-9, max(ys) - min(ys), abs(max(ys)))
    for x, y, names in _coinciding(points, x_tol, y_tol):
        text = " = ".join(names)
        ax.annotate(text, (x, y), fontsize=6, xytext=(6, -10), textcoords="offset points")
        notes.append(f"{text} at the same point ({xlabel} {x:.4g}, {ylabel} {y:.4g})")


def pareto_figure(curves: pd.DataFrame, path: Path, dense: tuple[float, float] | None = None) -> list[str]:
    """Top-1 against mean MACs: one line per compressing method through its MAC targets (error bars: std
    over seeds), rows that do not compress as single points, the dense start as a star."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    notes: list[str] = []
    groups = [(m, rows) for m, rows in curves.groupby("method", sort=False)] if len(curves) else []
    points: dict[str, list[tuple[float, float]]] = {}
    lines = 0
    for i, (method, rows) in enumerate(groups):
        rows = rows[rows["top1_mean"].map(_finite) & rows["mean_macs_mean"].map(_finite)]
        if not len(rows):
            notes.append(f"{method}: no finished run with finite top-1 and MACs")
            continue
        rows = rows.sort_values("mean_macs_mean")
        xerr = rows["mean_macs_std"].where(rows["mean_macs_std"].map(_finite), 0.0) / 1e6
        yerr = rows["top1_std"].where(rows["top1_std"].map(_finite), 0.0)
        seeds = ", ".join(sorted({str(int(n)) for n in rows["seeds_finished"] if _finite(n)}))
        ax.errorbar(rows["mean_macs_mean"] / 1e6, rows["top1_mean"], xerr=xerr, yerr=yerr, capsize=3, alpha=0.9,
                    linestyle="-" if len(rows) > 1 else "none", label=f"{method} ({seeds} seed(s) finished)",
                    **method_style(i, len(groups)))
        points[method] = list(zip(rows["mean_macs_mean"] / 1e6, rows["top1_mean"]))
        lines += len(rows) > 1
    if dense is not None:
        ax.plot(dense[0] / 1e6, dense[1], marker="*", markersize=15, color="gold", markeredgecolor="black",
                linestyle="none", label="dense start (no training)", zorder=2)
    _label_coinciding(ax, points, notes, "MACs (M)", "top-1")
    if not points:
        text = "no finished runs yet" if not len(groups) else "no finished run has finite top-1 and MACs"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        notes.append(text)
    ax.set_xlabel("mean MACs per image (M)")
    ax.set_ylabel("top-1 on the reported test split (%)")
    ax.set_title("top-1 against mean MACs" + (": lines join a method's MAC targets" if lines else
                                              " (one point per row: no row ran at several MAC targets)"))
    ax.grid(alpha=0.3)
    if points or dense is not None:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return notes


def faithfulness_figure(curves: pd.DataFrame, path: Path) -> list[str]:
    """The main interpretability figure against top-1: each row's own-map tiled-insertion lift over a random
    map on the same model (0 = no better than noise), one marker per (method, target)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    column = "own_insertion_lift_mean"
    notes: list[str] = []
    points: dict[str, list[tuple[float, float]]] = {}
    groups = [(m, rows) for m, rows in curves.groupby("method", sort=False)] if column in curves else []
    for i, (method, rows) in enumerate(groups):
        rows = rows[rows["top1_mean"].map(_finite) & rows[column].map(_finite)]
        if not len(rows):
            continue
        std = rows.get("own_insertion_lift_std", pd.Series(0.0, index=rows.index))
        yerr = std.where(std.map(_finite), 0.0)
        ax.errorbar(rows["top1_mean"], rows[column], yerr=yerr, capsize=3, linestyle="none", alpha=0.9,
                    label=method, **method_style(i, len(groups)))
        for _, row in rows.iterrows():
            if _finite(row.get("target")):
                ax.annotate(f"{100 * row['target']:.0f}%", (row["top1_mean"], row[column]), fontsize=6,
                            xytext=(4, 4), textcoords="offset points")
        points[method] = list(zip(rows["top1_mean"], rows[column]))
    _label_coinciding(ax, points, notes, "top-1", "lift")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.text(0.01, 0.02, "dashed: a random map on the same model", transform=ax.transAxes, fontsize=7, color="grey")
    if not points:
        text = "no finished runs with faithfulness metrics yet"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        notes.append(text)
    ax.set_xlabel("top-1 on the reported test split (%)")
    ax.set_ylabel("own map: tiled insertion AUC − random map's")
    ax.set_title("faithfulness of each row's explanation against accuracy (labels: MAC target)")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)
    return notes


def _first_explanations(ctx: Context, jobs: Sequence[Job], method: str) -> tuple[dict, dict] | None:
    """(explanations.pt, metrics.json) of the method's finished run with the lowest seed (and, for a
    compressing row, the lowest MAC target)."""
    for job in sorted((j for j in jobs if j.method == method),
                      key=lambda j: (j.seed, -1.0 if j.target is None else j.target)):
        run = ctx.run_dir(job)
        try:
            metrics = read_metrics(ctx, job)
        except CheckpointError:  # a failed row (the leaderboard says why), not a figure row
            continue
        if metrics is not None and (run / "explanations.pt").is_file():
            # An unreadable, unsafe or incomplete file is one error naming it, never a row silently missing.
            rebuild = (f"delete it and {run / 'metrics.json'}, then run python -m benchmark --preset "
                       f"{ctx.preset.name} --out {ctx.results_dir.parent} again to measure that job again")
            blob = load_checkpoint(run / "explanations.pt", keys=EXPLANATION_KEYS, rebuild=rebuild)
            return blob, metrics
    return None


def _row_label(method: str, metrics: dict) -> str:
    """The row's name and the explainer actually drawn (``own_explainer`` in its metrics.json)."""
    target = metrics.get("target_mac_reduction")
    at = f" @{100 * target:.0f}%" if _finite(target) else ""
    if metrics.get("own_explainer") == "gradcam":
        return f"{method}{at}\nGrad-CAM (no own\nexplainer)"
    return f"{method}{at}\nits own map"


def _class_name(classes: Sequence[str] | None, k: int) -> str:
    return str(classes[k]) if classes is not None and 0 <= k < len(classes) else str(k)


def explanations_figure(ctx: Context, jobs: Sequence[Job], methods: Sequence[str], path: Path) -> list[str]:
    """Row 0: the test images with their labels; then one row per finished method: the map it is judged by
    (its own explanation, or Grad-CAM when it has none) over the image, with that model's predicted class
    where the run recorded it (``preds`` in explanations.pt), on one colour scale with a colour bar."""
    found = [(m, *pair) for m in methods if (pair := _first_explanations(ctx, jobs, m)) is not None]
    notes: list[str] = []
    if not found:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
        _save(fig, path)
        return ["no finished runs yet"]
    reference = found[0][1]
    images = reference["images"].permute(0, 2, 3, 1).numpy()
    classes = reference.get("classes")
    cols = len(images)
    fig, axes = plt.subplots(len(found) + 1, cols, figsize=(1.7 * cols + 2.2, 1.75 * (len(found) + 1)),
                             squeeze=False, layout="constrained")
    labels = [int(v) for v in reference["labels"]]
    for c in range(cols):
        axes[0, c].imshow(images[c])
        axes[0, c].set_title(f"label: {_class_name(classes, labels[c])}", fontsize=7)
    axes[0, 0].set_ylabel("test image", fontsize=8)
    mappable = None
    own_rows = gradcam_rows = 0
    any_preds = False
    for r, (method, expl, metrics) in enumerate(found, start=1):
        same = bool((expl["indices"][:cols] == reference["indices"][:cols]).all())
        gradcam_rows += metrics.get("own_explainer") == "gradcam"
        own_rows += metrics.get("own_explainer") != "gradcam"
        preds = expl.get("preds")
        any_preds |= preds is not None
        for c in range(min(cols, len(expl["maps"]))):
            ax = axes[r, c]
            saliency = expl["maps"][c].float().numpy()
            ax.imshow(images[c].mean(axis=2), cmap="gray")
            mappable = ax.imshow(saliency, cmap=EXPLANATION_CMAP, alpha=0.5, vmin=0, vmax=1)
            spread = float(saliency.max() - saliency.min()) if saliency.size else 0.0
            if not np.isfinite(spread) or spread < CONSTANT_SPREAD:
                value = float(saliency.flat[0]) if saliency.size else float("nan")
                ax.text(0.5, 0.5, f"constant map\n(= {value:.2g}):\nno pixel ranked", ha="center", va="center",
                        fontsize=6, transform=ax.transAxes, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
                notes.append(f"{method}: the map of image {c} is constant ({value:.3g}); it ranks no pixel above "
                             "another, so it explains nothing")
            if preds is not None and c < len(preds):
                pred = int(preds[c])
                ax.set_title(f"pred: {_class_name(classes, pred)}", fontsize=7,
                             color="black" if pred == labels[c] else "red")
        axes[r, 0].set_ylabel(_row_label(method, metrics) + ("" if same else "\n(other images!)"), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=axes[1:, :].ravel().tolist(), fraction=0.03, pad=0.02,
                     ).set_label("saliency, scaled to [0, 1] per image", fontsize=7)
    kinds = []
    if own_rows:
        kinds.append("each method's own explanation")
    if gradcam_rows:
        kinds.append("Grad-CAM for rows without one")
    title = " and ".join(kinds) + " on the same test images"
    if any_preds:
        title += "\npanel titles: that model's predicted class (red when wrong)"
    else:
        notes.append("the runs recorded no predictions (explanations.pt without 'preds'): panels show the label only")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return notes
