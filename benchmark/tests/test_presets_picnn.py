"""The settings every preset hands picnn.run_method build the paper's configuration: an added target conv of
round(12.8 K) = 128 filters on CIFAR-10, and the picnn-lambda0 control is that same architecture."""

import pytest

from benchmark.presets import get_preset, list_presets
from common.backbones import build_backbone
from common.macs import count_macs
from picnn import PicnnNet, PicnnSettings

CIFAR10 = [name for name in list_presets() if get_preset(name).dataset == "cifar10"]


def _network(backbone: str, settings: dict) -> PicnnNet:
    config = PicnnSettings.from_dict(settings)
    return PicnnNet(build_backbone(backbone, 10), 10, config.filters, config.target_layer)


def test_every_cifar10_preset_is_listed():
    assert {"cifar10-cpu", "cifar10-cpu-full", "cifar10", "paper"} <= set(CIFAR10)


@pytest.mark.parametrize("name", CIFAR10)
def test_picnn_rows_get_the_added_128_filter_layer_and_the_control_the_same_one(name):
    preset = get_preset(name)
    picnn, control = preset.method_settings("picnn"), preset.method_settings("picnn-lambda0")
    assert control["lam"] == 0.0 and picnn.get("lam", PicnnSettings().lam) > 0
    assert {k: v for k, v in control.items() if k != "lam"} == {k: v for k, v in picnn.items() if k != "lam"}
    nets = [_network(preset.backbone, s) for s in (picnn, control)]
    for net in nets:
        assert net.added_target_conv and net.filters == 128 and net.classifier.in_features == 128
    assert [(n, p.shape) for n, p in nets[0].named_parameters()] == \
        [(n, p.shape) for n, p in nets[1].named_parameters()]
    # its cost stays in the MAC columns: the added conv 64 -> 128 at 8 x 8 and the wider classifier
    assert count_macs(nets[0]) - count_macs(nets[0].backbone) == 64 * 128 * 9 * 64 + (128 - 64) * 10
