"""Static and per-sample dynamic MAC counting.

What is counted: multiply-accumulates of ``nn.Conv2d`` (C_in / groups x C_out x k_h x k_w x H_out x W_out)
and ``nn.Linear`` (in x out) modules, per sample. What is not counted: biases, BatchNorm, activations,
pooling, additions, padding shortcuts, and functional convolutions that bypass modules. This is the
convention of the literature's "125.5 M MACs for ResNet-56"; ``torch.utils.flop_counter`` reports exactly
twice these numbers (2 FLOPs per MAC) for our backbones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerShape:
    """A conv or linear layer as seen in one forward pass of a single sample."""

    name: str
    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    groups: int
    kernel_elems: int  # k_h * k_w (1 for linear)
    out_positions: int  # H_out * W_out (1 for linear)
    calls: int  # how often the module ran in one forward

    @property
    def macs(self) -> int:
        return self.calls * self.in_channels // self.groups * self.out_channels * self.kernel_elems * self.out_positions


def layer_shapes(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> list[LayerShape]:
    """Run one zero image through ``model`` (eval mode, no grad) and record every conv/linear call."""
    records: dict[str, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(_recorder(name, records)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [LayerShape(name=name, **fields) for name, fields in records.items()]


def _recorder(name: str, records: dict[str, dict]):
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if name in records:
            records[name]["calls"] += 1
            return
        if isinstance(module, nn.Conv2d):
            records[name] = dict(kind="conv", in_channels=module.in_channels, out_channels=module.out_channels,
                                 groups=module.groups, kernel_elems=module.kernel_size[0] * module.kernel_size[1],
                                 out_positions=output.shape[-1] * output.shape[-2], calls=1)
        else:
            positions = output[0].numel() // module.out_features
            records[name] = dict(kind="linear", in_channels=module.in_features, out_channels=module.out_features,
                                 groups=1, kernel_elems=1, out_positions=positions, calls=1)
    return hook


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Dense MACs of one sample (see the module docstring for what counts)."""
    return sum(layer.macs for layer in layer_shapes(model, input_size))


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters (weights and biases; BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class ChannelActivity:
    """Which channels of one layer are active for each sample: bool or 0/1 tensors of shape B x C.
    ``None`` means all channels are active."""

    inputs: Tensor | None = None
    outputs: Tensor | None = None


def dynamic_macs(shapes: list[LayerShape], activity: Mapping[str, ChannelActivity], batch_size: int) -> Tensor:
    """Per-sample MACs (float64 tensor of length ``batch_size``) of a channel-skipping implementation.

    A conv with ``a_in`` active input and ``a_out`` active output channels costs
    a_in / groups x a_out x k x H_out x W_out. For a depthwise conv (groups == channels) a channel is
    computed only if both its input and its output are active. Layers missing from ``activity`` are dense.
    """
    total = torch.zeros(batch_size, dtype=torch.float64)
    for layer in shapes:
        act = activity.get(layer.name)
        if act is None or (act.inputs is None and act.outputs is None):
            total += layer.macs
            continue
        a_in = _active_counts(act.inputs, layer.in_channels, batch_size)
        a_out = _active_counts(act.outputs, layer.out_channels, batch_size)
        per_position = layer.kernel_elems * layer.out_positions * layer.calls
        if layer.groups == 1:
            total += a_in * a_out * per_position
        elif layer.groups == layer.in_channels == layer.out_channels:
            both = _active_both(act, layer.in_channels, batch_size)
            total += both * per_position
        else:  # grouped conv: assume activity is spread evenly over the groups
            total += a_in / layer.groups * a_out * per_position
    return total


def _active_counts(mask: Tensor | None, channels: int, batch_size: int) -> Tensor:
    if mask is None:
        return torch.full((batch_size,), float(channels), dtype=torch.float64)
    if mask.shape != (batch_size, channels):
        raise ValueError(f"channel activity of shape {tuple(mask.shape)}, expected {(batch_size, channels)}")
    return (mask != 0).sum(dim=1).to(torch.float64).cpu()


def _active_both(act: ChannelActivity, channels: int, batch_size: int) -> Tensor:
    ones = torch.ones(batch_size, channels, dtype=torch.bool)
    a = ones if act.inputs is None else act.inputs.cpu() != 0
    b = ones if act.outputs is None else act.outputs.cpu() != 0
    return (a & b).sum(dim=1).to(torch.float64)
