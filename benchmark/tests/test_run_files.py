"""Run files as a hostile or careless user leaves them (issue 26), through every CLI, in process.

A crafted pickle in any run file is refused unread (its payload never runs), a malformed one is one line
naming the file and what rebuilds it, a second process on one run directory is told the holder's pid, a NaN
top-1 is a failed row and a bad DRIB setting creates nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmark.__main__ import main as benchmark_main
from benchmark.jobs import Context, Job, job_config
from benchmark.presets import get_preset
from benchmark.start import start_path
from common.backbones import build_backbone
from common.run import atomic_torch_save, atomic_write_json, run_lock
from decoupling.__main__ import main as decoupling_main
from drib.__main__ import main as drib_main
from isp.__main__ import main as isp_main
from isp.train import save_backbone
from picnn.__main__ import main as picnn_main

CPU = ["--device", "cpu", "--threads", "1"]
TRAIN = ["--from-scratch", "--dataset", "digits", "--max-batches", "1", *CPU]


class _Payload:
    """Unpickling this object opens (creates) ``marker``: what a crafted run file would do to its reader."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _classifier(run: Path) -> None:
    """A real classifier.pt (ISP's first artefact) for the digits' 10 classes."""
    run.mkdir(parents=True, exist_ok=True)
    save_backbone(run / "classifier.pt", "resnet20", build_backbone("resnet20", 10), None)


def _isp_config(run: Path) -> None:
    atomic_write_json({"method": "isp", "backbone": "resnet20", "dataset": "digits", "data_root": None,
                       "budget": {"epochs": 1.0, "max_batches": 1}, "seed": 0, "settings": {}},
                      run / "config.json")


def _benchmark_run(results: Path, metrics: dict | None = None) -> tuple[Path, list[str]]:
    """A finished baseline-seed0 run of the smoke preset, as the benchmark writes it; the run folder and the
    matching ``--aggregate-only`` argv."""
    preset = get_preset("smoke", methods=("baseline",), seeds=(0,))
    ctx = Context(preset, results / preset.name)
    job = Job("baseline", 0)
    run = ctx.run_dir(job)
    run.mkdir(parents=True)
    atomic_write_json(job_config(ctx, job), run / "config.json")
    atomic_write_json(metrics or {"status": "finished", "method": "baseline", "seed": 0, "top1": 50.0,
                                  "mean_macs": 1e6}, run / "metrics.json")
    return run, ["--preset", "smoke", "--methods", "baseline", "--seeds", "0", "--out", str(results),
                 "--aggregate-only"]


# Each case: where the crafted file goes and the command that reads it, given a fresh folder.
Case = Callable[[Path], tuple[Callable[[list[str]], int], list[str], Path]]


def _drib_evaluate(tmp: Path):
    return drib_main, ["evaluate", "--run", str(tmp / "run"), *CPU], tmp / "run" / "model.pt"


def _drib_train(tmp: Path):
    return drib_main, ["train", "--out", str(tmp / "run"), *TRAIN], tmp / "run" / "checkpoint.pt"


def _picnn_evaluate(tmp: Path):
    (tmp / "run").mkdir()
    atomic_write_json({"dataset": "digits", "settings": {}}, tmp / "run" / "config.json")
    return picnn_main, ["evaluate", "--run", str(tmp / "run"), *CPU], tmp / "run" / "model.pt"


def _picnn_train(tmp: Path):
    return picnn_main, ["train", "--out", str(tmp / "run"), *TRAIN], tmp / "run" / "checkpoint.pt"


def _decoupling_evaluate(tmp: Path):
    (tmp / "run").mkdir()
    atomic_write_json({"dataset": "digits"}, tmp / "run" / "config.json")
    return decoupling_main, ["evaluate", "--run", str(tmp / "run"), *CPU], tmp / "run" / "model.pt"


def _decoupling_train(tmp: Path):
    return (decoupling_main, ["train", "--out", str(tmp / "run"), "--backbone", "resnet20", "--epochs", "1", *TRAIN],
            tmp / "run" / "checkpoint.pt")


