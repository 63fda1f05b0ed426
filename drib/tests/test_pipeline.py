"""End to end on the embedded digits dataset with tiny settings: run_method, resume, CLI."""

import argparse
import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import load_dataset
from common.method import SHARED_METRIC_KEYS, Budget, shared_metric_problems
from drib import load_run, run_method
from drib.__main__ import build_parser, main

TINY = {"decision": {"actions": 4, "codebook_init": "importance", "target": 0.7, "init_images": 64},
        "bottleneck": {"steps": 2, "copies": 2, "estimator_samples": 64},
        "train": {"batch_size": 32, "log_every": 1}}


def recipe(settings: dict, **top) -> str:
    """A recipe file's text in the one layout of drib/configs/*.json."""
    return json.dumps({"description": "tiny test recipe", "backbone": "resnet20", "dataset": "digits",
                       "epochs": 1, "settings": settings, **top})


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    data.val = data.val.subset(range(64))
    data.test = data.test.subset(range(64))
    return data


def test_run_method_returns_a_dynamic_model_and_resumes(tmp_path, digits):
    start = build_backbone("resnet20", num_classes=digits.num_classes)
    result = run_method(start, digits, Budget(epochs=1, max_batches=3), tmp_path, device="cpu", settings=TINY)
    x = digits.test.images[:5].float() / 255
    logits, macs = result.dynamic_forward(x)
    with torch.no_grad():
        assert torch.allclose(logits, result.model.eval()(x), atol=1e-4)
    dense = result.model.dense_backbone_macs()
    assert macs.shape == (5,) and macs.dtype == torch.float64 and (macs < dense).all()
    maps = result.saliency(x[:2], torch.tensor([0, 1]))
    assert maps.shape == (2, 32, 32) and (maps >= 0).all()
    assert 0.0 <= result.dynamic_filter_share <= 1.0
    assert result.mis_layer is result.model.backbone.cam_layer()
    assert {"val_top1", "val_mac_reduction"} <= set(result.metrics) and result.train_seconds > 0
    assert shared_metric_problems(result.metrics) == [] and result.metrics["split"].startswith("test")
    assert result.metrics["precision"] == "fp32" and result.metrics["target_mac_reduction"] is None
    assert not {"acc1", "top1_after", "test_split", "macs_mean"} & set(result.metrics)
    masks = result.model.channel_masks(x)
    assert len(masks) == 9 and masks[0].shape == (5, 16)
    # a second call finds model.pt and does not train again
    before = (tmp_path / "checkpoint.pt").stat().st_mtime
    again = run_method(build_backbone("resnet20", num_classes=digits.num_classes), digits,
                       Budget(epochs=1, max_batches=3), tmp_path, device="cpu", settings=TINY)
    assert (tmp_path / "checkpoint.pt").stat().st_mtime == before
    assert torch.equal(again.dynamic_forward(x)[1], macs)


def test_load_run_gives_the_logits_of_the_runs_own_evaluation(tmp_path, digits):
    from common.speed import class_mixed_images
    from drib.evaluate import accuracy_and_macs
    from drib.sparse_inference import sparse_forward

    start = build_backbone("resnet20", num_classes=digits.num_classes)
    result = run_method(start, digits, Budget(epochs=1, max_batches=2), tmp_path, settings=TINY)  # default device
    net = load_run(tmp_path, device="cpu")
    assert isinstance(net, torch.nn.Module) and not net.training
    x = class_mixed_images(digits.test, 16)  # pixels in [0, 1], every class
    with torch.no_grad():
        logits = net(x)
        evaluated, _ = sparse_forward(net, x)  # what evaluate's top-1 is computed from
    assert logits.shape == (16, digits.num_classes)
    assert torch.allclose(logits, evaluated, atol=1e-4) and torch.equal(logits.argmax(1), evaluated.argmax(1))
    where = next(result.model.parameters()).device  # run_method's default: CUDA when available, else CPU
    with torch.no_grad():
        assert torch.allclose(logits, result.model.eval()(x.to(where)).cpu(), atol=1e-4)  # the same network
    ours, theirs = accuracy_and_macs(net, digits, torch.device("cpu")), result.metrics
    assert {k: ours[k] for k in SHARED_METRIC_KEYS} == pytest.approx({k: theirs[k] for k in SHARED_METRIC_KEYS})
    with pytest.raises(FileNotFoundError, match="train into"):
        load_run(tmp_path / "nothing")


