"""``python -m drib seeds``: DRIB beside its two static twins over seeds, read from each run's metrics.json.

The dynamic runs' metrics.json come from ``python -m drib evaluate`` (top-1 and MACs, the static twin (a):
the same network fixed to its most used rows, and the dynamism figures); the static runs (b) are the same
recipe trained with one code-book row per layer (``--set decision.actions=1``), given in the same seed order.
Differences are paired by seed; "beats" means the mean paired difference lies beyond two standard errors
(s.e. of the mean over seeds), otherwise the table says "no measured difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.run import read_json
from common.stats import beyond_two_se, paired_difference

MIN_SEEDS = 2
# credibility at the configured beta (drib.verification): raw, size-corrected, and how often the controls differ
CREDIBILITY_KEYS = ("credibility_own", "credibility_other", "credibility_static", "credibility_sized_own",
                    "credibility_sized_other", "credibility_sized_static", "credibility_other_differs_share",
                    "credibility_static_equals_own_share")


def run_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """One run's figures of the table (the static twin and dynamism figures only where evaluate wrote them)."""
    out = {"top1": float(metrics["top1"]), "macs": float(metrics["macs"]),
           "mac_reduction": float(metrics["mac_reduction"])}
    twin = metrics.get("static_twin")
    if twin:
        out.update(twin_top1=float(twin["top1"]), twin_macs=float(twin["macs_without_heads"]),
                   twin_mac_reduction=float(twin["mac_reduction_without_heads"]))
    dyn = metrics.get("dynamism")
    if dyn:
        out.update(max_top_row_share=float(dyn["max_top_row_share"]),
                   min_rows_over_5pct=float(dyn["min_rows_over_5pct"]),
                   mean_usage_perplexity=float(dyn["mean_usage_perplexity"]),
                   mask_difference=float(dyn["mask_difference"]),
                   dynamic_filter_share=float(dyn["dynamic_filter_share"]))
        if "probe_over_shuffled" in dyn:
            out["probe_over_shuffled"] = float(dyn["probe_over_shuffled"])
    for key in CREDIBILITY_KEYS:  # null in metrics.json (no other image's selection differed): NaN here
        if key in metrics:
            out[key] = math.nan if metrics[key] is None else float(metrics[key])
    return out


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of a - b over pairs, its standard error and whether it lies beyond two of them."""
    if len(a) != len(b) or len(a) < MIN_SEEDS:
        raise ValueError(f"a paired difference needs >= {MIN_SEEDS} pairs of equal length, got {len(a)} and {len(b)}")
    mean, se, _ = paired_difference(a, b)
    verdict = {1: "a beats b", -1: "b beats a", 0: "no measured difference"}[beyond_two_se(mean, se)]
    return {"differences": [x - y for x, y in zip(a, b)], "mean_difference": mean, "se": se, "verdict": verdict}


def _mean(values: Sequence[float]) -> float:
    """The mean of the known values (NaN: a figure undefined for that seed); NaN when none is known."""
    known = [v for v in values if not math.isnan(v)]
    return sum(known) / len(known) if known else math.nan


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: run `python -m drib evaluate --run {path}` first")
    return read_json(file)


def seeds_table(dynamic: Sequence[str | Path], static: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Per seed figures of the dynamic runs (and the static runs, same order), their means and the paired
    differences: DRIB - twin (a) and, with ``static``, DRIB - static (b) in top-1 and MACs."""
    if len(dynamic) < MIN_SEEDS:
        raise ValueError(f"give >= {MIN_SEEDS} dynamic runs (one per seed), got {len(dynamic)}")
    if static and len(static) != len(dynamic):
        raise ValueError(f"give one static run per dynamic run (same seed order), got {len(static)} and {len(dynamic)}")
    rows = [run_figures(_read(p)) for p in dynamic]
    missing = [str(p) for p, r in zip(dynamic, rows) if "twin_top1" not in r]
    if missing:
        raise ValueError(f"no static_twin in the metrics.json of {', '.join(missing)}: "
                         "re-run `python -m drib evaluate`")
    shared = [k for k in rows[0] if all(k in r for r in rows)]
    out: dict[str, Any] = {"dynamic": [str(p) for p in dynamic], "per_seed": rows,
                           "mean": {k: _mean([r[k] for r in rows]) for k in shared}}
    col = {k: [r[k] for r in rows] for k in ("top1", "macs", "twin_top1", "twin_macs")}
    out["drib_minus_twin"] = {"top1": paired(col["top1"], col["twin_top1"]),
                              "macs": paired(col["macs"], col["twin_macs"])}
    if static:
        srows = [run_figures(_read(p)) for p in static]
        out.update(static=[str(p) for p in static], static_per_seed=srows,
                   static_mean={k: _mean([r[k] for r in srows]) for k in ("top1", "macs", "mac_reduction")})
        out["drib_minus_static"] = {"top1": paired(col["top1"], [r["top1"] for r in srows]),
                                    "macs": paired(col["macs"], [r["macs"] for r in srows])}
    return out