def _isp_train_classifier(tmp: Path):
    return isp_main, ["train", "--out", str(tmp / "run"), *TRAIN], tmp / "run" / "classifier.pt"


def _isp_train_slim(tmp: Path):
    _classifier(tmp / "run")
    return isp_main, ["train", "--out", str(tmp / "run"), "--stage", "finetune", *TRAIN], tmp / "run" / "slim.pt"


def _isp_evaluate(tmp: Path):
    _classifier(tmp / "run")
    _isp_config(tmp / "run")
    return isp_main, ["evaluate", "--run", str(tmp / "run"), *CPU], tmp / "run" / "model.pt"


def _benchmark_explanations(tmp: Path):
    run, argv = _benchmark_run(tmp / "results")
    return benchmark_main, argv, run / "explanations.pt"


def _benchmark_start(tmp: Path):
    preset = get_preset("smoke", methods=("baseline",), seeds=(0,))
    argv = ["--preset", "smoke", "--methods", "baseline", "--seeds", "0", "--out", str(tmp / "results"), *CPU]
    return benchmark_main, argv, start_path(preset, tmp / "results" / preset.name)


CASES: dict[str, Case] = {
    "drib evaluate: model.pt": _drib_evaluate, "drib train (resume): checkpoint.pt": _drib_train,
    "picnn evaluate: model.pt": _picnn_evaluate, "picnn train (resume): checkpoint.pt": _picnn_train,
    "decoupling evaluate: model.pt": _decoupling_evaluate,
    "decoupling train (resume): checkpoint.pt": _decoupling_train,
    "isp train: classifier.pt": _isp_train_classifier, "isp train (finetune): slim.pt": _isp_train_slim,
    "isp evaluate: model.pt": _isp_evaluate,
    "benchmark --aggregate-only: explanations.pt": _benchmark_explanations,
    "benchmark: the cached start": _benchmark_start,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_crafted_run_file_is_refused_and_runs_nothing(case: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    main, argv, path = CASES[case](tmp_path)
    marker = tmp_path / "marker"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker), "state_dict": {}, "format": 1}, path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "refused unread" in err, err
    assert not marker.exists()  # the payload never ran
    torch.load(path, weights_only=False)  # ... and it is live: the unsafe way of loading runs it
    assert marker.exists()


def _truncated(path: Path) -> None:
    atomic_torch_save({"images": torch.zeros(1, 3, 4, 4), "labels": torch.zeros(1), "indices": torch.zeros(1),
                       "maps": torch.zeros(1, 4, 4)}, path)
    path.write_bytes(path.read_bytes()[:300])