def test_training_resumes_from_checkpoint(tmp_path, digits):
    from common.loop import CHECKPOINT_FORMAT
    from drib.config import DribSettings
    from drib.model import DynamicNetwork
    from drib.train import train

    config = DribSettings.from_dict(TINY)
    net = DynamicNetwork(build_backbone("resnet20", num_classes=10), config.decision)
    train(net, digits, Budget(epochs=1, max_batches=2), tmp_path, config, torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # common.loop's one layout
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["stage"] == "drib" and ckpt["step"] == 2
    assert set(ckpt["state"]) == {"model", "gate_opt", "backbone_opt"} and {"torch", "numpy"} <= set(ckpt["rng"])
    assert [h["epoch"] for h in ckpt["extra"]["history"]] == [1] and ckpt["extra"]["best"]["epoch"] == 1
    before = (tmp_path / "checkpoint.pt").read_bytes()
    again = DynamicNetwork(build_backbone("resnet20", num_classes=10), config.decision)
    outcome = train(again, digits, Budget(epochs=1, max_batches=2), tmp_path, config, torch.device("cpu"))
    assert outcome.steps == 2 and (tmp_path / "checkpoint.pt").read_bytes() == before  # finished: no step
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    net2 = DynamicNetwork(build_backbone("resnet20", num_classes=10), config.decision)
    train(net2, digits, Budget(epochs=2, max_batches=2), tmp_path, config, torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and [h["epoch"] for h in ckpt["extra"]["history"]] == [1, 2]


def test_time_budget_stop_validates_saves_and_resumes(tmp_path, digits):
    from common.data import BatchLoader
    from drib.config import DribSettings
    from drib.model import DynamicNetwork
    from drib.train import train

    settings = {**TINY, "train": {**TINY["train"], "finetune_fraction": 0.5, "finetune_augment": True}}
    config = DribSettings.from_dict(settings)
    # the fine-tuning share swaps in the augmented copy of the same batch: same images, same order
    plain, augmented = (BatchLoader(digits.train, 32, train=True, augment=a, seed=0) for a in (False, True))
    assert all(torch.equal(y, y_aug) for (_, y), (_, y_aug) in zip(plain, augmented))
    net = DynamicNetwork(build_backbone("resnet20", num_classes=10), config.decision)
    outcome = train(net, digits, Budget(epochs=1, max_batches=4, seconds=1e-9), tmp_path, config,
                    torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert outcome.steps == 1 and ckpt["step"] == 1 and ckpt["stopped_on_time"]
    extra = ckpt["extra"]
    assert [h.get("partial") for h in extra["history"]] == [True] and extra["best"]["step"] == 1
    net2 = DynamicNetwork(build_backbone("resnet20", num_classes=10), config.decision)
    outcome = train(net2, digits, Budget(epochs=1, max_batches=4), tmp_path, config, torch.device("cpu"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert outcome.steps == 4 and [h["step"] for h in ckpt["extra"]["history"]] == [1, 4]


def test_unknown_config_keys_are_rejected():
    from drib.config import DribSettings

    with pytest.raises(ValueError, match="unknown key"):
        DribSettings.from_dict({"decision": {"actoins": 3}})
    with pytest.raises(ValueError, match="regulariser"):
        DribSettings.from_dict({"decision": {"regulariser": "l1"}})


@pytest.mark.slow
def test_cli_train_evaluate_explain(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(recipe(TINY, epochs=0.5))
    run = tmp_path / "run"
    # backbone, dataset and epochs come from the recipe; --set reaches into its sections
    assert main(["train", "--from-scratch", "--max-batches", "2", "--out", str(run), "--config", str(config),
                 "--device", "cpu", "--set", "decision.actions=3", "--set", "train.batch_size=16"]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["drib"]["decision"]["actions"] == 3 and recorded["drib"]["train"]["batch_size"] == 16
    assert (recorded["backbone"], recorded["dataset"], recorded["budget"]["epochs"]) == ("resnet20", "digits", 0.5)
    for name in ("config.json", "environment.json", "log.txt", "checkpoint.pt", "model.pt"):
        assert (run / name).is_file(), name
    out = tmp_path / "elsewhere"  # --out: metrics.json there, the run directory untouched
    assert main(["evaluate", "--run", str(run), "--images", "3", "--degradation-points", "3", "--betas", "1,10",
                 "--thresholds", "0.9", "--device", "cpu", "--precision", "fp32", "--out", str(out)]) == 0
    assert not (run / "metrics.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert shared_metric_problems(metrics) == [] and metrics["precision"] == "fp32"
    for key in ("macs_dense", "credibility_own", "credibility_random", "credibility_other", "credibility_static",
                "credibility_oracle", "iba_deletion_4px_auc", "iba_insertion_2px_auc", "gradcam_insertion_4px_auc",
                "random_insertion_4px_auc", "centre_deletion_2px_auc", "iba_degradation_2px_score"):
        assert key in metrics, key
    assert not {"test_split", "macs_mean", "acc1"} & set(metrics)
    assert metrics["split"].startswith("test") and metrics["bottleneck_layer"] == "layer2.1"
    assert metrics["attribution_subset"] == 3 and set(metrics["credibility_sweep"]) == {"1", "10"}
    assert 0 <= metrics["credibility_own"] <= 1 and metrics["macs"] < metrics["macs_dense"]
    assert metrics["credibility_oracle"] >= metrics["credibility_own"] - 1e-6
    loop = metrics["verification_in_the_loop"]
    assert loop["0.9_dense"]["macs_mean"] >= loop["plain_macs_mean"]
    assert main(["explain", "--run", str(run), "--images", "2", "--device", "cpu", "--threads", "1",
                 "--precision", "fp32"]) == 0
    assert sorted(p.name for p in (run / "explain").iterdir()) == ["explain_0.png", "explain_1.png"]
    assert all(p.stat().st_size > 10_000 for p in (run / "explain").iterdir())
    assert main(["explain", "--run", str(run), "--images", "100000", "--device", "cpu"]) == 2
    assert "--images must be at most" in capsys.readouterr().err


def test_help_lists_every_command_and_every_documented_flag_parses(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    for command in ("train", "evaluate", "explain", "cost"):
        assert f"    {command} " in top, command
    shared = ["--run", "R", "--out", "O", "--images", "4", "--device", "cpu", "--threads", "1", "--precision",
              "fp32", "--data-root", "D", "--download", "--val-source", "train"]
    for command in ("evaluate", "explain"):
        args = parser.parse_args([command, *shared])
        assert (args.run, args.out, args.images, args.precision, args.val_source) == ("R", "O", 4, "fp32", "train")
    args = parser.parse_args(["train", "--out", "O", "--config", "C", "--epochs", "2", "--budget-seconds", "9",
                              "--max-batches", "3", "--set", "train.backbone_lr=0.02", "--precision", "bf16"])
    assert (args.budget_seconds, args.set) == (9.0, ["train.backbone_lr=0.02"])
    for gone in (["evaluate", "--run", "R", "--subset", "3"], ["explain", "--run", "R", "--index", "3"],
                 ["train", "--out", "O", "--max-seconds", "9"], ["train", "--out", "O", "--seconds", "9"]):
        with pytest.raises(SystemExit):
            parser.parse_args(gone)
    capsys.readouterr()
    # every flag that drib/README.md's commands use is one this parser knows
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = re.findall(r"python -m drib (train|evaluate|explain|cost)((?:[^\n]|\\\n)*)", readme)
    assert commands
    commands_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = {c: {o for a in sub._actions for o in a.option_strings} for c, sub in commands_action.choices.items()}
    for command, rest in commands:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert flag in known[command], (command, flag)


def test_every_recipe_has_the_one_layout_and_valid_settings():
    from common.method import RECIPE_KEYS
    from drib.config import read_recipe

    paths = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
    assert paths
    for path in paths:
        assert list(json.loads(path.read_text())) == list(RECIPE_KEYS), path.name
        loaded = read_recipe(path)
        assert loaded.backbone in path.name and loaded.dataset in path.name and loaded.epochs > 0
    assert read_recipe(paths[0].parent / "resnet20_cifar10_cpu_25min.json").settings.target_mac_reduction == 0.3


def test_a_recipe_in_another_layout_is_refused(tmp_path, capsys):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(TINY))  # the settings alone, without description/backbone/dataset/epochs
    assert main(["train", "--from-scratch", "--config", str(flat), "--out", str(tmp_path / "r")]) == 2
    assert "a recipe has exactly the keys" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(recipe({"decision": {"actoins": 3}}))
    assert main(["train", "--from-scratch", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "actoins" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "r")]) == 2
    assert "--weights PATH is required" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--weights", str(tmp_path / "missing.th"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "train into" in capsys.readouterr().err
    base = ["train", "--dataset", "digits", "--from-scratch", "--out", str(tmp_path / "r")]
    assert main([*base, "--set", "decision.actoins=3"]) == 2  # unknown key: named, before anything loads
    assert "actoins" in capsys.readouterr().err
    assert main([*base, "--set", "target_mac_reduction=1.5"]) == 2
    assert "target_mac_reduction" in capsys.readouterr().err
    assert main([*base, "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert main([*base, "--max-batches", "0"]) == 2
    assert "--max-batches" in capsys.readouterr().err
    assert main([*base, "--set", "train.backbone_lr=fast"]) == 2
    assert "backbone_lr" in capsys.readouterr().err
    assert main(["train", "--dataset", "no-such-set", "--from-scratch", "--out", str(tmp_path / "r")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "r").exists()


def test_gumbel_temperature_anneals_over_the_decision_steps_only():
    from drib.train import decision_temperature

    total, decision_steps = 100, 20  # 80% fine-tuning share
    taus = [decision_temperature(s, decision_steps, 1.0, 0.1) for s in range(total)]
    assert taus[0] == pytest.approx(1.0) and taus[decision_steps - 1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(taus[:decision_steps]))
    assert taus[-1] == pytest.approx(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_target_mac_reduction_lands_within_three_points(tmp_path, digits, target):
    from drib.config import DribSettings
    from drib.mac_target import achieved_reduction

    # the paper's own setting would be decision.target 0.7 (~30% fewer); the knob overrides it
    settings = {**TINY, "target_mac_reduction": target,
                "train": {**TINY["train"], "finetune_fraction": 0.5}}
    start = build_backbone("resnet20", num_classes=digits.num_classes)
    result = run_method(start, digits, Budget(epochs=1, max_batches=2), tmp_path, device="cpu", settings=settings)
    assert result.metrics["target_mac_reduction"] == target
    assert abs(result.metrics["mac_reduction"] - target) <= 0.03
    held_out = digits.test.images.float() / 255  # images the calibration never saw
    assert abs(achieved_reduction(result.model, held_out) - target) <= 0.03
    _, macs = result.dynamic_forward(held_out)
    assert abs(1 - float(macs.mean()) / result.model.dense_backbone_macs() - target) <= 0.03
    with pytest.raises(ValueError, match="target_mac_reduction"):
        DribSettings.from_dict({"target_mac_reduction": 1.0})
    assert DribSettings.from_dict({}).target_mac_reduction is None
