"""The shared cost knob: expected MACs match the exact count, the MAC-weighted L_s is a hinge at the target,
the bisected gate offset lands the mean MACs on the target, and the settings reject bad targets."""

import pytest
import torch

from common.backbones import build_backbone
from common.data import ImageTensors
from common.precision import resolve_precision
from decoupling.config import DecouplingSettings, resolve_settings
from decoupling.losses import DecouplingObjective, mac_sparsity_loss
from decoupling.model import DecoupledNet
from decoupling.train import build_objective, calibrate_gate_offset, mean_macs

FP32 = resolve_precision("fp32", "cpu", channels_last=False)


def _input_dependent(seed: int = 0) -> DecoupledNet:
    torch.manual_seed(seed)
    model = DecoupledNet(build_backbone("resnet20", 10)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gated_layers:
            fc2 = layer.controller.fc2
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=gen) * 2)
            fc2.bias.copy_(torch.randn(fc2.bias.shape, generator=gen))
    return model


def test_expected_macs_equal_the_exact_count_for_inference_masks():
    model = _input_dependent()
    x = torch.rand(6, 3, 32, 32)
    _, exact = model.dynamic_forward(x)
    with model.inference():
        _, record = model.forward_with_paths(x)
    expected = model.expected_macs(record.masks, (3, 32, 32))
    assert torch.allclose(expected.double(), exact, rtol=1e-6)
    dense = model.start_macs((3, 32, 32))
    assert dense == model.dense_macs((3, 32, 32)) - sum(
        s.macs for s in model.layer_shapes((3, 32, 32)) if ".controller." in s.name)


def test_mac_sparsity_loss_is_a_hinge_at_the_target_and_has_a_gradient():
    macs = torch.tensor([40.0, 60.0], requires_grad=True)  # mean 50 of 100: 50% fewer
    assert float(mac_sparsity_loss(macs, 100.0, 0.5, 10).detach()) == 0.0
    assert float(mac_sparsity_loss(macs, 100.0, 0.6, 10).detach()) == pytest.approx(10 * 0.1)
    mac_sparsity_loss(macs, 100.0, 0.6, 10).backward()
    assert torch.all(macs.grad > 0)
    with pytest.raises(ValueError, match="target_mac_reduction"):
        mac_sparsity_loss(macs, 100.0, 1.0, 10)


def test_objective_uses_the_mac_hinge_only_with_a_target():
    model = _input_dependent()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    model.train()
    logits, record = model.forward_with_paths(x)
    macs = model.expected_macs(record.masks, (3, 32, 32))
    plain = build_objective(model, 10, resolve_settings("resnet20"))
    assert plain.target_mac_reduction is None
    targeted = build_objective(model, 10, resolve_settings("resnet20", {"target_mac_reduction": 0.9}))
    terms = targeted(logits, y, record.masks, record.pooled, macs)
    fraction = float(macs.mean()) / targeted.dense_macs
    assert float(terms.sparsity) == pytest.approx(sum(model.layer_channels) * max(0.0, fraction - 0.1), rel=1e-5)
    with pytest.raises(ValueError, match="per-sample MACs"):
        targeted(logits, y, record.masks, record.pooled)
    with pytest.raises(ValueError, match="dense start"):
        DecouplingObjective([4], 10, 0.1, 1.0, 0.1, target_mac_reduction=0.5)


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_gate_offset_lands_the_mean_macs_on_the_target(target):
    model = _input_dependent(1)
    gen = torch.Generator().manual_seed(1)
    images = ImageTensors(torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=gen),
                          torch.zeros(48, dtype=torch.int64))
    offset = calibrate_gate_offset(model, images, target, torch.device("cpu"), FP32)
    batches = [(images.images.float() / 255, images.labels)]
    achieved = 1.0 - mean_macs(model, batches, FP32) / model.start_macs((3, 32, 32))
    assert abs(achieved - target) < 0.01, (offset, achieved)
    fresh = torch.rand(32, 3, 32, 32, generator=gen)  # other images of the same kind: within the +-3 points
    _, macs = model.dynamic_forward(fresh)
    assert abs(1.0 - float(macs.mean()) / model.start_macs((3, 32, 32)) - target) < 0.03


def test_settings_check_the_target_and_fill_table5():
    assert DecouplingSettings().target_mac_reduction is None
    resolved = resolve_settings("resnet56", {"target_mac_reduction": 0.5})
    assert resolved.lambda_s == 0.00015 and resolved.lambda_m == 0.01 and resolved.target_mac_reduction == 0.5
    assert resolve_settings("vgg16").lambda_m == 0.04
    for bad in (1.0, -0.1, "half", True):
        with pytest.raises(ValueError, match="target_mac_reduction"):
            DecouplingSettings.from_dict({"target_mac_reduction": bad})
    with pytest.raises(ValueError, match="unknown decoupling settings"):
        DecouplingSettings.from_dict({"lamda_s": 0.1})
    with pytest.raises(ValueError, match="precision"):
        DecouplingSettings.from_dict({"precision": "fp16"})


def test_paths_and_macs_under_the_bf16_policy_stay_fp32_and_close():
    model = _input_dependent()
    x = torch.rand(8, 3, 32, 32)
    logits32, macs32 = model.dynamic_forward(x)
    try:
        policy = resolve_precision("bf16", "cpu")
    except ValueError:
        pytest.skip("this CPU has no native bf16")
    model.set_precision(policy)
    logits16, macs16 = model.dynamic_forward(x)
    _, codes = model.paths(x)
    assert logits16.dtype == torch.float32 and macs16.dtype == torch.float64 and codes.dtype == torch.float32
    assert float((logits16 - logits32).abs().median()) < 0.1  # a gate near 0 may flip; most logits agree
    assert float((macs16 - macs32).abs().max() / macs32.mean()) < 0.1
