import pytest
import torch
from torch import nn

from common.backbones import Backbone, GateSite, build_backbone
from drib.config import DecisionSettings
from drib.model import DynamicNetwork, default_gate_sites
from drib.sparse_inference import channel_skipping, sparse_forward


def _randomise(net: DynamicNetwork, keep: float = 0.6) -> None:
    """Random binary-ish code books and heads, so samples pick different actions with zeros in them."""
    with torch.no_grad():
        for g in net.gates:
            g.codebook.copy_((torch.rand_like(g.codebook) < keep) * (0.5 + torch.rand_like(g.codebook)))
            g.head.weight.normal_(0, 3)
        for module in net.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.data.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_gathered_sparse_inference_equals_masked_dense(name):
    net = DynamicNetwork(build_backbone(name), DecisionSettings(actions=6)).eval()
    _randomise(net)
    x = torch.rand(10, 1, 1, 1) * torch.rand(10, 3, 32, 32)  # brightness varies, so do the decisions
    with torch.no_grad():
        dense = net(x)
    dense_masks = [m.clone() for m in net.masks()]
    patterns = [len({tuple(row) for row in (m != 0).int().tolist()}) for m in dense_masks]
    assert max(patterns) > 1  # actions differ per sample somewhere, so the grouping is exercised
    sparse, macs = sparse_forward(net, x)
    assert torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(dense_masks, net.masks()))
    assert torch.equal(macs, net.per_sample_macs(dense_masks))
    assert (macs < net.dense_backbone_macs()).all()
    # the swap is undone: the dense modules are back
    assert all(isinstance(g.site.bn, nn.BatchNorm2d) for g in net.gated)
    assert net.gated[0].site.conv in list(net.backbone.modules())


def test_channel_skipping_refuses_training_mode():
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=2)).train()
    with pytest.raises(RuntimeError, match="eval mode"), channel_skipping(net):
        pass


def test_default_gates_keep_the_residual_stream_dense():
    resnet = build_backbone("resnet20")
    names = [s.name for s in default_gate_sites(resnet)]
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    vgg = build_backbone("vgg16")
    assert len(default_gate_sites(vgg)) == 12  # every conv but the first of the 13


