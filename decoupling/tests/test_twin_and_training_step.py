"""Eq. 3's random half is one draw per sample for the whole network; the fused training ops give autograd's
values and gradients; the static twin is the deployed network with its dynamic filters forced to their
majority states."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.backbones import build_backbone
from decoupling.execution import deploy_decoupled
from decoupling.model import DecoupledNet, global_average_pool, mask_and_pool
from decoupling.twin import paired_difference, static_twin


def _planted(seed: int = 0, scale: float = 3.0, bias: float = 0.5) -> DecoupledNet:
    torch.manual_seed(seed)
    backbone = build_backbone("resnet20", 10)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model = DecoupledNet(backbone)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gated_layers:
            fc2 = layer.controller.fc2
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=gen) * scale)
            fc2.bias.copy_(torch.randn(fc2.bias.shape, generator=gen) + bias)
    return model


def test_the_binary_half_of_eq3_is_the_same_samples_in_every_gated_layer():
    model = _planted(scale=0.0, bias=0.0)  # G(s) = 0: v1 = sigma'(noise) is almost never exactly 0 or 1
    model.train()
    x = torch.rand(16, 3, 32, 32)
    _, record = model.forward_with_paths(x)
    binary = [((z == 0) | (z == 1)).all(dim=1) for z in record.masks]
    assert binary[0].sum() == 8  # half of the samples
    assert all(torch.equal(b, binary[0]) for b in binary)  # the same half in all 18 layers
    _, again = model.forward_with_paths(x)  # and a new half on the next forward
    assert not torch.equal(((again.masks[0] == 0) | (again.masks[0] == 1)).all(dim=1), binary[0])
    assert all(layer.hard_rows is None for layer in model.gated_layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mask_and_pool_and_fp32_pooling_equal_autograd(dtype):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(4, 6, 5, 5, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    z = torch.rand(4, 6, generator=gen)
    z[0] = 0.0  # a closed row
    g_masked = torch.randn(4, 6, 5, 5, generator=gen).to(dtype)
    g_pooled = torch.randn(4, 6, generator=gen).to(dtype)
    a, za = out.clone().requires_grad_(), z.clone().requires_grad_()
    masked, pooled = mask_and_pool(a, za)
    (masked * g_masked).sum().backward(retain_graph=True)
    (pooled * g_pooled).sum().backward()
    b, zb = out.clone().requires_grad_(), z.clone().requires_grad_()
    ref_masked, ref_pooled = b * zb.to(dtype)[:, :, None, None], F.relu(b).mean(dim=(2, 3))
    ((ref_masked * g_masked).sum() + (ref_pooled * g_pooled).sum()).backward()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(masked.float(), ref_masked.float(), atol=tol)
    assert torch.allclose(pooled.float(), ref_pooled.float(), atol=tol)
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol)
    assert torch.allclose(za.grad, zb.grad, atol=tol * 10)
    c, d = out.clone().requires_grad_(), out.clone().requires_grad_()
    s = global_average_pool(c)
    assert s.dtype == torch.float32
    (s * g_pooled.float()).sum().backward()
    (d.float().mean(dim=(2, 3)) * g_pooled.float()).sum().backward()
    assert torch.allclose(s, d.detach().float().mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(c.grad.float(), d.grad.float(), atol=1e-6)


def test_the_static_twin_is_the_deployed_network_with_dynamic_filters_forced_to_their_majority_state():
    model = _planted().eval()
    gen = torch.Generator().manual_seed(1)
    _, codes = model.paths(torch.rand(64, 3, 32, 32, generator=gen))
    rates = codes.mean(dim=0)
    assert ((rates > 0) & (rates < 1)).sum() > 50  # many filters are dynamic to start with
    twin = static_twin(model, codes)
    # Independently: the deployed network (energetic / silent frozen) whose dynamic filters' controller rows
    # are rewritten to a constant of the majority's sign.
    forced = _planted().eval()
    forced.freeze_states(codes)
    start = 0
    with torch.no_grad():
        for layer in forced.gated_layers:
            rate = rates[start:start + layer.channels]
            start += layer.channels
            dynamic = ~(layer.always_on | layer.always_off)
            fc2 = layer.controller.fc2
            fc2.weight[dynamic] = 0.0
            fc2.bias[dynamic] = torch.where(rate[dynamic] > 0.5, 10.0, -10.0)
    x = torch.rand(10, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected, mine = forced(x), twin(x)
        _, twin_macs = twin.dynamic_forward(x)
        _, deployed_path = model.paths(x)
    assert torch.allclose(mine, expected, atol=1e-5)
    _, paths = twin.paths(x)
    assert torch.equal(paths, paths[:1].expand_as(paths))  # one fixed path for every input
    assert torch.equal(paths[0] > 0, rates > 0.5)
    assert (deployed_path != paths).any(dim=1).all()  # the control differs from the decoupled paths
    assert torch.allclose(twin_macs, twin_macs[:1].expand_as(twin_macs))  # one cost for every input
    assert torch.allclose(deploy_decoupled(twin)(x), expected, atol=1e-4)  # its fast form too


def test_paired_difference_and_its_standard_error():
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, False, False])
    report = paired_difference(a, b)
    assert report["difference"] == pytest.approx(50.0)
    assert report["se"] == pytest.approx(100 * torch.tensor([0.0, 1, 0, 1]).std().item() / 2)
    assert report["disagree"] == 0.5


def test_training_a_static_twin_skips_its_controllers_with_the_same_output_and_gradients():
    model = _planted().eval()
    _, codes = model.paths(torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    grads = []
    for skip in (True, False):
        twin = static_twin(model, codes)
        for layer in twin.gated_layers:
            layer._static = skip  # False: the controller and the fused op run, their output overridden
        twin.train()
        twin.set_hard_gates(True)
        twin(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in twin.backbone.named_parameters()
                      if p.grad is not None and ".controller." not in n})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4) for k in grads[0])


def test_the_macs_matched_twin_costs_at_most_the_decoupled_mean_and_close_to_it():
    from decoupling.twin import macs_matched_threshold

    model = _planted().eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(64, 3, 32, 32, generator=gen)
    _, codes = model.paths(x)
    model.freeze_states(codes)
    target = float(model.dynamic_forward(x)[1].mean())
    threshold = macs_matched_threshold(model, codes, target, (3, 32, 32))
    _, macs = static_twin(model, codes, threshold).dynamic_forward(x[:2])
    assert float(macs[0]) <= target and float(macs[0]) > 0.95 * target
    _, majority = static_twin(model, codes).dynamic_forward(x[:2])
    assert threshold != 0.5 and not torch.equal(macs, majority)  # a different twin from the majority one
