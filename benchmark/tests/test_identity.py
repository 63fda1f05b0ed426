"""A run's identity is its config; failed jobs fail the command; bad flags and missing inputs are one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from benchmark import jobs, runner
from benchmark.__main__ import main
from benchmark.presets import get_preset
from benchmark.runner import NoRunsError, run_preset
from common.run import ConfigMismatchError

from .fakes import broken, registry_of, static_copy


def _cheap(**changes: object):
    smoke = get_preset("smoke")
    metrics = replace(smoke.metrics, mis_images=0, latency_batches=(1,), latency_repeats=1, explain_images=2,
                      figure_images=1)
    return replace(smoke, methods=("copy",), metrics=metrics, **changes)


def _board(results: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((results / "smoke" / "leaderboard.json").read_text())).set_index("method")


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a finished job was run again")


def test_changed_config_is_refused_then_replaced_and_same_config_is_reused(results_with_start: Path) -> None:
    run_preset(_cheap(), results_with_start, device="cpu", registry=registry_of(copy=static_copy))
    metrics = results_with_start / "smoke" / "runs" / "copy-seed0" / "metrics.json"
    first = metrics.read_bytes()
    # The same config: the finished run is reused, whatever the device flag says.
    run_preset(_cheap(), results_with_start, device=None, registry=registry_of(copy=_must_not_run))
    assert metrics.read_bytes() == first

    changed = _cheap(epochs=3.0, max_batches=50)
    with pytest.raises(ConfigMismatchError) as info:
        run_preset(changed, results_with_start, device="cpu", registry=registry_of(copy=_must_not_run))
    message = str(info.value)
    for needle in ("copy-seed0", "budget.epochs: 1 -> 3.0", "budget.max_batches: 3 -> 50", "new --out",
                   "--replace-changed"):
        assert needle in message, needle
    assert metrics.read_bytes() == first  # refused: nothing touched
    with pytest.raises(ConfigMismatchError, match="aggregate-only"):
        run_preset(changed, results_with_start, device="cpu", skip_training=True,
                   registry=registry_of(copy=static_copy))

    calls = []

    def recording(*args: object, **kwargs: object):
        calls.append(kwargs["settings"])
        return static_copy(*args, **kwargs)

    run_preset(changed, results_with_start, device="cpu", registry=registry_of(copy=recording),
               replace_changed=True)
    assert len(calls) == 1
    stored = json.loads((metrics.parent / "config.json").read_text())
    assert stored["budget"]["epochs"] == 3.0 and stored["budget"]["max_batches"] == 50


def test_a_checkpoint_is_never_resumed_into_another_config(results_with_start: Path) -> None:
    preset = _cheap()
    ctx = jobs.Context(preset, results_with_start / "smoke", device="cpu")
    job = jobs.Job("copy", 0)
    run_dir = ctx.run_dir(job)
    run_dir.mkdir(parents=True)
    old = jobs.job_config(jobs.Context(_cheap(batch_size=32), ctx.results_dir), job)
    (run_dir / "config.json").write_text(json.dumps(old))
    (run_dir / "method").mkdir()
    (run_dir / "method" / "checkpoint.pt").write_bytes(b"from another config")
    with pytest.raises(ConfigMismatchError, match="batch_size: 32 -> 64"):
        jobs.run_job(job, ctx, registry_of(copy=_must_not_run))
    assert (run_dir / "method" / "checkpoint.pt").read_bytes() == b"from another config"


def test_corrupt_metrics_is_a_failed_row_and_the_cli_exits_non_zero(results_with_start: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    preset = replace(_cheap(), methods=("copy", "broken"))
    fakes = registry_of(copy=static_copy, broken=broken)
    run_preset(preset, results_with_start, device="cpu", registry=fakes)
    metrics = results_with_start / "smoke" / "runs" / "copy-seed0" / "metrics.json"
    metrics.write_text('{"status": "finished", "top1": 9')  # a truncated file
    run_preset(preset, results_with_start, device="cpu", skip_training=True, registry=fakes)
    board = _board(results_with_start)
    assert board.loc["copy", "status"] == "failed" and "not valid JSON" in board.loc["copy", "error"]
    assert board.loc["broken", "status"] == "failed" and "injected failure" in board.loc["broken", "error"]

    # The CLI writes the leaderboard with the failed rows, then exits 1 naming the failed jobs.
    monkeypatch.setattr(runner, "default_registry", lambda: fakes)
    monkeypatch.setattr(jobs, "default_registry", lambda: fakes)
    argv = ["--preset", "smoke", "--out", str(results_with_start), "--methods", "copy,broken", "--device", "cpu",
            "--set", "metrics.mis_images=0", "--set", "metrics.latency_batches=1", "--set",
            "metrics.latency_repeats=1", "--set", "metrics.explain_images=2", "--set", "metrics.figure_images=1",
            "--workers", "1"]  # in this process: the patched registry does not reach spawned workers
    assert main([*argv, "--aggregate-only"]) == 1
    err = capsys.readouterr().err
    assert "2 job(s) failed" in err and "copy-seed0" in err and "broken-seed0" in err
    # A training run re-runs the job whose metrics were corrupt; the broken one still fails the command.
    assert main(argv) == 1
    assert _board(results_with_start).loc["copy", "status"] == "ok"
    assert (metrics.parent / "metrics.json.corrupt").is_file()
    assert "1 job(s) failed" in capsys.readouterr().err


def test_aggregate_only_without_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NoRunsError, match="no run of preset 'smoke'"):
        run_preset(_cheap(), tmp_path / "typo", device="cpu", skip_training=True,
                   registry=registry_of(copy=static_copy))
    assert main(["--preset", "smoke", "--out", str(tmp_path / "typo"), "--aggregate-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m benchmark: error: --aggregate-only: no run") and "check --out" in err
    assert not (tmp_path / "typo" / "smoke" / "leaderboard.md").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--epochs", "0"], "--epochs must be a positive number, got 0.0"),
    (["--epochs", "-1"], "--epochs must be a positive number"),
    (["--max-batches", "-3"], "--max-batches must be a positive number, got -3"),
    (["--budget-seconds", "-5"], "--budget-seconds must be a positive number"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--set", "batch_size=fast"], "--set batch_size=fast: expected an integer, got 'fast'"),
    (["--set", "nonsense=1"], "unknown key 'nonsense'"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       argv: list[str], needle: str) -> None:
    assert main(["--preset", "smoke", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "smoke").exists()  # nothing written


def test_out_pointing_at_a_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main(["--preset", "smoke", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_missing_data_and_weights_are_one_message_with_every_fetch_command(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    code = main(["--preset", "cifar10-cpu", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "data"),
                 "--weights-dir", str(tmp_path / "weights"), "--methods", "baseline"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("python -m benchmark: error:") == 1 and "2 input(s) missing" in err
    for needle in ("cifar-10-python.tar.gz", f"tar -xz -C {tmp_path / 'data'}", "resnet20-12fca82f.th",
                   "akamaster/pytorch_resnet_cifar10", f"curl -L -o {tmp_path / 'weights' / 'resnet20-12fca82f.th'}",
                   "--weights-dir", "--download", "nox -s leaderboard --"):
        assert needle in err, needle
    assert "Traceback" not in err
