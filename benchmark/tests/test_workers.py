"""Parallel single-thread workers (issue 30, item 6): the figures of a 1-thread serial run, the start trained
once before they spawn, and a job started beside a busy machine says so in its log."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from benchmark import jobs, runner
from benchmark.__main__ import main
from benchmark.presets import PER_CORE, get_preset
from benchmark.runner import resolve_workers, run_preset
from benchmark.start import start_path

from .fakes import registry_of, static_copy

# Seconds and where they were measured: the only columns two runs of one config may disagree on.
TIMING = ("latency_", "speedup_", "train_seconds", "wall_seconds", "machine")


def comparable(path: Path) -> list[dict]:
    """leaderboard.json without its timing columns."""
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in json.loads(path.read_text())]


def two_jobs() -> object:
    """The smoke preset cut to two real jobs (the plain baseline and L1 pruning at 50%) and cheap metrics."""
    smoke = get_preset("smoke")
    metrics = replace(smoke.metrics, mis_images=30, latency_batches=(1,), latency_repeats=1, latency_rounds=1,
                      explain_images=4, figure_images=1, sanity_images=2, sanity_stages=1, game_points=5,
                      road_fractions=(0.5,))
    return replace(smoke, methods=("baseline", "l1-prune"), targets=(0.5,), metrics=metrics)


def with_start(folder: Path, smoke_start: Path) -> Path:
    target = start_path(get_preset("smoke"), folder / "smoke")
    target.parent.mkdir(parents=True)
    shutil.copy(smoke_start, target)
    return folder


@pytest.mark.slow
def test_two_single_thread_workers_give_the_serial_leaderboard(tmp_path: Path, smoke_start: Path) -> None:
    preset = two_jobs()
    serial = run_preset(preset, with_start(tmp_path / "serial", smoke_start), device="cpu", workers=1)
    parallel = run_preset(preset, with_start(tmp_path / "parallel", smoke_start), device="cpu", workers=2,
                          threads=1)
    runs = tmp_path / "parallel" / "smoke" / "runs"
    logs = {name: (runs / name / "log.txt").read_text() for name in ("baseline-seed0", "l1-prune-t50-seed0")}
    pids = {line.split("(pid ")[1].split(",")[0] for text in logs.values() for line in text.splitlines()
            if "(pid " in line}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two processes ran them, not this one
    assert all("1 torch thread(s)" in text for text in logs.values())
    board = comparable(serial["json"])
    assert [row["method"] for row in board][:2] == ["baseline", "l1-prune"]
    assert all(row["status"] == "ok" for row in board[:2]), board
    assert board == comparable(parallel["json"])
    csv = [line.split(",") for line in serial["csv"].read_text().splitlines()]
    other = [line.split(",") for line in parallel["csv"].read_text().splitlines()]
    keep = [i for i, name in enumerate(csv[0]) if not name.startswith(TIMING)]
    assert [[row[i] for i in keep] for row in csv] == [[row[i] for i in keep] for row in other]


def test_a_job_beside_a_busy_machine_says_so_in_its_log(results_with_start: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "usable_cores", lambda: 2)
    preset = replace(two_jobs(), methods=("copy",))
    ctx = jobs.Context(preset, results_with_start / "smoke", device="cpu")
    log = ctx.run_dir(jobs.Job("copy", 0)) / "log.txt"
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 1.0, 1.0))  # 3.5 runnable on 2 cores: busy
    assert jobs.run_job(jobs.Job("copy", 0), ctx, registry_of(copy=static_copy)) == "finished"
    assert "WARNING machine busy at job start: 1-minute load 3.50 on 2 core(s)" in log.read_text()
    # Idle, or loaded only by this run's other worker: no warning.
    assert jobs.busy_machine_warning(1) is not None
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 1.0, 1.0))
    assert jobs.busy_machine_warning(1) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    assert jobs.busy_machine_warning(1) is not None
    assert jobs.busy_machine_warning(1, siblings=1) is None


def test_worker_count_follows_preset_device_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(runner, "usable_cores", lambda: 3)
    assert get_preset("smoke").workers == get_preset("cifar10-cpu").workers == PER_CORE
    assert resolve_workers(get_preset("smoke"), None, "cpu") == 3
    assert resolve_workers(get_preset("smoke"), 1, "cpu") == 1
    assert resolve_workers(get_preset("cifar10"), None, "cpu") == 1  # the GPU preset runs one job at a time
    with pytest.raises(ValueError, match="registry passed in"):
        run_preset(replace(two_jobs(), methods=("copy",)), tmp_path, device="cpu",
                   registry=registry_of(copy=static_copy), workers=2)
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--workers must be a positive number, got 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "smoke").exists()
