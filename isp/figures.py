"""The gamma1 sweep as a picture (``python -m isp compare ... --figure PATH.png``): each compared gate search's
interpretation term under the hard gates (Eq. 10's second term, with the unsteered spread as a band), its top-1
and its explanation drift, against gamma1 on a symlog axis so that gamma1 = 0 shows. Runs of the same gamma1
but another gamma2, C_x unit or gate objective are separate series. Drawn from ``run_summary`` rows alone."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from common.run import atomic_save_figure

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
# Per panel: title, then (run_summary key, "dict.key" for a drift dict; legend name; marker; line style).
PANELS = (
    ("interpretation term under the hard gates (px^2)", (
        ("interpretation_term_subset", "pruning subset", "o", "-"),
        ("interpretation_term_images", "images", "s", "--"))),
    ("top-1 (%)", (
        ("top1_before_finetune", "before fine-tuning", "o", "-"),
        ("top1_after_finetune", "after fine-tuning", "^", "--"))),
    ("explanation drift, original vs pruned (1 = kept)", (
        ("selector_drift_before_finetune.top_overlap", "selector top-10% overlap, before", "o", "-"),
        ("selector_drift_after_finetune.top_overlap", "selector top-10% overlap, after", "^", "--"),
        ("gradcam_drift_before_finetune.spearman", "Grad-CAM Spearman, before", "s", ":"),
        ("gradcam_drift_after_finetune.spearman", "Grad-CAM Spearman, after", "v", "-."))),
)
BANDS = (("interpretation_term_subset", "pruning subset", "0.55"), ("interpretation_term_images", "images", "tan"))


def series_label(row: Mapping[str, Any]) -> str:
    """What besides gamma1 tells the searches of a sweep apart."""
    gamma2 = row.get("gamma2")
    return (f"gamma2 {gamma2:g}" if isinstance(gamma2, int | float) else "gamma2 ?") + \
        f", C_x in {row.get('interpretation_units', '?')}, {row.get('gate_objective', '?')}"


def _value(row: Mapping[str, Any], key: str) -> float | None:
    """The finite number under ``key`` ("a.b": key b of dict a), None where the row lacks it (e.g. no
    fine-tuning) or it is null / not finite."""
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def sweep_figure(rows: dict[str, dict], unsteered: dict[str, dict] | None, path: Path) -> Path:
    """Three panels against gamma1 (symlog) of the ``run_summary`` rows ``rows``: the interpretation term on
    the pruning subset and on the images (with the min..max of the ``unsteered`` rows shaded, when given), top-1
    before and (where there is one) after fine-tuning, and the selector maps' top-10% overlap and Grad-CAM's
    Spearman correlation before (and after) fine-tuning. A point per run, a line through the mean per gamma1;
    colour = series (``series_label``), marker = metric. Written atomically to ``path``; returns it."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise ValueError(f"figure path must end in one of {', '.join(FIGURE_SUFFIXES)}, got {str(path)!r}")
    if not rows:
        raise ValueError("the sweep figure needs at least one run")
    if missing := [name for name, row in rows.items() if _value(row, "gamma1") is None]:
        raise ValueError(f"run_summary rows without a gamma1: {', '.join(missing)}")
    labels = sorted({series_label(row) for row in rows.values()})
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    gammas = [float(row["gamma1"]) for row in rows.values()]
    positive = [g for g in gammas if g > 0]
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (title, metrics) in zip(axes, PANELS):
        shown, values = [], []
        for key, name, marker, style in metrics:
            for label in labels:
                points = sorted((float(row["gamma1"]), v) for row in rows.values()
                                if series_label(row) == label and (v := _value(row, key)) is not None)
                if not points:
                    continue
                shown.append(Line2D([], [], color="k", marker=marker, linestyle=style, label=name))
                values += [y for _, y in points]
                ax.scatter(*zip(*points), color=colour[label], marker=marker, zorder=3)
                xs = sorted({x for x, _ in points})
                means = [sum(y for x, y in points if x == g) / sum(1 for x, _ in points if x == g) for g in xs]
                ax.plot(xs, means, color=colour[label], linestyle=style, linewidth=1)
        if title.startswith("interpretation") and unsteered:
            for key, name, shade in BANDS:
                spread = [v for row in unsteered.values() if (v := _value(row, key)) is not None]
                if spread:
                    ax.axhspan(min(spread), max(spread), color=shade, alpha=0.25, zorder=0)
                    shown.append(Patch(color=shade, alpha=0.25,
                                       label=f"unsteered spread, {name} ({len(spread)} runs)"))
                    values += spread
        if title.startswith("interpretation") and values and min(values) > 0:
            ax.set_yscale("log")  # steered and unsteered terms can lie orders of magnitude apart
        linthresh = min(positive) if positive else 1.0
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(min(gammas) - 0.2 * linthresh, 1.5 * max(max(gammas), linthresh))
        ax.set_xticks(sorted(set(gammas)), [f"{g:g}" for g in sorted(set(gammas))])  # the swept values
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("gamma1")
        ax.set_title(title, fontsize=10)
        unique = {handle.get_label(): handle for handle in shown}
        if unique:
            ax.legend(handles=list(unique.values()), fontsize=7)
    fig.legend(handles=[Patch(color=colour[label], label=label) for label in labels], loc="outside lower center",
               ncol=min(len(labels), 4), fontsize=8)
    atomic_save_figure(fig, path, dpi=150)
    return path
