"""The precision / layout policy: resolution rules, autocast and layout behaviour."""

import argparse
import contextlib

import pytest
import torch
from torch import nn

from common import precision as precision_module
from common.precision import Precision, add_precision_argument, resolve_precision


@pytest.fixture
def native_cpu(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)


def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(native_cpu):
    policy = resolve_precision("auto", "cpu")
    assert policy.name == "bf16" and policy.dtype == torch.bfloat16 and policy.device == torch.device("cpu")


def test_auto_falls_back_to_fp32_without_native_bf16(plain_cpu):
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert resolve_precision("fp32", "cpu").name == "fp32"


def test_explicit_bf16_without_native_support_is_a_clear_error(plain_cpu):
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_precision("bf16", "cpu")


@pytest.mark.parametrize("bad", ["fp16", "", "float32", None, 16])
def test_unknown_precision_name_is_a_value_error(bad):
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision(bad, "cpu")


def test_precision_is_frozen_and_validates_its_name():
    policy = Precision("fp32", "cpu", False)
    with pytest.raises(AttributeError):
        policy.name = "bf16"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Precision("fp16", "cpu", False)


def test_fp32_autocast_is_a_null_context_and_keeps_fp32_numbers():
    policy = resolve_precision("fp32", "cpu", channels_last=False)
    assert isinstance(policy.autocast(), contextlib.nullcontext)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    with policy.autocast():
        out = conv(policy.prepare_inputs(x))
    assert out.dtype == torch.float32 and torch.equal(out, conv(x))


def test_bf16_autocast_runs_convs_in_bf16_but_weights_stay_fp32(native_cpu):
    policy = resolve_precision("bf16", "cpu")
    conv = policy.prepare_model(nn.Conv2d(3, 4, 3))
    with policy.autocast():
        out = conv(policy.prepare_inputs(torch.rand(2, 3, 8, 8)))
    assert out.dtype == torch.bfloat16
    assert conv.weight.dtype == torch.float32


def test_channels_last_layout_for_models_and_image_batches():
    policy = resolve_precision("fp32", "cpu", channels_last=True)
    conv = policy.prepare_model(nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = policy.prepare_inputs(torch.rand(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    flat = torch.rand(2, 5)
    assert policy.prepare_inputs(flat) is flat


def test_precision_flag_parses_the_three_choices_and_rejects_others():
    parser = add_precision_argument(argparse.ArgumentParser())
    assert parser.parse_args([]).precision == "auto"
    assert parser.parse_args(["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])


def test_describe_names_precision_and_layout():
    assert resolve_precision("fp32", "cpu", channels_last=False).describe() == "fp32, contiguous, cpu"


def test_evaluation_loops_run_under_the_policy_and_return_fp32_logits(native_cpu):
    from common.training import evaluate_top1, predict_logits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append((o.dtype, i[0].is_contiguous(
        memory_format=torch.channels_last))))
    batches = [(torch.rand(5, 3, 8, 8), torch.randint(0, 3, (5,))) for _ in range(2)]
    plain, _ = predict_logits(model, batches)
    assert seen[-1] == (torch.float32, False)
    logits, _ = predict_logits(model, batches, precision=resolve_precision("bf16", "cpu"))
    assert seen[-1] == (torch.bfloat16, True)
    assert logits.dtype == torch.float32 and (logits - plain).abs().max() < 0.05
    assert 0.0 <= evaluate_top1(model, batches, precision=resolve_precision("fp32", "cpu")) <= 100.0
    assert model.training  # the loops restore the mode


def test_full_precision_region_runs_fp32_inside_bf16_autocast(native_cpu):
    policy = resolve_precision("bf16", "cpu")
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with policy.autocast():
        assert layer(x).dtype == torch.bfloat16
        with precision_module.full_precision("cpu"):
            assert layer(x).dtype == torch.float32


@pytest.mark.data
def test_pretrained_resnet20_scores_within_0p2_points_under_the_bf16_policy():
    """Accuracy parity of the fast path (issue: bf16 changes no accuracy that matters), on the held-out half."""
    import os
    from pathlib import Path

    from common.backbones import build_backbone
    from common.data import BatchLoader, load_dataset
    from common.training import predict_logits

    root = Path(os.environ.get("DATA_ROOT", "data"))
    weights = root / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file() or not (root / "cifar10").is_dir():
        pytest.skip("needs DATA_ROOT with cifar10 and weights/resnet20-12fca82f.th")
    if not precision_module.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: the policy would not pick it")
    data = load_dataset("cifar10", root, val_source="test-half")
    model = build_backbone("resnet20", 10, weights=str(weights)).eval()
    fp32_logits, labels = predict_logits(model, BatchLoader(data.test, 500, train=False), "fp32")
    bf16 = resolve_precision("bf16", "cpu")
    bf16_logits, _ = predict_logits(bf16.prepare_model(model), BatchLoader(data.test, 500, train=False), "bf16", bf16)
    fp32_top1 = 100.0 * (fp32_logits.argmax(1) == labels).float().mean().item()
    bf16_top1 = 100.0 * (bf16_logits.argmax(1) == labels).float().mean().item()
    assert fp32_top1 > 90.0  # the published weights, as published
    assert abs(bf16_top1 - fp32_top1) <= 0.2
    assert (bf16_logits.argmax(1) == fp32_logits.argmax(1)).float().mean() > 0.99
