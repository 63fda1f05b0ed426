"""End to end on the embedded digits dataset: train, resume, evaluate, explain, run_method, errors."""

import json
from pathlib import Path

import pytest
import torch

from common.backbones import build_backbone
from common.data import load_dataset
from common.method import SHARED_METRIC_KEYS, Budget, shared_metric_problems
from common.run import NonFiniteLossError, RunDir, load_checkpoint
from picnn import PicnnSettings, build_picnn, load_run, run_method, train_picnn
from picnn.__main__ import main

TINY = ["--backbone", "resnet20", "--dataset", "digits", "--batch-size", "16", "--max-batches", "2",
        "--device", "cpu", "--mis-samples", "100"]
SCRATCH = [*TINY, "--from-scratch"]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    small = lambda split, n: split.subset(range(n))  # noqa: E731
    data.train, data.val, data.test = small(data.train, 64), small(data.val, 32), small(data.test, 40)
    return data


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *SCRATCH, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_writes_the_run_files(trained_run):
    for name in ("config.json", "environment.json", "log.txt", "checkpoint.pt", "model.pt"):
        assert (trained_run / name).is_file(), name
    assert load_checkpoint(trained_run / "checkpoint.pt")["step"] == 2


def test_a_run_stopped_on_time_resumes_with_a_larger_time_budget(tmp_path):
    out = tmp_path / "timed"
    assert main(["train", *SCRATCH, "--epochs", "2", "--budget-seconds", "1e-9", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1  # stopped on time after the first step
    assert main(["train", *SCRATCH, "--epochs", "2", "--out", str(out)]) == 0  # the time limit is not identity
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert "resumed from step 1 of 4" in (out / "log.txt").read_text()


def test_a_checkpoint_is_never_resumed_under_another_budget(trained_run, capsys):
    before = (trained_run / "checkpoint.pt").read_bytes()
    assert main(["train", *SCRATCH, "--epochs", "3", "--out", str(trained_run)]) == 2
    err = capsys.readouterr().err
    assert "different config (epochs: 1.0 -> 3.0)" in err and "new --out" in err
    assert len(err.strip().splitlines()) == 1
    assert (trained_run / "checkpoint.pt").read_bytes() == before  # refused: nothing touched
    assert main(["train", *SCRATCH, "--epochs", "1", "--out", str(trained_run)]) == 0  # same config: resumes


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images.float() / 255.0)


def test_evaluate_and_explain(trained_run, tmp_path):
    assert main(["evaluate", "--run", str(trained_run), "--draws", "2", "--precision", "fp32"]) == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    # The shared figures under the shared keys (common.method), PICNN's own beside them.
    assert shared_metric_problems(metrics) == [] and metrics["target_mac_reduction"] is None
    assert metrics["precision"] == "fp32" and "acc1" not in metrics
    assert metrics["mac_reduction"] == pytest.approx(1 - metrics["macs"] / metrics["backbone_macs"])
    assert 0 <= metrics["acc2"] <= 100 and 0 <= metrics["acc3_argmax"] <= 100
    assert metrics["mis_samples"] == 100 and metrics["split"].startswith("test (")  # no weights: val from train
    # The default target layer is the paper's added conv of 128 filters; its MACs are counted.
    assert metrics["filters"] == 128 and metrics["added_target_conv"] and metrics["target_layer"] == "added"
    assert metrics["added_macs"] == 64 * 128 * 9 * 64 + (128 - 64) * 10  # 3x3 conv on 8x8, wider classifier
    assert metrics["macs"] == metrics["backbone_macs"] + metrics["added_macs"]
    # load_run gives the network evaluate measured: its logits on the reported split give the same top-1.
    data = load_dataset("digits", val_source=metrics["val_source"])
    model = load_run(trained_run, device="cpu")
    assert not model.training
    top1 = 100.0 * (_logits(model, data.test.images).argmax(1) == data.test.labels).double().mean().item()
    assert top1 == pytest.approx(metrics["top1"], abs=1e-9)
    assert main(["explain", "--run", str(trained_run), "--out", str(tmp_path / "fig"), "--images", "2"]) == 0
    assert (tmp_path / "fig" / "explain.png").stat().st_size > 1000


def test_evaluate_images_takes_a_prefix_and_out_takes_the_metrics(trained_run, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main(["evaluate", "--run", str(trained_run), "--images", "20", "--draws", "1", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"].endswith(", first 20 images") and metrics["mis_samples"] == 20
    assert main(["evaluate", "--run", str(trained_run), "--images", "100000"]) == 2
    assert "--images 100000: the reported split has" in capsys.readouterr().err


def test_a_published_start_validates_on_the_test_half_and_reports_the_other(tmp_path):
    weights = tmp_path / "start.pt"
    torch.save(build_backbone("resnet20", 10).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--weights", str(weights), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["val_source"] == "test-half"  # auto
    assert main(["evaluate", "--run", str(out), "--draws", "1", "--precision", "fp32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == load_dataset("digits", val_source="test-half").test_split_name
    assert metrics["split"].startswith("held-out test half") and metrics["lam"] == 2.0
    assert metrics["precision"] == "fp32" and metrics["precision_policy"].startswith("fp32")
    forced = tmp_path / "forced"
    assert main(["train", *TINY, "--weights", str(weights), "--val-source", "train", "--out", str(forced)]) == 0
    assert json.loads((forced / "config.json").read_text())["val_source"] == "train"


def test_an_asked_for_layer_states_its_macs(tmp_path):
    out = tmp_path / "wide"
    assert main(["train", *SCRATCH, "--filters", "32", "--out", str(out)]) == 0
    assert main(["evaluate", "--run", str(out), "--draws", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["added_target_conv"] and metrics["filters"] == 32
    assert metrics["added_macs"] == 64 * 32 * 9 * 64 + (32 - 64) * 10  # 3x3 conv on 8x8, smaller classifier


def test_the_last_stage_variant_adds_no_layer_and_no_macs(tmp_path):
    out = tmp_path / "last"
    assert main(["train", *SCRATCH, "--target-layer", "last_stage", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["target_layer"] == "last_stage"
    assert main(["evaluate", "--run", str(out), "--draws", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["filters"] == 64 and not metrics["added_target_conv"] and metrics["target_layer"] == "last_stage"
    assert metrics["macs"] == metrics["backbone_macs"] and metrics["mac_change_percent"] == 0.0


def test_overhead_times_both_models_on_the_same_batches(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert main(["overhead", "--dataset", "digits", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                 "--device", "cpu", "--from-scratch", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["timed_steps"] == 2 and result["batch_size"] == 8 and result["added_target_conv"]
    assert result["picnn_step_seconds"] > 0 and result["plain_step_seconds"] > 0


def test_bad_input_gives_a_clear_error(trained_run, tmp_path, capsys):
    assert main(["train", "--backbone", "resnet99", "--from-scratch", "--out", str(tmp_path / "x")]) == 2
    assert "unknown backbone 'resnet99'" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *SCRATCH, "--lam", "0", "--out", str(trained_run)]) == 2
    assert "settings.lam: 2.0 -> 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown PICNN setting"):
        PicnnSettings.from_dict({"lambda": 2})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--max-batches", "0"], "--max-batches must be a positive number, got 0"),
    (["--epochs", "-1"], "--epochs must be a positive number"),
    (["--budget-seconds", "-5"], "--budget-seconds must be a positive number"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--threads", "0"], "--threads must be a positive number"),
    (["--set", "lr=fast"], "--set lr=fast: expected a number, got 'fast'"),
    (["--set", "lambda=2"], "--set lambda=2: unknown key 'lambda'"),
    (["--dataset", "nonsense"], "unknown dataset 'nonsense'"),
])
def test_bad_flags_are_one_line_errors_and_leave_no_folder(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    assert main(["train", *SCRATCH, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m picnn: error: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_set_reaches_every_setting_with_its_type(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SCRATCH, "--set", "lam=0.5", "--set", "augment=false", "--set", "p_lr=none",
                 "--out", str(out)]) == 0
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["lam"] == 0.5 and settings["augment"] is False and settings["p_lr"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--from-scratch", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_the_weights_policy_is_common_clis(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 2  # neither --weights nor --from-scratch
    assert "--weights PATH is required" in capsys.readouterr().err
    missing = tmp_path / "w" / "resnet20-12fca82f.th"
    assert main(["train", *TINY, "--weights", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--weights {missing} does not exist" in err and "akamaster/pytorch_resnet_cifar10" in err
    assert main(["overhead", "--dataset", "digits", "--steps", "1"]) == 2
    assert "--weights PATH is required" in capsys.readouterr().err
    assert not out.exists()


def test_nan_loss_raises(digits, tmp_path):
    model = build_picnn("resnet20", digits.num_classes)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    settings = PicnnSettings(batch_size=16)
    with pytest.raises(NonFiniteLossError):
        train_picnn(model, digits, Budget(epochs=1, max_batches=1), RunDir(tmp_path), settings, torch.device("cpu"))


def test_run_method_returns_the_benchmark_contract(digits, tmp_path):
    start = build_backbone("resnet20", digits.num_classes)
    result = run_method(start, digits, Budget(epochs=1, max_batches=2), tmp_path, device="cpu",
                        settings={"batch_size": 16, "eval_draws": 1, "mis_samples": 40, "control": True,
                                  "precision": "fp32"})
    metrics = result.metrics
    assert shared_metric_problems(metrics) == [] and metrics["target_mac_reduction"] is None
    assert metrics["split"] == digits.test_split_name and metrics["filters"] == 128 and metrics["added_macs"] > 0
    assert metrics["mac_reduction"] < 0  # the added target layer costs MACs: none are removed
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # The lambda = 0 control: same architecture, batches and images, trained alongside.
    control = json.loads((tmp_path / "control" / "metrics.json").read_text())
    assert control["lam"] == 0.0 and control["macs"] == metrics["macs"]
    assert metrics["control_mis"] == control["mis"] and metrics["mis_lift"] == metrics["mis"] - control["mis"]
    assert metrics["control_top1"] == control["top1"] and set(SHARED_METRIC_KEYS) <= set(control)
    assert result.mis_layer is result.model.target_layer and result.dynamic_forward is None
    assert result.train_seconds > 0 and (tmp_path / "model.pt").is_file()
    images, targets = digits.test.images[:3].float() / 255, digits.test.labels[:3]
    maps = result.saliency(images, targets)
    assert maps.shape == (3, 32, 32) and (maps >= 0).all()
    assert start.linear.weight.grad is None  # the caller's backbone was copied, not trained
    # load_run rebuilds run_method's network from out_dir: the same logits as the returned model.
    loaded = load_run(tmp_path, device="cpu")
    assert not loaded.training and torch.allclose(_logits(loaded, digits.test.images),
                                                  _logits(result.model.cpu(), digits.test.images), atol=1e-5)


def test_a_blank_explanation_panel_says_why():
    from picnn.explain import _blank_reason

    cams = {"all": torch.rand(1, 4, 4) + 0.1, "cluster": torch.zeros(1, 4, 4),
            "complement": torch.full((1, 4, 4), 1e-4)}
    assert _blank_reason("cluster", cams, 0, cluster_size=0, top=1.1).startswith("empty cluster")
    assert _blank_reason("cluster", cams, 0, cluster_size=3, top=1.1).startswith("zero map")
    assert _blank_reason("complement", cams, 0, cluster_size=3, top=1.1).startswith("weak")
    assert _blank_reason("all", cams, 0, cluster_size=3, top=1.1) is None


def test_missing_weights_and_data_are_one_message_with_both_fetch_commands(tmp_path, capsys):
    weights = tmp_path / "weights" / "resnet20-12fca82f.th"
    out = tmp_path / "run"
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--weights", str(weights),
                 "--device", "cpu", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "2 inputs are missing" in err and "Traceback" not in err
    for needle in (f"curl -L -o {weights}", "akamaster/pytorch_resnet_cifar10", "cifar-10-python.tar.gz",
                   f"tar -xz -C {tmp_path / 'data'}", "--download"):
        assert needle in err, needle
    assert not out.exists()


@pytest.mark.slow
def test_progress_is_plain_lines_in_a_log(tmp_path):
    """Under nox or CI stderr is a pipe: progress comes as plain lines, no carriage returns or escape codes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ICNN_PROGRESS"}
    env.update(ICNN_PROGRESS_INTERVAL="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "picnn", "train", *SCRATCH, "--threads", "1", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.startswith("picnn train: 1/2 (50%), ")
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