class TinyNet(Backbone):
    """stem 3->4 (3x3), gated conv 4->6 (3x3), consumer conv 6->4 (1x1), linear 4->2; input 3 x 8 x 8."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv_a, self.bn_a = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    @property
    def classifier(self):  # type: ignore[override]
        return self.fc

    def forward_features(self, x):
        out = torch.relu(self.stem(self.normalize(x)))
        out = torch.relu(self.bn_a(self.conv_a(out)))
        return torch.relu(self.bn_b(self.conv_b(out)))

    def gate_sites(self):
        return [GateSite("conv_a", self.conv_a, self.bn_a, internal=True, consumer=self.conv_b)]


def test_dynamic_macs_equal_a_hand_count():
    actions = 3
    net = DynamicNetwork(TinyNet(), DecisionSettings(actions=actions), input_size=(3, 8, 8))
    masks = [torch.tensor([[1.0, 0, 2.0, 0, 0, 1.0], [0, 0, 0, 0.5, 0, 0]])]  # 3 and 1 active channels
    pixels = 8 * 8
    fixed = 3 * 4 * 9 * pixels + 4 * 2 + 4 * actions  # stem + classifier + decision head
    hand = [fixed + 4 * a * 9 * pixels + a * 4 * 1 * pixels for a in (3, 1)]
    assert net.per_sample_macs(masks).tolist() == hand
    dense = fixed + 4 * 6 * 9 * pixels + 6 * 4 * pixels
    assert net.per_sample_macs([torch.ones(2, 6)]).tolist() == [dense, dense]
    assert torch.allclose(net.mac_fraction(masks), torch.tensor(hand, dtype=torch.float32) / dense)
    assert net.dense_backbone_macs() == dense - 4 * actions


def test_mac_fraction_gradient_pushes_the_mask_down():
    net = DynamicNetwork(TinyNet(), DecisionSettings(actions=2), input_size=(3, 8, 8))
    mask = torch.ones(2, 6, requires_grad=True)
    net.mac_fraction([mask]).sum().backward()
    assert (mask.grad > 0).all()


def test_keep_fraction_hits_the_mac_target():
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=2))
    keep = net.keep_fraction_for(0.6)
    masks = [torch.zeros(1, g.site.channels).index_fill_(1, torch.arange(round(keep * g.site.channels)), 1.0)
             for g in net.gated]
    assert abs(float(net.mac_fraction(masks)[0]) - 0.6) < 0.02


def test_bad_input_gives_a_clear_error():
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=2))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        net(torch.rand(2, 1, 32, 32))


def test_pre_sliced_folded_execution_equals_masked_dense():
    from drib.sparse_inference import deploy, deploy_dense, deployed_masks

    torch.manual_seed(0)
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=5)).eval()
    _randomise(net)
    with torch.no_grad():
        net.gates[3].codebook[1].zero_()  # a code that keeps no channel: the branch is BN2's shift alone
        net.gates[3].head.weight[1] = net.gates[3].head.weight[0] * 10
    x = torch.rand(12, 1, 1, 1) * torch.rand(12, 3, 32, 32)
    with torch.no_grad():
        dense = net(x)
        masks = [m.clone() for m in net.masks()]
        deployed = deploy(net)
        fast = deployed(x)
        codes = deployed.codes()
        fast_masks = deployed_masks(net, deployed)
        single = torch.cat([deployed(x[i:i + 1]) for i in range(3)])
        nhwc = deploy(net, channels_last=True)(x)
        grouped = deploy(net, multi="group")(x)  # per code on its samples instead of the union of codes
        grouped_nhwc = deploy(net, channels_last=True, multi="group")(x)
        majority = deploy(net, channels_last=True, multi="majority")(x)  # top code + union of the rest
    for other in (nhwc, grouped, grouped_nhwc, majority):
        assert (other - dense).abs().max() < 1e-5 * max(1.0, float(dense.abs().max()))
    assert max(len(torch.unique(c)) for c in codes) > 1  # several codes in one batch: grouping exercised
    assert (fast - dense).abs().max() < 1e-5 * max(1.0, float(dense.abs().max()))
    assert (single - dense[:3]).abs().max() < 1e-5 * max(1.0, float(dense.abs().max()))
    assert all(torch.equal(a, b) for a, b in zip(fast_masks, masks))
    # the dense start in the same folded form equals the plain backbone
    backbone = build_backbone("resnet20").eval()
    _randomise(DynamicNetwork(backbone, DecisionSettings(actions=2)))
    plain = build_backbone("resnet20").eval()
    plain.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        assert (deploy_dense(plain)(x) - plain(x)).abs().max() < 1e-5 * max(1.0, float(plain(x).abs().max()))


def test_speed_metrics_time_every_form_and_the_static_ceiling_runs_one_code():
    from common.data import load_dataset
    from drib.config import DribSettings
    from drib.sparse_inference import deploy
    from drib.speed import speed_metrics, static_ceiling
    from drib.train import TrainedDRIB

    torch.manual_seed(0)
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=3)).eval()
    _randomise(net)
    x = torch.rand(6, 3, 32, 32)
    deployed = deploy(net)
    ceiling = static_ceiling(deployed, x)
    with torch.no_grad():
        majority = [int(torch.mode(c).values) for c in deployed.codes()]
        for g, code in zip(net.gated, majority):  # masked dense with every sample on its block's majority code
            g.gate.forced = g.gate.effective_codebook().detach()[code].expand(len(x), -1).clone()
        forced = net(x)
        for g in net.gated:
            g.gate.forced = None
        assert (ceiling(x) - forced).abs().max() < 1e-5 * max(1.0, float(forced.abs().max()))
    trained = TrainedDRIB(net, {}, DribSettings(), {"backbone": "resnet20", "num_classes": 10})
    out = speed_metrics(trained, load_dataset("digits"), batch_sizes=(1, 4), repeats=1, images=8, bf16=False)
    assert out["deployed_top1_agreement_with_masked_dense"] == 1.0 and out["threads"] == torch.get_num_threads()
    for batch in (1, 4):
        row = out[f"batch_{batch}"]
        assert row["fastest_dense"].startswith("dense") and row["fastest_drib"].startswith("drib")
        assert row["speedup_vs_fastest_dense"] > 0 and row["ceiling_speedup_vs_fastest_dense"] > 0
        assert {"drib_deployed", "drib_grouped_channels_last", "ceiling_static_channels_last",
                "dense_deploy_channels_last"} <= set(row["median_ms"])
