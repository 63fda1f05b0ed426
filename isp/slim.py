"""Physical pruning: a genuinely smaller network with the closed channels removed from the weight tensors.

For every prunable site: keep the open output rows of its conv and BN, the same channels of the depthwise
convs and BNs that carry them (MobileNetV2), and the matching input columns of the consumer. Residual
streams are untouched, so every block still adds tensors of equal width.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from common.backbones import Backbone

from .model import GateInjector, PrunableSite, prunable_sites


def _select(param: Tensor | None, index: Tensor, dim: int) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach().index_select(dim, index).clone(), requires_grad=param.requires_grad)


def _keep_conv_outputs(conv: nn.Conv2d, index: Tensor) -> None:
    conv.weight = _select(conv.weight, index, 0)
    if conv.bias is not None:
        conv.bias = _select(conv.bias, index, 0)
    if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: inputs follow outputs
        conv.in_channels = conv.groups = len(index)
    conv.out_channels = len(index)


def _keep_bn(bn: nn.BatchNorm2d, index: Tensor) -> None:
    bn.weight = _select(bn.weight, index, 0)
    bn.bias = _select(bn.bias, index, 0)
    bn.running_mean = bn.running_mean.index_select(0, index).clone()
    bn.running_var = bn.running_var.index_select(0, index).clone()
    bn.num_features = len(index)


def _keep_inputs(layer: nn.Module, index: Tensor) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"cannot slim the inputs of grouped conv {layer}")
        layer.weight = _select(layer.weight, index, 1)
        layer.in_channels = len(index)
    elif isinstance(layer, nn.Linear):
        layer.weight = _select(layer.weight, index, 1)
        layer.in_features = len(index)
    else:
        raise ValueError(f"cannot slim the inputs of {type(layer).__name__}")


def kept_indices(gates: Sequence[Tensor]) -> list[Tensor]:
    """Channel indices whose hard gate is 1, one int64 tensor per site."""
    return [torch.nonzero(g > 0.5).flatten().cpu() for g in gates]


def slim_in_place(backbone: Backbone, sites: Sequence[PrunableSite], keep: Sequence[Tensor]) -> Backbone:
    """Remove every channel not in ``keep`` from ``backbone`` (whose ``sites`` these are)."""
    if len(keep) != len(sites):
        raise ValueError(f"{len(keep)} keep-lists for {len(sites)} prunable sites")
    for site, index in zip(sites, keep):
        if len(index) == 0:
            raise ValueError(f"site {site.name} would keep no channel")
        index = index.to(site.conv.weight.device)
        _keep_conv_outputs(site.conv, index)
        _keep_bn(site.bn, index)
        for conv, bn in zip(site.depthwise, site.followers):
            _keep_conv_outputs(conv, index)
            _keep_bn(bn, index)
        _keep_inputs(site.consumer, index)
    return backbone


def slim_copy(backbone: Backbone, keep: Sequence[Tensor], input_size: tuple[int, int, int]) -> Backbone:
    """A slim deep copy of ``backbone``; the original is left as it was."""
    slim = copy.deepcopy(backbone)
    return slim_in_place(slim, prunable_sites(slim, input_size), keep)


def keep_to_json(sites: Sequence[PrunableSite], keep: Sequence[Tensor]) -> dict[str, list[int]]:
    return {site.name: [int(i) for i in index] for site, index in zip(sites, keep)}


def keep_from_json(sites: Sequence[PrunableSite], saved: Mapping[str, list[int]]) -> list[Tensor]:
    missing = [s.name for s in sites if s.name not in saved]
    if missing:
        raise ValueError(f"the saved architecture lacks sites {missing[:3]}: it belongs to another backbone")
    return [torch.tensor(saved[s.name], dtype=torch.int64) for s in sites]


@torch.no_grad()
def slim_vs_gated(classifier: Backbone, slim: Backbone, sites, hard, images: torch.Tensor) -> float:
    """Max |logit difference| between the classifier with hard gates and the physically pruned network."""
    classifier.eval()
    slim.eval()
    injector = GateInjector(sites)
    injector.values = hard
    with injector:
        gated = classifier(images)
    return float((gated - slim(images)).abs().max())
