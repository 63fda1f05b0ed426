"""A backbone with an architecture controlling module on every gated conv: the decoupled network.

Gate placement follows the paper ("all convolutional layers except the first and last"): every
``GateSite`` the backbone lists is gated; the backbones list every conv but the stem, and the last layer is
the linear classifier. A calculation path is the concatenation of all encoding vectors z^l of one input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.backbones import Backbone
from common.macs import ChannelActivity, LayerShape, count_macs, dynamic_macs, layer_shapes

from .controller import GatedConvBN


@dataclass
class PathRecord:
    """What one forward pass leaves in the gated layers, in layer order."""

    masks: list[Tensor]  # z^l, B x N^l
    pooled: list[Tensor]  # y^l = GAP((BN(conv))_+), B x N^l, before masking
    logits: list[Tensor]  # G(s^l), B x N^l


class DecoupledNet(nn.Module):
    """Pixels in [0, 1] -> logits, like every backbone; ``gated_layers`` are the controlled convs."""

    def __init__(self, backbone: Backbone, reduction: int = 4, init_bias: float = 1.0):
        super().__init__()
        sites = backbone.gate_sites()
        if not sites:
            raise ValueError(f"{type(backbone).__name__} lists no gate sites; nothing to decouple")
        unsupported = [s.name for s in sites if s.followers]
        if unsupported:
            raise ValueError(
                f"{type(backbone).__name__} has gate sites whose mask must also reach depthwise BNs "
                f"({unsupported[0]}, ...); decoupling supports the CIFAR ResNets, resnet18 and vgg16")
        self.backbone = backbone
        gated: dict[int, GatedConvBN] = {}
        for site in sites:
            layer = GatedConvBN(site.name, site.conv, site.bn, reduction, init_bias)
            bn_name = backbone.module_name(site.bn)
            _replace(backbone, site.name, layer)
            _replace(backbone, bn_name, nn.Identity())
            gated[id(site.conv)] = layer
        for site in sites:
            if site.consumer is not None and id(site.consumer) in gated:
                gated[id(site.consumer)].set_producer(gated[id(site.conv)])
        self.gated_layers: list[GatedConvBN] = [gated[id(s.conv)] for s in sites]
        self._shapes: dict[tuple[int, ...], list[LayerShape]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.gated_layers]

    @property
    def layer_channels(self) -> list[int]:
        return [layer.channels for layer in self.gated_layers]

    def forward_with_paths(self, x: Tensor) -> tuple[Tensor, PathRecord]:
        logits = self(x)
        record = PathRecord(masks=[g.last_mask for g in self.gated_layers],
                            pooled=[g.last_pooled for g in self.gated_layers],
                            logits=[g.last_logits for g in self.gated_layers])
        return logits, record

    @torch.no_grad()
    def paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, calculation paths B x sum N^l as 0/1 floats) in inference mode (Eq. 5)."""
        with self.inference():
            logits, record = self.forward_with_paths(x)
        return logits, torch.cat(record.masks, dim=1)

    def set_hard_gates(self, hard: bool) -> None:
        """Hard gates: SemHash in its inference form (Eq. 5) even in training mode, so that the backbone
        (BN statistics included) can be fine-tuned on exactly the paths it will run at inference."""
        for layer in self.gated_layers:
            layer.hard_gates = hard

    def controller_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.gated_layers for p in layer.controller.parameters()]

    @contextmanager
    def inference(self, gathered: bool = False) -> Iterator[None]:
        """Eval mode for the duration; ``gathered`` computes only the selected filters."""
        was_training = self.training
        self.eval()
        for layer in self.gated_layers:
            layer.gathered = gathered
        try:
            yield
        finally:
            for layer in self.gated_layers:
                layer.gathered = False
            self.train(was_training)

    def layer_shapes(self, input_size: tuple[int, int, int]) -> list[LayerShape]:
        key = tuple(input_size)
        if key not in self._shapes:
            self._shapes[key] = layer_shapes(self, input_size)
        return self._shapes[key]

    def channel_activity(self) -> dict[str, ChannelActivity]:
        """Per-layer active input/output channels of the last forward, keyed by the conv's module name
        (as ``common.macs.layer_shapes`` names it). Inputs are skipped only where a gated producer
        zeroes them, exactly as the gathered execution does."""
        return {f"backbone.{layer.name}.conv": ChannelActivity(inputs=layer.input_mask(), outputs=layer.last_mask)
                for layer in self.gated_layers}

    @torch.no_grad()
    def dynamic_forward(self, x: Tensor, gathered: bool = False) -> tuple[Tensor, Tensor]:
        """(logits, per-sample MACs as float64 B). MACs count the conv and linear work that the gathered
        execution really does, controllers included. ``gathered=False`` computes the same logits with
        masked dense convolutions (faster in batches; equal up to float rounding)."""
        shapes = self.layer_shapes(tuple(x.shape[1:]))  # before the forward: it runs one of its own
        with self.inference(gathered=gathered):
            logits = self(x)
            macs = dynamic_macs(shapes, self.channel_activity(), x.shape[0])
        return logits, macs

    def dense_macs(self, input_size: tuple[int, int, int]) -> int:
        """MACs with every gate open (controllers included)."""
        return count_macs(self, input_size)


def _replace(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new  # works for attributes and nn.Sequential indices alike


def save_decoupled(model: DecoupledNet, path, backbone: str, num_classes: int, reduction: int,
                   init_bias: float) -> None:
    """model.pt: what ``load_decoupled`` needs to rebuild the network, and its weights."""
    from common.run import atomic_torch_save

    atomic_torch_save({"backbone": backbone, "num_classes": num_classes, "reduction": reduction,
                       "init_bias": init_bias, "state_dict": model.state_dict()}, path)


def load_decoupled(path, map_location: str | torch.device = "cpu") -> tuple[DecoupledNet, dict]:
    """Rebuild a decoupled network from ``model.pt``; returns it with the file's metadata."""
    from common.backbones import build_backbone
    from common.run import CheckpointError, load_checkpoint

    blob = load_checkpoint(path, map_location)
    if not isinstance(blob, dict) or "state_dict" not in blob or "backbone" not in blob:
        raise CheckpointError(f"{path} is not a decoupling model file (written by `python -m decoupling train`)")
    model = DecoupledNet(build_backbone(blob["backbone"], blob["num_classes"]), blob["reduction"], blob["init_bias"])
    model.load_state_dict(blob["state_dict"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta
