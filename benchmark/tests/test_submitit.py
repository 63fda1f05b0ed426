"""The submitit launcher for real (issue 30, item 5): a two-job array through submitit's own local executor
(pickled job and context, one job folder per job, separate processes) writes the in-process leaderboard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmark.runner import run_preset

from .test_workers import comparable, two_jobs, with_start

submitit = pytest.importorskip("submitit")


@pytest.mark.slow
def test_local_submitit_array_writes_the_in_process_leaderboard(tmp_path: Path, smoke_start: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The array's processes load torch at the in-process thread count (results are identical at a fixed one).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    preset = two_jobs()
    here = run_preset(preset, with_start(tmp_path / "here", smoke_start), device="cpu", workers=1)
    array = run_preset(preset, with_start(tmp_path / "array", smoke_start), device="cpu", launcher="submitit",
                       launcher_options={"cluster": "local", "timeout_min": 30})
    results = tmp_path / "array" / "smoke"
    # submitit's "%j" folder holds submissions before their job id is known; each job then has its own folder.
    folders = sorted(p for p in (results / "submitit").iterdir() if p.is_dir() and "%" not in p.name)
    assert len(folders) == 2, folders  # one job folder each, holding the pickled call and its result
    for folder in folders:
        assert list(folder.glob("*_submitted.pkl")) and list(folder.glob("*_result.pkl")), sorted(folder.iterdir())
    for name in ("baseline-seed0", "l1-prune-t50-seed0"):
        log = (results / "runs" / name / "log.txt").read_text()
        assert f"(pid {os.getpid()}," not in log and "1 torch thread(s)" in log, log  # ran in its own process
    board = comparable(here["json"])
    assert [row["status"] for row in board[:2]] == ["ok", "ok"], board
    assert comparable(array["json"]) == board
