"""CLI and run_method end to end on the embedded digits dataset (a few batches), resume, clear errors;
load_run gives the network the run's own evaluation measures; every subcommand's help and the README's
commands parse."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import load_dataset
from common.loop import CHECKPOINT_FORMAT
from common.method import RECIPE_KEYS, Budget, shared_metric_problems
from decoupling import load_run, run_method
from decoupling.__main__ import COMMANDS, build_parser, main
from decoupling.config import load_recipe


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = ["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "1", "--max-batches", "2",
            "--out", str(out), "--device", "cpu", "--set", "batch_size=32", "--set", "controller_lr=0.05",
            "--set", "calibration_images=64", "--from-scratch", "--precision", "fp32"]
    assert main(args) == 0
    return out, args


def test_train_writes_the_run_and_resumes(trained_run):
    out, args = trained_run
    for name in ("config.json", "environment.json", "log.txt", "checkpoint.pt", "model.pt"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["settings"]["controller_lr"] == 0.05
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # the shared loop's layout (common.loop)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["stage"] == "decoupling" and ckpt["step"] == 2
    assert set(ckpt["state"]) == {"model", "objective", "optimizer"}
    assert main(args) == 0  # the same command again resumes from the checkpoint (nothing left to do)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert "resumed at step 2 of 2" in (out / "log.txt").read_text()


def test_a_checkpoint_resumes_only_into_its_own_config(trained_run, capsys):
    out, args = trained_run
    changed = [a if a != "2" else "3" for a in args]  # another budget: refused, the old run is kept
    assert main(changed) == 2
    assert "different config" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


SMALL_EVAL = ["--device", "cpu", "--precision", "fp32", "--calibration-images", "64", "--probe-fit-images", "200",
              "--seeds", "2",
              "--latency-images", "4", "--speed-repeats", "3", "--adv-runs", "1", "--adv-shots", "1",
              "--adv-test-per-class", "2", "--adv-classifiers", "random_forest"]


@pytest.mark.slow
def test_evaluate_and_explain(trained_run, tmp_path):
    out, _ = trained_run
    assert main(["evaluate", "--run", str(out), *SMALL_EVAL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert shared_metric_problems(metrics) == []
    assert metrics["split"].startswith("test") and metrics["val_source"] == "train"  # no --weights
    assert metrics["calibration_images"] == 64 and metrics["precision"] == "fp32"
    assert metrics["energetic_filters"] + metrics["silent_filters"] + metrics["dynamic_filters"] == pytest.approx(1)
    assert 0 < metrics["macs"] <= metrics["macs_dense"] + metrics["macs_controllers"]
    paths = metrics["paths"]
    assert len(paths["probe_per_layer"]) == 18 and paths["probe_fit_images"] == 200
    assert all(0 <= paths[k] <= 1 for k in ("probe_paths", "probe_plain_features", "probe_shuffled_paths_mean"))
    assert set(metrics["adv_auc_paths"]) == set(metrics["adv_auc_plain_features"]) == {"fgsm", "pgd"}
    assert metrics["speed"]["speedup_b1"] > 0 and "speedup_b128" not in metrics["speed"]  # 4 images only
    assert main(["evaluate", "--run", str(out), "--split", "val", *SMALL_EVAL]) == 0
    selection = json.loads((out / "metrics_val.json").read_text())
    assert selection["split"].startswith("validation") and selection["report_split"] == "val"
    assert "val_top1" not in selection  # selection measures on the validation split only, never on test
    png = tmp_path / "explain.png"
    assert main(["explain", "--run", str(out), "--out", str(tmp_path), "--device", "cpu", "--images", "40"]) == 0
    assert png.stat().st_size > 10_000
    assert (tmp_path / "explain_paths.npz").is_file() and (tmp_path / "explain_decision_tree.txt").is_file()


def test_clear_errors(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "train into it first" in capsys.readouterr().err
    assert main(["train", "--backbone", "mobilenetv2", "--dataset", "digits", "--epochs", "1",
                 "--out", str(tmp_path / "r"), "--from-scratch"]) == 2
    assert "no defaults for backbone" in capsys.readouterr().err
    assert main(["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "1", "--out",
                 str(tmp_path / "r2"), "--set", "lamda_s=0.1", "--from-scratch"]) == 2
    assert "lamda_s" in capsys.readouterr().err
    assert main(["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "1", "--out",
                 str(tmp_path / "r3"), "--set", "lr=fast", "--from-scratch"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["train", "--backbone", "resnet20", "--dataset", "digits", "--epochs", "1", "--out",
                 str(tmp_path / "r4")]) == 2  # no --weights and no --from-scratch
    assert "--weights" in capsys.readouterr().err
    assert main(["train", "--backbone", "resnet20", "--dataset", "digits", "--max-batches", "0", "--epochs", "1",
                 "--out", str(tmp_path / "r5"), "--from-scratch"]) == 2
    assert "--max-batches" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("r", "r2", "r3", "r4", "r5"))  # no folder left


def test_run_method_contract(tmp_path):
    data = load_dataset("digits")
    start = build_backbone("resnet20", data.num_classes)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    result = run_method(start, data, Budget(epochs=1, max_batches=1), tmp_path, device=torch.device("cpu"),
                        settings={"batch_size": 32, "precision": "fp32", "calibration_images": 64})
    assert all(torch.equal(before[k], v) for k, v in start.state_dict().items())  # start is not modified
    x = data.test.images[:5].float() / 255
    logits, macs = result.dynamic_forward(x)
    assert logits.shape == (5, 10) and macs.shape == (5,) and macs.dtype == torch.float64
    assert result.mis_layer is result.model.backbone.cam_layer()
    assert 0.0 <= result.dynamic_filter_share <= 1.0
    assert result.train_seconds > 0 and shared_metric_problems(result.metrics) == []
    assert result.metrics["split"] == data.test_split_name  # the shared figures on the reported split, as everywhere
    assert result.metrics["val_split"].startswith("validation") and 0 <= result.metrics["val_top1"] <= 100
    loaded = load_run(tmp_path)  # the network run_method returned, from its run directory
    assert not loaded.training and loaded.deployed
    assert torch.allclose(loaded(x), result.model.eval()(x), atol=1e-5)


@pytest.mark.slow
def test_static_twin_and_speed_commands(trained_run, capsys):
    out, _ = trained_run
    assert main(["static-twin", "--run", str(out), "--device", "cpu", "--calibration-images", "64"]) == 0
    metrics = json.loads((out / "static_twin" / "metrics.json").read_text())
    assert shared_metric_problems(metrics) == [] and metrics["top1"] == metrics["finetuned"]["twin"]["top1"]
    assert load_run(out / "static_twin").deployed  # the fine-tuned twin, one fixed path
    for key in ("as_is", "finetuned"):
        twin = metrics[key]["twin"]
        assert 0 <= twin["top1"] <= 100 and 0 <= twin["mac_reduction"] < 1
        assert set(metrics[key]["paired_decoupled_minus_twin"]) == {"difference", "se", "disagree"}
    assert metrics["finetune_steps"] == 2 and (out / "static_twin" / "model.pt").is_file()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["stage"] == "decoupling"  # the run is untouched
    assert main(["speed", "--run", str(out), "--device", "cpu", "--latency-images", "16", "--speed-repeats", "1",
                 "--calibration-images", "64"]) == 0
    speed = json.loads((out / "speed.json").read_text())
    assert speed["ms_decoupled_b1"] > 0
    assert abs(speed["macs_executed_batch1_per_image"] / speed["macs_reported_batch1_per_image"] - 1) < 0.05


def test_run_method_static_twin(tmp_path):
    data = load_dataset("digits")
    result = run_method(build_backbone("resnet20", data.num_classes), data, Budget(epochs=1, max_batches=1),
                        tmp_path,  # device=None: common.run.pick_device's default
                        settings={"batch_size": 32, "precision": "fp32", "static_twin": True,
                                  "calibration_images": 64})
    assert result.metrics["variant"] == "static twin (fine-tuned)" and result.dynamic_filter_share == 0.0
    images = data.test.images[:40].float() / 255  # the split order is class-interleaved: 4 images of every digit
    assert len(set(data.test.labels[:40].tolist())) == data.num_classes
    _, paths = result.model.paths(images)
    assert torch.equal(paths, paths[:1].expand_as(paths))  # one path for every input
    _, macs = result.dynamic_forward(images)
    assert torch.allclose(macs, macs[:1].expand_as(macs))
    assert (tmp_path / "static_twin" / "checkpoint.pt").is_file()  # the twin's fine-tuning, resumable
    twin, decoupled = load_run(tmp_path), load_run(tmp_path / "decoupled")
    assert torch.equal(twin.paths(images)[1], paths)  # model.pt is the twin run_method returned
    assert decoupled.deployed and any(not torch.equal(a, b) for a, b in  # the decoupled network beside it,
                                      zip(decoupled.state_dict().values(), twin.state_dict().values()))  # not tuned


def test_load_run_gives_the_logits_the_runs_evaluation_measures(trained_run, tmp_path):
    out, _ = trained_run
    cheap = ["--device", "cpu", "--precision", "fp32", "--images", "40", "--probe-fit-images", "50", "--seeds", "1",
             "--latency-images", "0", "--adv-runs", "0", "--out", str(tmp_path)]
    assert main(["evaluate", "--run", str(out), *cheap]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["split"] == "test (40)" and metrics["deployed_agreement"] == 1.0
    model = load_run(out, device="cpu")
    assert not model.training and model.deployed
    test = load_dataset("digits").test
    logits = model(test.images[:40].float() / 255)
    assert logits.shape == (40, 10)
    top1 = 100.0 * float((logits.argmax(1) == test.labels[:40]).double().mean())
    assert top1 == pytest.approx(metrics["top1"])  # the evaluation's top-1 is of this network
    assert torch.allclose(model.dynamic_forward(test.images[:40].float() / 255)[0], logits, atol=1e-5)


def test_load_run_errors_are_one_line_and_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"model\.pt does not exist"):
        load_run(tmp_path)


def test_every_packaged_recipe_has_the_one_layout(tmp_path):
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.json")):
        recipe = load_recipe(str(path))
        assert tuple(recipe) == RECIPE_KEYS and "attempt" not in recipe["description"].lower()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"backbone": "resnet20", "dataset": "digits", "epochs": 1, "settings": {},
                               "_comment": "old layout"}))
    with pytest.raises(ValueError, match="a recipe has exactly the keys"):
        load_recipe(str(bad))


def _commands(text: str) -> list[str]:
    """Every ``python -m decoupling ...`` command of a README's code blocks, continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.strip().startswith("python -m decoupling")]


def test_help_lists_every_subcommand_and_the_readme_commands_parse(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert all(re.search(rf"^\s+{re.escape(c)}\s+\S", shown, flags=re.M) for c in COMMANDS)  # with a help line
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = _commands(readme)
    assert {c.split()[3] for c in commands} == set(COMMANDS)  # the README shows every subcommand
    for command in commands:
        words = shlex.split(command.replace("$R", "runs/r").replace("$s", "0"))[3:]
        optional = re.findall(r"\[(--[a-z-]+)", command)  # [--flag VALUE]: the flag must exist
        known = {o for a in subparsers[words[0]]._actions for o in a.option_strings}
        assert set(optional) <= known, (command, set(optional) - known)
        plain = shlex.split(re.sub(r"\[[^\]]*\]", "", command).replace("$R", "runs/r").replace("$s", "0"))[3:]
        parser.parse_args(plain)  # the command as written parses (argparse exits on an unknown flag)
