"""The deployed execution (silent filters removed, BN folded, packed pattern ids, cached slices) equals the
masked dense decoupled network; the latency sampler draws across classes; the timer times every function."""

import numpy as np
import pytest
import torch
from torch import nn

from common.backbones import build_backbone
from common.data import ImageTensors
from decoupling.evaluate import timing_images
from decoupling.execution import deploy_decoupled, fold_dense
from decoupling.model import DecoupledNet
from decoupling.train import class_mixed_indices


@pytest.fixture(scope="module")
def frozen():
    """A ResNet-20 with non-trivial BN, input-dependent planted gates, filters that are always on, always
    off, a fully closed conv1 layer and a fully closed conv2 layer; states frozen on 64 random inputs."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model = DecoupledNet(backbone).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index, layer in enumerate(model.gated_layers):
            fc2 = layer.controller.fc2
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=gen) * 3)
            fc2.bias.copy_(torch.randn(fc2.bias.shape, generator=gen) + 0.5)
            fc2.weight[:4] = 0
            fc2.bias[:2], fc2.bias[2:4] = 5.0, -5.0  # two energetic and two silent filters per layer
            if index in (4, 7):  # block 3's conv1 and block 4's conv2 never compute anything
                fc2.weight.zero_()
                fc2.bias.fill_(-5.0)
    _, codes = model.paths(torch.rand(64, 3, 32, 32, generator=gen))
    model.freeze_states(codes)
    return model


def test_frozen_states_force_energetic_on_and_silent_off(frozen):
    layer = frozen.gated_layers[0]
    assert layer.always_on[:2].all() and layer.always_off[2:4].all()
    assert frozen.gated_layers[4].always_off.all()
    _, paths = frozen.paths(torch.rand(8, 3, 32, 32))
    first = paths[:, : layer.channels]
    assert torch.all(first[:, :2] == 1) and torch.all(first[:, 2:4] == 0)


def test_fast_execution_equals_masked_dense_at_batch_1_and_in_batches(frozen):
    fast = deploy_decoupled(frozen)
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = frozen(x)  # masked dense, frozen states, inference gates (Eq. 5)
    assert torch.allclose(fast(x), reference, atol=1e-4)
    gathered = torch.cat([fast(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(gathered, reference, atol=1e-4)
    again = torch.cat([fast(x[i:i + 1]) for i in range(len(x))])  # the second pass reads the cache
    assert torch.equal(again, gathered)
    assert max(fast.cache_sizes()) > 1  # several patterns were met and cached
    removed = sum(int(g.always_off.sum()) for g in frozen.gated_layers)
    kept = sum(len(layer.keep) for block in fast.blocks for layer in block[:2])
    assert kept == sum(frozen.layer_channels) - removed  # silent filters are physically gone


def test_fast_execution_needs_frozen_states():
    model = DecoupledNet(build_backbone("resnet20", 10)).eval()
    with pytest.raises(ValueError, match="freeze the filter states"):
        deploy_decoupled(model)


def test_folded_dense_equals_the_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10).eval()
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fold_dense(backbone)(x), backbone(x), atol=1e-4)


def test_latency_sampler_draws_across_classes_of_a_class_sorted_split():
    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, as the image-folder test split
    images = torch.arange(10, dtype=torch.uint8).repeat_interleave(50)[:, None, None, None].expand(500, 3, 4, 4)
    split = ImageTensors(images.contiguous(), labels)
    picks = class_mixed_indices(split.labels, 20, seed=0)
    assert len(set(picks.tolist())) == 20
    assert np.bincount(labels[picks].numpy(), minlength=10).tolist() == [2] * 10
    timed = timing_images(split, 10, seed=3)  # what the speed figures are timed on
    assert sorted((timed[:, 0, 0, 0] * 255).round().long().tolist()) == list(range(10))  # one image per class
    with pytest.raises(ValueError, match="asked for"):
        class_mixed_indices(labels, 501)


def test_traced_masked_form_equals_masked_dense(frozen):
    from decoupling.execution import traced_masked

    fast = deploy_decoupled(frozen)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = frozen(x)
    for batch in (1, 6):
        traced = traced_masked(fast, x[:batch])
        with torch.inference_mode():
            out = torch.cat([traced(x[i:i + batch].contiguous(memory_format=torch.channels_last))
                             for i in range(0, len(x), batch)])
        assert torch.allclose(out, reference, atol=1e-4)


def test_grouped_batches_equal_masked_dense_and_execute_the_reported_macs(frozen):
    """At batch > 1 the grouped form computes what the masked dense network computes, and the MACs that
    really run (a counter on every convolution and matmul) are the reported per-sample MACs summed, within
    5%; the masked batched form runs the dynamic filters too and exceeds them (the counter can fail)."""
    from decoupling.execution import executed_macs

    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = frozen(x)
        _, reported = frozen.dynamic_forward(x)
    grouped, masked = deploy_decoupled(frozen), deploy_decoupled(frozen, batched="masked")
    assert torch.allclose(grouped(x), reference, atol=1e-4)
    counted = executed_macs(grouped, x)
    assert abs(counted / float(reported.sum()) - 1) < 0.05
    assert executed_macs(masked, x) > 1.2 * counted
    # the counter itself, on a conv of known cost: 8 x 4 x 9 x (16 x 16) x 2 images
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert executed_macs(conv, torch.rand(2, 4, 16, 16)) == 8 * 4 * 9 * 256 * 2
