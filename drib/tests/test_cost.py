"""python -m drib cost on digits with tiny settings: it runs, writes cost.json, and its projection is the
arithmetic its docstring states (never wall-clock figures)."""

import json
import math

import pytest

from drib.__main__ import main

TINY = {"decision": {"actions": 4, "codebook_init": "importance", "alternate": False, "init_images": 64},
        "train": {"batch_size": 32, "finetune_fraction": 0.5, "precision": "fp32"}}


def _recipe(tmp_path, **settings) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"description": "tiny", "backbone": "resnet20", "dataset": "digits", "epochs": 1,
                                "settings": {**TINY, **settings}}))
    return str(path)


def _check(report: dict) -> None:
    n, dec, ft, ce = report["steps"], report["decision_steps"], report["finetune_steps"], report["steps_per_epoch"]
    assert n == 2 * ce and dec + ft == n and dec == round(n * 0.5)  # --epochs 2, finetune_fraction 0.5
    drib = dec * report["decision_step_s"] + ft * report["finetune_step_s"]
    assert math.isclose(report["step_ratio"], drib / (n * report["cross_entropy_step_s"]))
    assert report["cross_entropy_validations"] == 2
    assert math.isclose(report["drib_run_s"], drib + sum(report["calibration_s"])
                        + report["drib_validations"] * report["validation_s"])
    assert math.isclose(report["cross_entropy_run_s"], n * report["cross_entropy_step_s"]
                        + 2 * report["cross_entropy_validation_s"])
    assert math.isclose(report["epoch_ratio"], report["drib_run_s"] / report["cross_entropy_run_s"])
    assert report["threads"] == 1 and report["precision"].startswith("fp32")


def test_cost_times_both_steps_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "cost"
    assert main(["cost", "--config", _recipe(tmp_path), "--from-scratch", "--device", "cpu", "--steps", "1",
                 "--warmup", "0", "--epochs", "2", "--separate-backward", "--out", str(out)]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert "epoch_ratio:" in capsys.readouterr().out
    assert report["dataset"] == "digits" and report["timed_steps"] == 1
    assert report["calibration_s"] == [] and report["drib_validations"] == 2  # no target: no calibration
    assert report["separate_backward_step_s"] > 0
    _check(report)


def test_cost_refuses_what_it_cannot_time(tmp_path, capsys):
    base = ["cost", "--config", _recipe(tmp_path), "--from-scratch", "--device", "cpu"]
    assert main([*base, "--steps", "0"]) == 2
    assert main([*base, "--set", "decision.alternate=true", "--separate-backward"]) == 2
    assert "alternate=false" in capsys.readouterr().err


@pytest.mark.slow
def test_cost_counts_the_mac_calibrations(tmp_path):
    out = tmp_path / "cost"
    assert main(["cost", "--config", _recipe(tmp_path, target_mac_reduction=0.5), "--from-scratch", "--device",
                 "cpu", "--steps", "1", "--warmup", "0", "--epochs", "2", "--out", str(out)]) == 0
    report = json.loads((out / "cost.json").read_text())
    assert len(report["calibration_s"]) == len(report["calibrations"]) == 2
    assert all(c["target"] == 0.5 for c in report["calibrations"])
    _check(report)
