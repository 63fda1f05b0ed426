"""The benchmark command as a user meets it (issue 19): a failed job fails the command after the leaderboard
is written, bad budgets and devices are one line, and a kill or Ctrl-C is one line too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark import jobs, runner
from benchmark.__main__ import main

from .fakes import broken, interrupted, registry_of, static_copy

CHEAP = ["--preset", "smoke", "--device", "cpu", "--set", "targets=0.5", "--set", "metrics.mis_images=0",
         "--set", "metrics.latency_batches=1", "--set", "metrics.latency_repeats=1",
         "--set", "metrics.explain_images=2", "--set", "metrics.figure_images=1",
         "--workers", "1"]  # in this process: the patched registry does not reach spawned workers


def _use(monkeypatch: pytest.MonkeyPatch, **entries: object) -> None:
    fakes = registry_of(**entries)
    monkeypatch.setattr(runner, "default_registry", lambda: fakes)
    monkeypatch.setattr(jobs, "default_registry", lambda: fakes)


def test_a_failed_job_writes_its_row_then_exits_1(results_with_start: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    _use(monkeypatch, copy=static_copy, broken=broken)
    code = main([*CHEAP, "--out", str(results_with_start), "--methods", "copy,broken"])
    captured = capsys.readouterr()
    assert code == 1
    assert "1 job(s) failed" in captured.err and "broken-seed0" in captured.err and "injected failure" in captured.err
    board = {row["method"]: row for row in json.loads((results_with_start / "smoke" / "leaderboard.json").read_text())}
    assert board["broken"]["status"] == "failed" and board["copy"]["status"] == "ok"
    # Once the broken method is dropped the same folder is a success: the finished copy run is reused.
    _use(monkeypatch, copy=lambda *a, **k: pytest.fail("a finished job ran again"))
    assert main([*CHEAP, "--out", str(results_with_start), "--methods", "copy"]) == 0


def test_ctrl_c_inside_a_job_is_one_line_and_resumable(results_with_start: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("ICNN_TRACEBACK", raising=False)
    _use(monkeypatch, copy=interrupted)
    assert main([*CHEAP, "--out", str(results_with_start), "--methods", "copy"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    _use(monkeypatch, copy=static_copy)
    assert main([*CHEAP, "--out", str(results_with_start), "--methods", "copy"]) == 0


@pytest.mark.parametrize(("argv", "needle"), [
    (["--set", "max_batches=0"], "must be a positive number, got 0"),
    (["--set", "epochs=-1"], "must be a positive number"),
    (["--max-batches", "0"], "--max-batches must be a positive number, got 0"),
    (["--threads", "0"], "--threads must be a positive number"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
])
def test_budgets_from_set_and_devices_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      argv: list[str], needle: str) -> None:
    assert main(["--preset", "smoke", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "smoke").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda': CUDA is not available on this machine; use --device cpu" in err
    assert not (tmp_path / "smoke").exists()
