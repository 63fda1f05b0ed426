"""Each method beside the control of its own mechanism: the control rows' settings (no training) and the
mechanism table's paired differences and verdicts on planted numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.leaderboard import dynamism_markdown, mechanism_markdown, mechanism_table, target_board, verdict
from benchmark.metrics import COLUMNS, pack_correct
from benchmark.presets import COMPRESSING, CONTROL_METHODS, CONTROL_OF, METHODS, get_preset, list_presets
from benchmark.registry import default_registry


@pytest.mark.parametrize("name", list_presets())
def test_every_method_has_its_control_row_with_the_mechanism_switched_off(name: str) -> None:
    preset = get_preset(name)
    assert set(CONTROL_OF.values()) == set(CONTROL_METHODS) and set(CONTROL_METHODS) <= set(METHODS)
    target = preset.targets[0] if preset.targets else None
    cases = {"drib-static": ("variant", "static"), "decoupling-static": ("static_twin", True),
             "isp-unsteered": ("gamma1", 0.0), "picnn-lambda0": ("lam", 0.0)}
    for control, (key, value) in cases.items():
        method = CONTROL_METHODS[control][0]
        assert CONTROL_OF[method] == control
        compresses = method in COMPRESSING
        assert (control in COMPRESSING) == compresses  # the same MAC target as its method
        at = target if compresses else None
        mine, theirs = preset.method_settings(method, at), preset.method_settings(control, at)
        assert theirs[key] == value and mine.get(key) != value
        # everything else (recipe, batch size, MAC target) is the method's own
        own_keys = set(CONTROL_METHODS[control][1])  # the control's own switches (one, or a few for the twin)
        assert {k: v for k, v in theirs.items() if k not in own_keys} == {
            k: v for k, v in mine.items() if k not in own_keys}
    registry = default_registry()
    assert all(c in registry for c in CONTROL_METHODS)


@pytest.mark.parametrize(("difference", "se", "direction", "expected"), [
    (1.0, 0.4, 1, "beats its control"),          # 2.5 SE above
    (0.7, 0.4, 1, "no measured difference"),     # 1.75 SE: not beyond two
    (-1.0, 0.4, 1, "below its control"),
    (-1.0, 0.4, -1, "beats its control"),        # lower is better
    (0.8, 0.4, 1, "no measured difference"),     # exactly two SE is not beyond them
    (1.0, math.nan, 1, "no standard error: not judged"),
    (math.nan, 0.1, 1, "not measured"),
])
def test_verdict_only_beyond_two_standard_errors(difference: float, se: float, direction: int,
                                                 expected: str) -> None:
    assert verdict(difference, se, direction) == expected


def _run(method: str, seed: int, correct: torch.Tensor | None = None, **values: float) -> dict:
    row = {"method": method, "seed": seed, "status": "finished", "target": 0.5 if method != "picnn" and
           method != "picnn-lambda0" else np.nan, **values}
    if correct is not None:
        row.update(top1=100.0 * float(correct.double().mean()), top1_correct=pack_correct(correct),
                   top1_images=len(correct))
    return row


def _frame(rows: list[dict]) -> pd.DataFrame:
    runs = pd.DataFrame(rows)
    for column in (*COLUMNS, "error"):
        if column not in runs:
            runs[column] = np.nan
    return runs


def test_mechanism_table_pairs_per_image_and_reads_the_verdicts() -> None:
    n = 2000
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, generator=g) < 0.8
    # DRIB: its control wrong on 200 images DRIB gets right (+10 points, paired SE ~0.67): beats
    better = base.clone()
    better[torch.nonzero(~base)[:200, 0]] = True
    # Decoupling: 20 images flipped each way (0 points): no measured difference; its control better by 10 points
    swapped = base.clone()
    right, wrong = torch.nonzero(base)[:20, 0], torch.nonzero(~base)[:20, 0]
    swapped[right], swapped[wrong] = False, True
    rows = [_run("drib", 0, better), _run("drib-static", 0, base),
            _run("decoupling", 0, base), _run("decoupling-static", 0, swapped),
            _run("isp", 0, base, **{"method.rbf_distance": 0.5, "drift_spearman": 0.9}),
            _run("isp-unsteered", 0, base, **{"method.rbf_distance": 0.7, "drift_spearman": 0.8}),
            _run("picnn", 0, base, mis=0.4), _run("picnn-lambda0", 0, base, mis=0.3)]
    table = mechanism_table(_frame(rows), 0.5).set_index(["method", "figure"])
    drib = table.loc[("drib", "top1")]
    assert drib["difference"] == pytest.approx(10.0)
    # paired: the SE of the per-image differences (200 of +1 among 2000), far below the unpaired binomial SE
    assert drib["se"] == pytest.approx(100 * float(better.double().sub(base.double()).std()) / math.sqrt(n))
    assert drib["pairing"] == f"paired over {n} test images" and drib["verdict"] == "beats its control"
    decoupling = table.loc[("decoupling", "top1")]
    assert decoupling["difference"] == pytest.approx(0.0) and decoupling["verdict"] == "no measured difference"
    # one value per run, one seed: no SE, no verdict either way
    assert table.loc[("isp", "method.rbf_distance"), "difference"] == pytest.approx(-0.2)
    assert table.loc[("isp", "method.rbf_distance"), "verdict"] == "no standard error: not judged"
    assert table.loc[("picnn", "mis"), "verdict"] == "no standard error: not judged"
    text = mechanism_markdown(table.reset_index())
    assert "| drib " in text and "beats its control" in text and "no measured difference" in text

    # the control better by 10 points on the same images: below its control
    rows[2:4] = [_run("decoupling", 0, base), _run("decoupling-static", 0, better)]
    table = mechanism_table(_frame(rows), 0.5).set_index(["method", "figure"])
    assert table.loc[("decoupling", "top1"), "verdict"] == "below its control"


def test_mechanism_over_seeds_and_unpaired_without_per_image_values() -> None:
    rows = [_run("picnn", s, mis=0.40 + 0.01 * s) for s in range(3)] + \
           [_run("picnn-lambda0", s, mis=0.30 + 0.012 * s) for s in range(3)]
    # top-1 without per-image values: difference of proportions, binomial SE stated as unpaired
    rows += [{**_run("drib", 0), "top1": 80.0, "top1_images": 1000},
             {**_run("drib-static", 0), "top1": 78.0, "top1_images": 1000}]
    table = mechanism_table(_frame(rows), 0.5).set_index(["method", "figure"])
    picnn = table.loc[("picnn", "mis")]
    diffs = np.array([0.10, 0.098, 0.096])
    assert picnn["seeds"] == 3 and picnn["difference"] == pytest.approx(diffs.mean())
    assert picnn["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
    assert picnn["verdict"] == "beats its control"
    drib = table.loc[("drib", "top1")]
    assert drib["se"] == pytest.approx(100 * math.sqrt((0.8 * 0.2 + 0.78 * 0.22) / 1000))
    assert drib["pairing"].startswith("unpaired") and drib["verdict"] == "no measured difference"  # 2 < 2 x 1.8


def test_board_carries_the_mechanism_and_the_dynamism_columns() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.rand(500, generator=g) < 0.7
    rows = [_run("baseline", 0, base), _run("drib", 0, base, **{"method.dynamism.max_top_row_share": 0.96}),
            _run("drib-static", 0, base, **{"method.dynamism.max_top_row_share": 1.0})]
    runs = _frame(rows)
    runs.loc[runs["method"] == "baseline", "target"] = np.nan
    board = target_board(runs, ["baseline", "drib", "drib-static"], 0.5).set_index("method")
    assert board.loc["drib", "mechanism_control"] == "drib-static"
    assert board.loc["drib", "mechanism.top1.difference"] == 0.0
    assert board.loc["drib", "mechanism.top1.verdict"] == "no measured difference"
    assert pd.isna(board.loc["baseline", "mechanism.top1.verdict"])
    text = dynamism_markdown(board.reset_index())
    assert "| drib " in text and "0.960" in text and "| baseline" not in text