def render_markdown(table: dict[str, Any]) -> str:
    """The table as markdown: one row per figure, one column per seed, the mean, and the paired tests."""
    rows, seeds = table["per_seed"], len(table["per_seed"])
    head = "| figure | " + " | ".join(f"seed {i}" for i in range(seeds)) + " | mean |"
    lines = [head, "|---|" + "---:|" * (seeds + 1)]

    def line(label: str, values: list[float], fmt: str) -> None:
        mean = _mean(values)
        lines.append(f"| {label} | " + " | ".join("-" if math.isnan(v) else format(v, fmt) for v in values)
                     + " | " + ("-" if math.isnan(mean) else format(mean, fmt)) + " |")

    line("DRIB top-1 (%)", [r["top1"] for r in rows], ".2f")
    line("DRIB MACs (M, heads included)", [r["macs"] / 1e6 for r in rows], ".2f")
    line("static twin (a) top-1 (%)", [r["twin_top1"] for r in rows], ".2f")
    line("static twin (a) MACs (M, no heads)", [r["twin_macs"] / 1e6 for r in rows], ".2f")
    if "static_per_seed" in table:
        line("static (b) top-1 (%)", [r["top1"] for r in table["static_per_seed"]], ".2f")
        line("static (b) MACs (M)", [r["macs"] / 1e6 for r in table["static_per_seed"]], ".2f")
    for key, label, fmt in (("max_top_row_share", "largest top-row share", ".3f"),
                            ("min_rows_over_5pct", "fewest rows >= 5%", ".0f"),
                            ("mean_usage_perplexity", "mean usage perplexity", ".2f"),
                            ("mask_difference", "mask difference", ".3f"),
                            ("dynamic_filter_share", "dynamic_filter_share", ".3f"),
                            ("probe_over_shuffled", "class probe - shuffled (points)", ".1f"),
                            ("credibility_own", "credibility own", ".3f"),
                            ("credibility_other", "credibility other (a differing selection)", ".3f"),
                            ("credibility_static", "credibility static row", ".3f"),
                            ("credibility_sized_own", "size-corrected own", ".3f"),
                            ("credibility_sized_other", "size-corrected other", ".3f"),
                            ("credibility_sized_static", "size-corrected static", ".3f"),
                            ("credibility_other_differs_share", "images with a differing other selection", ".2f"),
                            ("credibility_static_equals_own_share", "own selection = static row", ".2f")):
        if all(key in r for r in rows):
            line(label, [r[key] for r in rows], fmt)
    lines.append("")
    for name, other in (("drib_minus_twin", "static twin (a)"), ("drib_minus_static", "static (b)")):
        if name in table:
            t, m = table[name]["top1"], table[name]["macs"]
            verdict = {"a beats b": f"DRIB beats {other}", "b beats a": f"{other} beats DRIB"}.get(t["verdict"],
                                                                                                 t["verdict"])
            lines.append(f"- DRIB - {other}: top-1 {t['mean_difference']:+.2f} +- {t['se']:.2f} pts "
                         f"(s.e. over {seeds} seeds: {verdict}); MACs {m['mean_difference'] / 1e6:+.2f} +- "
                         f"{m['se'] / 1e6:.2f} M")
    return "\n".join(lines) + "\n"
