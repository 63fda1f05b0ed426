import pytest
import torch
from torch import nn

from common.backbones import build_backbone
from drib.config import DecisionSettings
from drib.dynamism import Decisions, dynamic_channels, dynamism_metrics, mask_ids, pair_difference
from drib.model import DynamicNetwork
from drib.sparse_inference import sparse_forward
from drib.static import fixed_rows, head_macs, most_used_rows, static_twin
from drib.verification import credibility_controls


def _decisions(masks: list[torch.Tensor]) -> Decisions:
    return Decisions([f"l{k}" for k in range(len(masks))], [mask_ids(m) for m in masks], masks)


def test_planted_routing_is_measured_per_layer_and_by_the_probe():
    n = 400
    labels = torch.arange(n) % 4
    rows = torch.cat([torch.eye(4, dtype=torch.bool)] * 2, dim=1)  # 4 disjoint 2-channel sets of 8 channels
    routed = rows[labels]  # class c -> row c: 4 rows at 25%, the choice tells the class
    static = rows[torch.zeros(n, dtype=torch.long)]  # one row for everyone
    flicker = static.clone()
    flicker[0, 7] = True  # one image of 400 switches a channel: not dynamic at 5% each way
    metrics = dynamism_metrics(_decisions([routed, static, flicker]), labels)
    a, b, c = (metrics["layers"][k] for k in ("l0", "l1", "l2"))
    assert a["usage_perplexity"] == pytest.approx(4.0) and a["top_row_share"] == pytest.approx(0.25)
    assert a["rows_over_5pct"] == 4 and b["rows_over_5pct"] == 1 and b["usage_perplexity"] == pytest.approx(1.0)
    # each of the 8 channels is on for a quarter of the images: differs on 2 * (n/4)(3n/4) / (n(n-1)) of pairs
    assert a["mask_difference"] == pytest.approx((n / 4) * (3 * n / 4) / (n * (n - 1) / 2))
    assert b["mask_difference"] == 0.0 and c["mask_difference"] > 0
    assert a["dynamic_channel_share"] == 1.0 and b["dynamic_channel_share"] == 0.0
    assert c["dynamic_channel_share"] == 0.0  # the old "ever on and ever off" count would call channel 7 dynamic
    assert metrics["max_top_row_share"] == 1.0 and metrics["min_rows_over_5pct"] == 1
    assert metrics["probe_top1"] > 95 and metrics["probe_shuffled_top1"] < 40
    blind = dynamism_metrics(_decisions([rows[torch.randint(4, (n,))]]), labels)  # routing ignores the class
    assert blind["probe_top1"] < 40 and blind["layers"]["l0"]["rows_over_5pct"] == 4


def test_pair_difference_is_the_exact_mean_over_pairs():
    masks = torch.rand(7, 5) < 0.4
    brute = torch.stack([(masks[i] != masks[j]).double() for i in range(7) for j in range(i + 1, 7)]).mean(0)
    assert torch.allclose(pair_difference(masks), brute)
    assert dynamic_channels(torch.zeros(10, 3, dtype=torch.bool)).sum() == 0


def _randomised(actions: int = 5) -> DynamicNetwork:
    net = DynamicNetwork(build_backbone("resnet20"), DecisionSettings(actions=actions)).eval()
    with torch.no_grad():
        for g in net.gates:
            g.codebook.copy_((torch.rand_like(g.codebook) < 0.6) * (0.5 + torch.rand_like(g.codebook)))
            g.head.weight.normal_(0, 3)
        for module in net.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.bias.data.uniform_(-0.3, 0.3)
    return net


def test_static_twin_equals_the_network_with_its_decisions_forced():
    net = _randomised()
    x = torch.rand(12, 1, 1, 1) * torch.rand(12, 3, 32, 32)
    rows = most_used_rows(net, x)
    before = [g.gate.codebook.detach().clone() for g in net.gated]
    with torch.no_grad():
        dynamic = net(x)
        for g, row in zip(net.gated, rows):
            g.gate.forced = g.gate.effective_codebook().detach()[row].expand(len(x), -1).clone()
        forced = net(x)
        for g in net.gated:
            g.gate.forced = None
    assert not torch.allclose(dynamic, forced)  # the decisions mattered, so the test can fail
    twin = static_twin(net, rows)
    with torch.no_grad():
        assert torch.allclose(twin(x), forced, atol=1e-5)
        with fixed_rows(net, rows):
            assert torch.allclose(net(x), forced, atol=1e-5)
    assert all(torch.equal(a, g.gate.codebook) for a, g in zip(before, net.gated))  # restored
    logits, macs = sparse_forward(twin, x)
    assert torch.allclose(logits, forced, atol=1e-4)
    assert len(set(macs.tolist())) == 1 and head_macs(twin) > 0
    # rows are counted by channel set: the most used row is the one most images pick
    net(x)
    chosen = torch.stack([g.gate.selection.argmax(1) for g in net.gated])
    for k, row in enumerate(rows):
        sets = mask_ids(net.gated[k].gate.effective_codebook() != 0)
        assert (sets[chosen[k]] == sets[row]).sum() == torch.bincount(sets[chosen[k]]).max()


