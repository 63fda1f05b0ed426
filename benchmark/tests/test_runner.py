"""The runner: outputs, failed rows, resume after a kill, and the metrics of a dynamic model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from benchmark.baseline import run_method as baseline_run_method
from benchmark.leaderboard import CONTROL_ROWS
from benchmark.metrics import COLUMNS
from benchmark.presets import get_preset
from benchmark.runner import run_preset

from .fakes import broken, half_dynamic, interrupted, registry_of, static_copy

OUTPUTS = ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "runs.csv", "pareto.png", "explanations.png")


def _board(results: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((results / "smoke" / "leaderboard.json").read_text())).set_index("method")


@pytest.mark.slow
def test_failing_method_gives_failed_row_and_the_rest_complete(results_with_start: Path) -> None:
    preset = replace(get_preset("smoke"), methods=("baseline", "broken", "dynamic"))
    registry = registry_of(baseline=baseline_run_method, broken=broken, dynamic=half_dynamic)
    paths = run_preset(preset, results_with_start, device="cpu", registry=registry)
    for name in OUTPUTS:
        assert (results_with_start / "smoke" / name).stat().st_size > 0, name
    board = _board(results_with_start)
    assert list(board.index) == ["baseline", "broken", "dynamic", *CONTROL_ROWS]
    assert board.loc["broken", "status"] == "failed"
    assert "injected failure" in board.loc["broken", "error"]
    assert "injected failure" in paths["md"].read_text()
    for method in ("baseline", "dynamic"):
        assert board.loc[method, "status"] == "ok"
        assert all(pd.notna(board.loc[method, f"{c}_mean"]) for c in COLUMNS), method
    # The dynamic stand-in reports half the dense MACs: the benchmark must turn that into a 50% reduction.
    assert board.loc["dynamic", "mac_reduction_pct_mean"] == pytest.approx(50.0)
    assert board.loc["dynamic", "dynamic_filter_share_mean"] == pytest.approx(0.5)
    assert board.loc["baseline", "dynamic_filter_share_mean"] == 0.0
    assert board.loc["baseline", "delta_top1_mean"] == 0.0
    # A method without its own saliency is scored with the common Grad-CAM; one with its own is not.
    runs = pd.read_csv(results_with_start / "smoke" / "runs.csv").set_index("method")
    assert runs.loc["baseline", "own_explainer"] == "gradcam"
    assert runs.loc["dynamic", "own_explainer"] == "method"


@pytest.mark.slow
def test_kill_mid_run_then_rerun_skips_finished_jobs(results_with_start: Path) -> None:
    smoke = get_preset("smoke")
    cheap = replace(smoke.metrics, mis_images=0, latency_batches=(1,))  # this test is about resuming
    preset = replace(smoke, methods=("copy", "second"), seeds=(0, 1), metrics=cheap)
    killing = registry_of(copy=static_copy, second=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_preset(preset, results_with_start, device="cpu", registry=killing)
    runs = results_with_start / "smoke" / "runs"
    finished = [runs / "copy-seed0" / "metrics.json", runs / "copy-seed1" / "metrics.json"]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished}
    assert (runs / "second-seed0" / "config.json").is_file()  # the killed job had started...
    assert not (runs / "second-seed0" / "metrics.json").exists()  # ...and is not taken as finished

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished job was run again")

    resumed = registry_of(copy=must_not_run, second=static_copy)
    run_preset(preset, results_with_start, device="cpu", registry=resumed)
    for path, (mtime, content) in stamps.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    board = _board(results_with_start)
    assert set(board["status"]) == {"ok"}
    assert board.loc["second", "seeds_finished"] == 2
    # Two seeds give a standard deviation: the seeds of one method see the same start, so top-1 agrees.
    assert board.loc["copy", "top1_std"] == pytest.approx(0.0)


def test_unknown_method_is_rejected_before_running(results_with_start: Path) -> None:
    preset = replace(get_preset("smoke"), methods=("baseline", "nonexistent"))
    with pytest.raises(ValueError, match="unknown method"):
        run_preset(preset, results_with_start, device="cpu")


class _FakeExecutor:
    """Stands in for submitit.AutoExecutor (not installed here): runs the array inline, records calls."""

    calls: ClassVar[dict] = {}

    def __init__(self, folder: Path) -> None:
        self.calls["folder"] = folder

    def update_parameters(self, **params: object) -> None:
        self.calls["params"] = params

    def map_array(self, fn, *iterables):
        self.calls["jobs"] = list(iterables[0])
        results = [fn(*args) for args in zip(*iterables)]
        return [type("Handle", (), {"result": lambda self, r=r: r})() for r in results]


@pytest.mark.slow
def test_submitit_launcher_submits_only_unfinished_jobs(results_with_start: Path, monkeypatch) -> None:
    import sys
    import types

    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=_FakeExecutor))
    smoke = get_preset("smoke")
    preset = replace(smoke, methods=("baseline",), seeds=(0, 1),
                     metrics=replace(smoke.metrics, mis_images=0, latency_batches=(1,)))
    run_preset(preset, results_with_start, device="cpu", launcher="submitit",
               launcher_options={"slurm_partition": "gpu"})
    assert [job.name for job in _FakeExecutor.calls["jobs"]] == ["baseline-seed0", "baseline-seed1"]
    assert _FakeExecutor.calls["params"]["slurm_partition"] == "gpu"
    assert "gpus_per_node" not in _FakeExecutor.calls["params"]  # --device cpu asks for no GPU
    (results_with_start / "smoke" / "runs" / "baseline-seed1" / "metrics.json").unlink()
    run_preset(preset, results_with_start, device="cpu", launcher="submitit")
    assert [job.name for job in _FakeExecutor.calls["jobs"]] == ["baseline-seed1"]
    assert _board(results_with_start).loc["baseline", "seeds_finished"] == 2