MALFORMED: dict[str, tuple[Case, Callable[[Path], None], str, str]] = {
    # case, how the file is broken, what the message says about it, the rebuild it names
    "drib evaluate: model.pt without its config": (
        _drib_evaluate, lambda p: atomic_torch_save({"meta": {"backbone": "resnet20"}}, p), "has no 'config' entry",
        "python -m drib train --out"),
    "picnn evaluate: model.pt that is a list": (
        _picnn_evaluate, lambda p: atomic_torch_save([1, 2, 3], p), "holds a list", "python -m picnn train --out"),
    "isp evaluate: model.pt without its backbone": (
        _isp_evaluate, lambda p: atomic_torch_save({"state_dict": {}}, p), "has no 'backbone' entry",
        "python -m isp train --out"),
    "benchmark --aggregate-only: truncated explanations.pt": (
        _benchmark_explanations, _truncated, "is truncated", "python -m benchmark --preset smoke --out"),
    "benchmark --aggregate-only: explanations.pt without images": (
        _benchmark_explanations, lambda p: atomic_torch_save({"maps": torch.zeros(1, 4, 4)}, p), "lacks 'indices', "
        "'images', 'labels'", "python -m benchmark --preset smoke --out"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_a_malformed_run_file_is_one_line_naming_it_and_its_rebuild(case: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    setup, damage, says, rebuild = MALFORMED[case]
    main, argv, path = setup(tmp_path)
    damage(path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err and says in err and rebuild in err, err


def _hold(folders: list[str], ready) -> None:  # a forked second process: hold every lock until killed
    import contextlib

    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(run_lock(folder))
        ready.set()
        signal.pause()


LOCKED = {  # the CLI, its argv on folder OUT, and the folder it locks
    "drib train": (drib_main, lambda out: ["train", "--out", out, *TRAIN], lambda out: out),
    "picnn train": (picnn_main, lambda out: ["train", "--out", out, *TRAIN], lambda out: out),
    "decoupling train": (decoupling_main, lambda out: ["train", "--out", out, "--backbone", "resnet20", "--epochs",
                                                       "1", *TRAIN], lambda out: out),
    "isp train": (isp_main, lambda out: ["train", "--out", out, *TRAIN], lambda out: out),
    "benchmark": (benchmark_main, lambda out: ["--preset", "smoke", "--out", out, *CPU],
                  lambda out: str(Path(out) / "smoke")),
}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_second_process_on_one_out_exits_2_naming_the_holder(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    outs = {name: str(tmp_path / name.replace(" ", "-")) for name in LOCKED}
    folders = [locked(outs[name]) for name, (_, _, locked) in LOCKED.items()]
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold, args=(folders, ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(60)
        for name, (main, argv, _locked) in LOCKED.items():
            assert main(argv(outs[name])) == 2, name
            err = capsys.readouterr().err.strip()
            assert f"is in use by another process (pid {holder.pid} holds" in err and "--wait" in err, (name, err)
            assert len(err.splitlines()) == 1, err
            assert sorted(os.listdir(outs[name]) if name != "benchmark" else os.listdir(folders[-1])) == [".lock"]
        os.kill(holder.pid, signal.SIGKILL)  # a kill -9: the kernel drops its locks
        holder.join()
        for folder in folders:
            with run_lock(folder):
                pass
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()


def test_a_nan_top1_is_a_failed_row_not_a_finished_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, argv = _benchmark_run(tmp_path / "results")
    (run / "metrics.json").write_text('{"status": "finished", "method": "baseline", "seed": 0, "top1": NaN}')
    assert benchmark_main(argv) == 1
    err = capsys.readouterr().err
    assert "1 job(s) failed" in err and "baseline-seed0" in err and "not a finite accuracy" in err
    board = json.loads((tmp_path / "results" / "smoke" / "leaderboard.json").read_text())
    assert [row["status"] for row in board if row["method"] == "baseline"] == ["failed"]
    assert "NaN" not in (tmp_path / "results" / "smoke" / "leaderboard.json").read_text()


@pytest.mark.parametrize("setting", ["train.backbone_lr=-0.1", "decision.gate_lr=-1", "train.momentum=1.5"])
def test_a_bad_drib_setting_creates_nothing(setting: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert drib_main(["train", "--out", str(out), *TRAIN, "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert setting.split("=")[0] in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_an_undefined_credibility_is_null_with_its_reason(tmp_path: Path) -> None:
    from drib.verification import credibility_controls

    info = torch.ones(4, 8)  # every channel carries the same bits: the oracle is no better than random
    selected = torch.zeros(4, 8, dtype=torch.bool)
    selected[:, :3] = True
    _, summary = credibility_controls(info, selected, selected[0])
    assert summary["credibility_oracle"] == pytest.approx(summary["credibility_random"])
    atomic_write_json(summary, tmp_path / "metrics.json")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["credibility_normalised"] is None
    assert "oracle" in written["credibility_normalised_reason"]
    # defined: no reason key
    info[:, :3] = 5.0
    _, summary = credibility_controls(info, selected, selected[0])
    assert summary["credibility_normalised"] == pytest.approx(1.0) and "credibility_normalised_reason" not in summary