def test_other_image_control_differs_and_controls_are_size_corrected():
    g = torch.Generator().manual_seed(0)
    info = torch.rand(40, 16, generator=g)
    info[:, :4] += 3.0  # channels 0-3 carry most of the information for every image
    selected = torch.zeros(40, 16, dtype=torch.bool)
    selected[:, :4] = True  # own: the 4 informative channels
    selected[:10, 4] = True  # a quarter of the images keep a 5th channel: the only other selection
    big = torch.zeros(16, dtype=torch.bool)
    big[:12] = True  # a static control three times as large: raw credibility is higher, but not per channel
    _, summary = credibility_controls(info, selected, big)
    assert summary["credibility_other_differs_share"] == 1.0
    assert summary["credibility_other_pool_share"] == pytest.approx((10 * 30 + 30 * 10) / 40 / 39)
    assert summary["credibility_static"] > summary["credibility_own"]  # raw: the bigger set wins
    assert summary["credibility_tests_sized"]["static"]["beats"]  # size-corrected: own is better per size
    assert summary["credibility_set_sizes"]["static"] == 12
    same = selected[:1].expand(40, 16)
    _, summary = credibility_controls(info, same, big)
    assert summary["credibility_other_differs_share"] == 0.0 and not summary["credibility_tests"]["other"]["beats"]


class TwoPathNet(nn.Module):
    """Planted: stem channels 0-1 see red, 2-3 see blue; gated conv channels 0-2 read the red stem channels,
    3-5 the blue ones; so red images need gated channels 0-2 and blue images 3-5."""

    def __init__(self):
        from common.backbones import Backbone, GateSite

        class Net(Backbone):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 4, 1, bias=False)
                self.conv_a, self.bn_a = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
                self.conv_b, self.bn_b = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)
                self.fc = nn.Linear(4, 2)
                with torch.no_grad():
                    self.stem.weight.zero_()
                    self.stem.weight[:2, 0] = 1.0  # red
                    self.stem.weight[2:, 2] = 1.0  # blue
                    self.conv_a.weight.zero_()
                    self.conv_a.weight[:3, :2] = 1.0
                    self.conv_a.weight[3:, 2:] = 1.0
                    self.conv_a.weight.add_(0.01 * torch.randn_like(self.conv_a.weight))
                    self.conv_b.weight.fill_(0.5)

            @property
            def classifier(self):  # type: ignore[override]
                return self.fc

            def forward_features(self, x):
                out = torch.relu(self.stem(x))
                out = torch.relu(self.bn_a(self.conv_a(out)))
                return torch.relu(self.bn_b(self.conv_b(out)))

            def gate_sites(self):
                return [GateSite("conv_a", self.conv_a, self.bn_a, internal=True, consumer=self.conv_b)]

        super().__init__()
        self.net = Net()


def test_planted_two_kinds_are_routed_to_different_rows_that_keep_their_channels():
    backbone = TwoPathNet().net.eval()
    config = DecisionSettings(actions=4, codebook_init="clusters", init_clusters=2, regulariser="density",
                            target=0.5, balance=0.1)
    net = DynamicNetwork(backbone, config, input_size=(3, 8, 8))
    g = torch.Generator().manual_seed(0)
    red = torch.rand(64, 3, 8, 8, generator=g) * torch.tensor([1.0, 0.1, 0.1])[:, None, None]
    blue = torch.rand(64, 3, 8, 8, generator=g) * torch.tensor([0.1, 0.1, 1.0])[:, None, None]
    images = torch.cat([red, blue])
    kinds = torch.arange(128) >= 64
    net.init_by_clusters(images, config, seed=0)
    targets = net.eval()(images).argmax(1)
    # a few training steps of the decisions (Gumbel, straight-through), as in the decision stage
    opt = torch.optim.Adam(net.gate_parameters(), lr=0.01)
    from drib.losses import balance_loss
    for step in range(20):
        net.train()
        net.set_tau(1.0 * 0.1 ** (step / 19))
        loss = nn.functional.cross_entropy(net(images), targets) + 0.1 * balance_loss(net)
        opt.zero_grad()
        loss.backward(inputs=net.gate_parameters())
        opt.step()
        net.project_()
    masks = net.channel_masks(images)[0] != 0
    ids = mask_ids(masks)
    red_row, blue_row = int(torch.mode(ids[~kinds]).values), int(torch.mode(ids[kinds]).values)
    assert red_row != blue_row
    assert (ids[~kinds] == red_row).float().mean() > 0.9 and (ids[kinds] == blue_row).float().mean() > 0.9
    assert masks[~kinds][:, :3].float().mean() > 0.9 and masks[~kinds][:, 3:].float().mean() < 0.1
    assert masks[kinds][:, 3:].float().mean() > 0.9 and masks[kinds][:, :3].float().mean() < 0.1
    metrics = dynamism_metrics(_decisions([masks]), kinds.long())
    assert metrics["probe_top1"] > 95 and metrics["layers"]["l0"]["top_row_share"] < 0.6


def test_static_variant_is_one_row_per_layer_and_a_bad_variant_is_refused():
    from drib import variant_settings

    variant, nested = variant_settings({"variant": "static", "backbone": "resnet20", "target_mac_reduction": 0.5,
                                        "decision": {"lam": 0.5}})
    assert variant == "static" and nested["decision"] == {"lam": 0.5, "actions": 1, "codebook_init": "importance"}
    assert nested["target_mac_reduction"] == 0.5 and "backbone" not in nested
    assert variant_settings({})[0] == "dynamic"
    with pytest.raises(ValueError, match="variant"):
        variant_settings({"variant": "frozen"})
