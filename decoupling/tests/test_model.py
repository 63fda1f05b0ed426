"""Gate placement, initialisation, gathered (channel-skipping) inference and per-sample MACs."""

import pytest
import torch
from torch import nn

from common.backbones import build_backbone
from common.macs import count_macs
from decoupling.model import DecoupledNet, load_decoupled, save_decoupled


def _plant_random_gates(model: DecoupledNet, seed: int = 0) -> None:
    """Controllers whose output depends on the input and closes a fair share of the filters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gated_layers:
            c = layer.controller
            c.fc2.weight.copy_(torch.randn(c.fc2.weight.shape, generator=gen) * 3)
            c.fc2.bias.copy_(torch.randn(c.fc2.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", 10))
    for m in model.modules():  # non-trivial BN statistics so that the BN shift matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_every_conv_but_the_stem_is_gated(resnet):
    assert len(resnet.gated_layers) == 18  # ResNet-20: 9 blocks x 2 convs; the stem conv stays ungated
    assert resnet.gated_layers[1].producer is resnet.gated_layers[0]  # conv2 reads conv1's gated channels
    assert resnet.gated_layers[2].producer is None  # conv1 reads the residual stream
    vgg = DecoupledNet(build_backbone("vgg16", 10))
    assert len(vgg.gated_layers) == 12  # 13 convs minus the first


def test_gates_start_open_and_leave_the_backbone_unchanged():
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 10).eval()
    x = torch.rand(4, 3, 32, 32)
    reference = backbone(x)
    model = DecoupledNet(backbone).eval()
    logits, paths = model.paths(x)
    assert torch.all(paths == 1)
    assert torch.allclose(logits, reference, atol=1e-6)


def test_gathered_inference_equals_masked_dense_inference(resnet):
    _plant_random_gates(resnet)
    x = torch.rand(6, 3, 32, 32)
    dense_logits, dense_macs = resnet.dynamic_forward(x, gathered=False)
    sparse_logits, sparse_macs = resnet.dynamic_forward(x, gathered=True)
    _, paths = resnet.paths(x)
    assert 0.2 < paths.mean() < 0.8  # the planted gates really close a share of the filters
    assert torch.allclose(dense_logits, sparse_logits, atol=1e-4)
    assert torch.equal(dense_macs, sparse_macs)


def test_gathered_inference_on_vgg_with_closed_layers():
    torch.manual_seed(1)
    model = DecoupledNet(build_backbone("vgg16", 10)).eval()
    _plant_random_gates(model, seed=3)
    with torch.no_grad():  # one layer fully closed: its consumer sees no active input at all
        model.gated_layers[4].controller.fc2.bias.fill_(-100.0)
        model.gated_layers[4].controller.fc2.weight.zero_()
    x = torch.rand(3, 3, 32, 32)
    a, _ = model.dynamic_forward(x, gathered=False)
    b, _ = model.dynamic_forward(x, gathered=True)
    assert torch.allclose(a, b, atol=1e-4)


def test_per_sample_macs_match_a_hand_count(resnet):
    _plant_random_gates(resnet, seed=5)
    controllers = resnet.dense_macs((3, 32, 32)) - count_macs(build_backbone("resnet20", 10))
    stem_and_fc = 3 * 16 * 9 * 32 * 32 + 64 * 10
    x = torch.rand(3, 3, 32, 32)
    _, macs = resnet.dynamic_forward(x)
    for b in range(3):
        expected = stem_and_fc + controllers
        for layer in resnet.gated_layers:
            active_out = int(layer.last_mask[b].sum())
            producer = layer.producer
            active_in = layer.conv.in_channels if producer is None else int(producer.last_mask[b].sum())
            side = 32 // {16: 1, 32: 2, 64: 4}[layer.conv.out_channels]
            expected += active_in * active_out * 9 * side * side
        assert macs[b].item() == expected
    assert torch.all(macs < count_macs(build_backbone("resnet20", 10)))


def test_training_mode_records_paths_and_trains_the_controllers():
    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", 10)).train()
    logits, record = model.forward_with_paths(torch.rand(4, 3, 32, 32))
    assert len(record.masks) == 18 and all(0 <= m.min() and m.max() <= 1 for m in record.masks)
    assert all(p.shape == m.shape for p, m in zip(record.pooled, record.masks))
    (logits.sum() + sum(m.sum() for m in record.masks)).backward()
    assert model.gated_layers[0].controller.fc2.weight.grad.abs().sum() > 0


def test_model_file_round_trip(tmp_path, resnet):
    save_decoupled(resnet, tmp_path / "model.pt", "resnet20", 10, 4, 1.0)
    loaded, meta = load_decoupled(tmp_path / "model.pt")
    x = torch.rand(2, 3, 32, 32)
    assert meta["backbone"] == "resnet20"
    assert torch.allclose(loaded(x), resnet(x), atol=1e-6)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"corrupt|refused"):  # weights_only load: not a file this project wrote
        load_decoupled(tmp_path / "junk.pt")


def test_unsupported_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="depthwise"):
        DecoupledNet(build_backbone("mobilenetv2", 10))


def test_bn_recalibration_uses_inference_mode_gates():
    from decoupling.train import recalibrate_batch_norm

    torch.manual_seed(0)
    model = DecoupledNet(build_backbone("resnet20", 10))
    _plant_random_gates(model, seed=2)
    batches = [(torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    recalibrate_batch_norm(model, batches, batches=2)
    assert not model.training and all(not m.training for m in model.modules())
    layer = model.gated_layers[1]  # its BN sees conv outputs whose inputs went through hard gates
    seen = []
    hook = layer.conv.register_forward_hook(lambda m, i, o: seen.append(o.transpose(0, 1).flatten(1)))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    hook.remove()
    expected = torch.stack([s.mean(1) for s in seen]).mean(0)  # cumulative average of the batch means
    assert torch.allclose(layer.bn.running_mean, expected, atol=5e-4)
