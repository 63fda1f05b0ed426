import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.backbones import WeightsError, build_backbone, list_backbones, load_weights
from common.macs import count_macs, count_params

# (backbone, conv+linear MACs at 3x32x32, parameters): oracles measured independently for the same
# definitions (shared/notes/ecosystem.md, section 2.1).
ORACLES = [
    ("resnet20", 40_551_040, 269_722),   # option-A shortcut
    ("resnet56", 125_485_696, 853_018),  # option-A shortcut
    ("vgg16", 313_201_664, 14_728_266),  # CIFAR VGG-16-BN, one 512->10 classifier
    ("resnet18", 555_422_720, 11_173_962),  # 3x3 stem, no max-pool
    ("mobilenetv2", 304_075_264, 2_297_754),  # ISP variant: stage-3 stride 1, last map 8x8
]


@pytest.mark.parametrize(("name", "macs", "params"), ORACLES)
def test_macs_and_params_match_oracles(name, macs, params):
    model = build_backbone(name)
    assert count_macs(model) == macs
    assert count_params(model) == params


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2"])
def test_flop_counter_sees_exactly_twice_our_macs(name):
    model = build_backbone(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * count_macs(model)


def test_every_registered_backbone_builds_and_classifies():
    for name in list_backbones():
        model = build_backbone(name, num_classes=7).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 7), name


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(ValueError, match=r"known backbones: .*resnet56.*vgg16"):
        build_backbone("resnet57")


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg16", "mobilenetv2"])
def test_gate_sites_are_consistent(name):
    model = build_backbone(name)
    sites = model.gate_sites()
    assert sites and len({s.name for s in sites}) == len(sites)
    for site in sites:
        assert model.get_submodule(site.name) is site.conv
        assert site.bn.num_features == site.conv.out_channels
        if site.internal:
            reads = site.consumer.in_features if isinstance(site.consumer, nn.Linear) else site.consumer.in_channels
            assert reads == site.channels
        for follower in site.followers:
            assert follower.num_features == site.channels


def test_masking_an_internal_site_zeroes_its_channels_downstream():
    model = build_backbone("mobilenetv2").eval()
    site = model.gate_sites()[3]
    mask = torch.zeros(site.channels)
    mask[::2] = 1
    captured = {}
    hooks = [bn.register_forward_hook(lambda m, i, o: o * mask.view(1, -1, 1, 1)) for bn in (site.bn, *site.followers)]
    hooks.append(site.consumer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0])))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert captured["x"][:, 1::2].abs().max() == 0
    assert captured["x"][:, ::2].abs().max() > 0


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet20", [(16, 32), (32, 16), (64, 8)]),
    ("mobilenetv2", [(32, 32), (96, 16), (1280, 8)]),  # ISP supplementary's scales
])
def test_feature_stages(name, expected):
    model = build_backbone(name).eval()
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((o.shape[1], o.shape[-1])))
             for m in model.feature_stages()]
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == expected


def test_forward_is_features_then_head():
    model = build_backbone("resnet20").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


def test_weights_round_trip_and_module_prefix(tmp_path):
    source = build_backbone("resnet20")
    path = tmp_path / "w.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = build_backbone("resnet20", weights=path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_corrupt_and_foreign_weights_fail_clearly(tmp_path):
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="corrupt"):
        build_backbone("resnet20", weights=corrupt)
    foreign = tmp_path / "foreign.th"
    torch.save(build_backbone("resnet32").state_dict(), foreign)
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(build_backbone("resnet20"), foreign)
    with pytest.raises(WeightsError, match="does not exist"):
        build_backbone("resnet20", weights=tmp_path / "missing.th")
