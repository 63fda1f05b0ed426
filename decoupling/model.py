"""A backbone with an architecture controlling module on every gated conv: the decoupled network.

Gate placement follows the paper ("all convolutional layers except the first and last"): every
``GateSite`` the backbone lists is gated; the backbones list every conv but the stem, and the last layer is
the linear classifier. A calculation path is the concatenation of all encoding vectors z^l of one input.

The architecture controlling module (Eq. 2) and the gated conv it drives:
For layer l with input X^l (C channels) and N filters: s = GAP(X^l), G(s) = W2 (W1 s)_+ with
W1: C/gamma x C and W2: N x C/gamma (gamma = 4), then z^l = SemHash(G(s)) selects the filters, and the
layer output is Y^l * z^l. The controller reads the layer's *input*, so at inference the filter selection
is known before the convolution runs and unselected filters are never computed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone
from common.macs import ChannelActivity, LayerShape, count_macs, dynamic_macs, layer_shapes
from common.precision import Precision, full_precision, resolve_precision
from common.sparse import bn_affine, conv_bn_subset, group_rows

from .semhash import improved_semhash, random_half_rows

CONTROLLER_INITS = ("authors", "open")


class ArchitectureController(nn.Module):
    """Eq. 2: GAP -> FC(C -> C/gamma) -> ReLU -> FC(-> N), returning the real vector G(s) (B x N).

    Initialisation (``init``, not in the paper):

    - ``"authors"`` (the authors' code): W1 = 0 with bias 1, W2 Kaiming-normal with bias 1. G(s) starts
      input-independent but different per filter (about N(1, 2): a quarter of the gates start closed), and
      W2 != 0 lets W1 learn an input dependence from the first step. ``init_bias`` is unused.
    - ``"open"``: W2 = 0 with bias ``init_bias`` > 0, so every gate starts open for every input and the
      pretrained network is unchanged at inference until training moves it.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, init_bias: float = 1.0,
                 init: str = "open"):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction ratio gamma must be >= 1, got {reduction}")
        if init not in CONTROLLER_INITS:
            raise ValueError(f"controller init must be one of {CONTROLLER_INITS}, got {init!r}")
        if init == "open" and init_bias <= 0:
            raise ValueError(f"init_bias must be > 0 so that the gates start open, got {init_bias}")
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        if init == "authors":
            nn.init.zeros_(self.fc1.weight)
            nn.init.ones_(self.fc1.bias)
            nn.init.kaiming_normal_(self.fc2.weight)
            nn.init.ones_(self.fc2.bias)
        else:
            nn.init.zeros_(self.fc2.weight)
            nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        s = global_average_pool(x)
        return self.fc2(F.relu(self.fc1(s)))


class _GlobalAveragePool(torch.autograd.Function):
    """s = GAP(x) accumulated and returned in fp32 for a bf16 or fp32 map, without an fp32 copy of the map
    and its backward cast. The same s and ds/dx as ``x.float().mean((2, 3))`` at a fraction of the cost
    (training profile, README)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)  # for its shape, dtype and layout only: no copy is made
        return x.mean(dim=(2, 3), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        share = (grad / (x.shape[2] * x.shape[3])).to(x.dtype)[:, :, None, None]
        # dense in x's own layout: autograd adds it to x's other gradients, and adding a broadcast or a
        # differently laid out map is several times slower than adding two maps of one layout
        return torch.empty_like(x).copy_(share.expand_as(x))


def global_average_pool(x: Tensor) -> Tensor:
    """GAP over the spatial axes of a B x C x H x W map, in fp32 (B x C)."""
    return _GlobalAveragePool.apply(x)


class _MaskAndPool(torch.autograd.Function):
    """(Y * z, GAP((Y)_+)) in one node: the layer output of Eq. 1 and the y^l of Eq. 10. Autograd on the two
    separate expressions runs a ReLU backward on a broadcast gradient, a mean backward that materialises
    it and an accumulation of the two gradients of Y, each a pass over the full map; here one pass forms
    dY = dout * z + 1(Y > 0) dy / HW. Same values and gradients (tested against autograd)."""

    @staticmethod
    def forward(ctx, out: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        zc = z.to(out.dtype)[:, :, None, None]
        ctx.save_for_backward(out, z)
        return out * zc, F.relu(out).mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad_masked: Tensor | None, grad_pooled: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        out, z = ctx.saved_tensors
        zc = z.to(out.dtype)[:, :, None, None]
        grad_out = grad_z = None
        if grad_pooled is not None and ctx.needs_input_grad[0]:
            # dy / HW broadcast into a dense map of out's layout, then the ReLU step (a ReLU backward on the
            # broadcast gradient itself is 7x slower on this CPU in bf16 channels_last)
            share = (grad_pooled / (out.shape[2] * out.shape[3])).to(out.dtype)[:, :, None, None]
            grad_out = torch.ops.aten.threshold_backward(torch.empty_like(out).copy_(share.expand_as(out)), out, 0)
        if grad_masked is not None:
            if ctx.needs_input_grad[0]:
                grad_out = grad_masked * zc if grad_out is None else grad_out.addcmul_(grad_masked, zc)
            if ctx.needs_input_grad[1]:
                grad_z = (grad_masked * out).sum(dim=(2, 3)).to(z.dtype)
        return grad_out, grad_z


def mask_and_pool(out: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(out * z, GAP((out)_+)) for a B x N x H x W map and a B x N mask, with one fused backward."""
    return _MaskAndPool.apply(out, z)


class GatedConvBN(nn.Module):
    """conv -> BN -> mask by z, with z from an ``ArchitectureController`` on the conv's input.

    Replaces a backbone's conv (its BN becomes an identity). After each forward it keeps, for the losses
    and the analysis tools: ``last_logits`` (G(s)), ``last_mask`` (z) and ``last_pooled`` (y^l = GAP of
    (BN(conv(x)))_+ before masking, used by L_kl; masked execution only).

    ``gathered`` (inference only) computes just the selected filters from just the active input
    channels (the producer's mask when the input comes from another gated layer), with gathered weights.
    """

    def __init__(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, reduction: int = 4,
                 init_bias: float = 1.0, init: str = "open"):
        super().__init__()
        self.name = name
        self.conv = conv
        self.bn = bn
        self.controller = ArchitectureController(conv.in_channels, conv.out_channels, reduction, init_bias, init)
        self.gathered = False
        self.hard_gates = False  # training with inference-mode gates (the fine-tuning phase)
        self.keep_maps = False
        # The gated layer whose mask zeroes this layer's input channels; a tuple so that nn.Module does
        # not register it as a child a second time.
        self._producer: tuple[GatedConvBN, ...] = ()
        # Frozen filter states (``DecoupledNet.freeze_states``): at inference energetic filters are always
        # computed and silent ones never, so that the deployed network can remove the silent filters
        # physically and run the energetic ones densely. Empty = not frozen.
        self.register_buffer("always_on", torch.zeros(0, dtype=torch.bool), persistent=True)
        self.register_buffer("always_off", torch.zeros(0, dtype=torch.bool), persistent=True)
        self._static = False  # every filter frozen on or off (a static twin)
        # Samples that take the binary v2 in Eq. 3 (bool B), drawn once per forward by ``DecoupledNet`` and
        # shared by every gated layer; None: this layer draws its own (a layer used on its own).
        self.hard_rows: Tensor | None = None
        self.last_logits: Tensor | None = None
        self.last_mask: Tensor | None = None
        self.last_pooled: Tensor | None = None
        self.last_map: Tensor | None = None

    def freeze_states(self, always_on: Tensor | None, always_off: Tensor | None) -> None:
        """Fix the inference gates of ``always_on`` filters to 1 and of ``always_off`` filters to 0 (bool N);
        None, None unfreezes."""
        if always_on is None or always_off is None:
            self.always_on = torch.zeros(0, dtype=torch.bool, device=self.always_on.device)
            self.always_off = torch.zeros(0, dtype=torch.bool, device=self.always_off.device)
            self._static = False
            return
        if always_on.shape != (self.channels,) or always_off.shape != (self.channels,):
            raise ValueError(f"{self.name}: frozen states need {self.channels} flags each")
        if bool((always_on & always_off).any()):
            raise ValueError(f"{self.name}: a filter cannot be both energetic and silent")
        self.always_on = always_on.to(self.always_on.device, torch.bool)
        self.always_off = always_off.to(self.always_off.device, torch.bool)
        self._static = bool((self.always_on | self.always_off).all())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("always_on", "always_off"):  # the frozen states may be empty or not in the file
            if prefix + key in state_dict:
                setattr(self, key, torch.zeros_like(state_dict[prefix + key]))
            else:
                state_dict[prefix + key] = torch.zeros(0, dtype=torch.bool)
                setattr(self, key, torch.zeros(0, dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._static = bool(self.always_on.numel()) and bool((self.always_on | self.always_off).all())

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    @property
    def producer(self) -> GatedConvBN | None:
        return self._producer[0] if self._producer else None

    def set_producer(self, producer: GatedConvBN) -> None:
        if producer.channels != self.conv.in_channels:
            raise ValueError(f"{producer.name} has {producer.channels} filters but {self.name} reads "
                             f"{self.conv.in_channels} channels")
        self._producer = (producer,)

    def forward(self, x: Tensor) -> Tensor:
        noisy = self.training and not self.hard_gates
        if self.training and not noisy and self._static:
            # Training a static twin (every filter frozen on or off): the controller's output would be
            # overridden and L_kl is not trained, so neither runs; the same output and gradients.
            z = self.always_on.to(torch.float32).expand(x.shape[0], -1)
            self.last_logits, self.last_mask, self.last_pooled = None, z, None
            out = self.bn(self.conv(x))
            out = out * z[:, :, None, None].to(out.dtype)
            self.last_map = out.detach() if self.keep_maps else None
            return out
        with full_precision(x.device):  # the gates are fp32 under any precision policy (common.precision)
            logits = self.controller(x)  # GAP in fp32 (global_average_pool)
            z = improved_semhash(logits, noisy, hard_rows=self.hard_rows if noisy else None)
        if not noisy and self.always_on.numel():
            z = torch.where(self.always_on, torch.ones_like(z), torch.where(self.always_off, torch.zeros_like(z), z))
        self.last_logits, self.last_mask = logits, z
        if self.gathered and not self.training:
            out = self._gathered_forward(x, z)
            self.last_pooled = None
        else:
            out, self.last_pooled = mask_and_pool(self.bn(self.conv(x)), z)
        self.last_map = out.detach() if self.keep_maps else None
        return out

    def input_mask(self) -> Tensor | None:
        """Active input channels of the current forward (B x C), or None when the input is dense."""
        producer = self.producer
        return None if producer is None else producer.last_mask

    def _gathered_forward(self, x: Tensor, z: Tensor) -> Tensor:
        conv = self.conv
        in_mask = self.input_mask()
        h_out = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) \
            // conv.stride[0] + 1
        w_out = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) \
            // conv.stride[1] + 1
        out = x.new_zeros(x.shape[0], conv.out_channels, h_out, w_out)
        keys = z if in_mask is None else torch.cat([in_mask, z], dim=1)
        offset = 0 if in_mask is None else in_mask.shape[1]
        for rows, active in group_rows(keys):
            out_index = active[active >= offset] - offset
            if out_index.numel() == 0:
                continue  # every filter of this layer is off for these samples: nothing to compute
            in_index = None if in_mask is None else active[active < offset]
            if in_index is not None and in_index.numel() == 0:
                # No active input channel: the conv yields its bias only, which BN maps to a constant.
                scale, shift = bn_affine(self.bn)
                bias = conv.bias[out_index] if conv.bias is not None else 0.0
                value = bias * scale[out_index] + shift[out_index]
                compact = value.view(1, -1, 1, 1).expand(len(rows), -1, h_out, w_out)
            else:
                compact = conv_bn_subset(x[rows], conv, self.bn, out_index, in_index)
            out[rows[:, None], out_index[None, :]] = compact
        return out


@dataclass
class PathRecord:
    """What one forward pass leaves in the gated layers, in layer order."""

    masks: list[Tensor]  # z^l, B x N^l
    pooled: list[Tensor]  # y^l = GAP((BN(conv))_+), B x N^l, before masking
    logits: list[Tensor]  # G(s^l), B x N^l


class DecoupledNet(nn.Module):
    """Pixels in [0, 1] -> logits, like every backbone; ``gated_layers`` are the controlled convs."""

    def __init__(self, backbone: Backbone, reduction: int = 4, init_bias: float = 1.0,
                 controller_init: str = "open"):
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
            layer = GatedConvBN(site.name, site.conv, site.bn, reduction, init_bias, controller_init)
            bn_name = backbone.module_name(site.bn)
            _replace(backbone, site.name, layer)
            _replace(backbone, bn_name, nn.Identity())
            gated[id(site.conv)] = layer
        for site in sites:
            if site.consumer is not None and id(site.consumer) in gated:
                gated[id(site.consumer)].set_producer(gated[id(site.conv)])
        self.gated_layers: list[GatedConvBN] = [gated[id(s.conv)] for s in sites]
        self._shapes: dict[tuple[int, ...], list[LayerShape]] = {}
        # The evaluation policy of ``paths`` and ``dynamic_forward`` (common.precision); fp32 until set.
        self.precision: Precision = resolve_precision("fp32", "cpu", channels_last=False)

    def set_precision(self, precision: Precision) -> DecoupledNet:
        """Run the inference entry points (``paths``, ``dynamic_forward``) under ``precision`` (bf16
        autocast and/or channels_last); gates, MAC counts and returned logits stay fp32."""
        self.precision = precision
        precision.prepare_model(self)
        return self

    def _inference_forward(self, x: Tensor) -> Tensor:
        with self.precision.autocast():
            return self(self.precision.prepare_inputs(x)).float()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.backbone(x)
        # Eq. 3: "we randomly use z = v1 for half of the training samples and z = v2 for the rest": one draw
        # per sample for the whole network, so a sample is either binary or soft in every gated layer.
        rows = random_half_rows(x.shape[0], x.device)
        for layer in self.gated_layers:
            layer.hard_rows = rows
        try:
            return self.backbone(x)
        finally:
            for layer in self.gated_layers:
                layer.hard_rows = None

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
            logits = self._inference_forward(x)
        return logits, torch.cat([g.last_mask for g in self.gated_layers], dim=1)

    def set_hard_gates(self, hard: bool) -> None:
        """Hard gates: SemHash in its inference form (Eq. 5) even in training mode, so that the backbone
        (BN statistics included) can be fine-tuned on exactly the paths it will run at inference."""
        for layer in self.gated_layers:
            layer.hard_gates = hard

    @torch.no_grad()
    def freeze_states(self, codes: Tensor | None) -> None:
        """Freeze the filter states seen in ``codes`` (calibration paths, inputs x sum N^l, 0/1): filters
        on for every input become energetic (always computed), filters on for none silent (removed);
        None unfreezes. Only inference (Eq. 5) gates are affected."""
        start = 0
        for layer in self.gated_layers:
            if codes is None:
                layer.freeze_states(None, None)
                continue
            block = codes[:, start:start + layer.channels] > 0
            start += layer.channels
            layer.freeze_states(block.all(dim=0), ~block.any(dim=0))
        if codes is not None and start != codes.shape[1]:
            raise ValueError(f"paths have {codes.shape[1]} entries, the network has {start} gated filters")

    @torch.no_grad()
    def freeze_to_majority(self, codes: Tensor, threshold: float = 0.5) -> None:
        """The static twin's states: every filter on for more than ``threshold`` of the inputs of ``codes``
        (inputs x sum N^l, 0/1) is always on, every other one always off; no filter is left dynamic, so the
        network computes one fixed set of filters for every input."""
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"the majority threshold must lie in [0, 1), got {threshold}")
        if codes.shape[1] != sum(self.layer_channels):
            raise ValueError(f"paths have {codes.shape[1]} entries, the network has {sum(self.layer_channels)} "
                             "gated filters")
        rates = (codes > 0).double().mean(dim=0)
        start = 0
        for layer in self.gated_layers:
            on = rates[start:start + layer.channels] > threshold
            start += layer.channels
            layer.freeze_states(on, ~on)

    @property
    def deployed(self) -> bool:
        """True when every gated layer's filter states are frozen (``freeze_states`` or
        ``freeze_to_majority``): the network the run deploys and measures."""
        return all(layer.always_on.numel() > 0 for layer in self.gated_layers)

    @contextmanager
    def raw_gates(self) -> Iterator[None]:
        """The raw inference gates (Eq. 5) for the duration, as the paper counts filter states: the frozen
        states are lifted and then restored."""
        frozen = [(layer.always_on.clone(), layer.always_off.clone()) for layer in self.gated_layers]
        for layer in self.gated_layers:
            layer.freeze_states(None, None)
        try:
            yield
        finally:
            for layer, (on, off) in zip(self.gated_layers, frozen):
                layer.freeze_states(on if on.numel() else None, off if off.numel() else None)

    def clear_records(self) -> None:
        """Drop what the last forward left in the gated layers (tensors of a training graph cannot be
        deep-copied, e.g. by ``execution.deploy_decoupled``)."""
        for layer in self.gated_layers:
            layer.last_logits = layer.last_mask = layer.last_pooled = layer.last_map = None

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
            logits = self._inference_forward(x)
            macs = dynamic_macs(shapes, self.channel_activity(), x.shape[0])
        return logits, macs

    def expected_macs(self, masks: list[Tensor], input_size: tuple[int, int, int]) -> Tensor:
        """Per-sample MACs (B, differentiable in the masks) of the channel-skipping execution for training
        masks ``masks`` (soft or hard z^l in layer order): a gated conv costs (active inputs) x (active
        filters) x k x H x W, its inputs counted from its producer's mask; every other conv and linear
        layer (stem, classifier, the controllers themselves) is counted dense, as ``dynamic_forward`` does."""
        shapes = {s.name: s for s in self.layer_shapes(tuple(input_size))}
        names = [f"backbone.{layer.name}.conv" for layer in self.gated_layers]
        index = {id(layer): i for i, layer in enumerate(self.gated_layers)}
        total = masks[0].new_full((masks[0].shape[0],), float(sum(s.macs for n, s in shapes.items()
                                                                   if n not in set(names))))
        for layer, name, z in zip(self.gated_layers, names, masks, strict=True):
            shape = shapes[name]
            producer = layer.producer
            a_in = masks[index[id(producer)]].sum(1) if producer is not None else float(shape.in_channels)
            total = total + a_in * z.sum(1) * float(shape.kernel_elems * shape.out_positions * shape.calls)
        return total

    @torch.no_grad()
    def shift_gates(self, offset: float) -> None:
        """Add ``offset`` to every controller's output bias, i.e. to every G(s): one knob that opens
        (offset > 0) or closes (< 0) gates everywhere; used to land the mean MACs on a target."""
        for layer in self.gated_layers:
            layer.controller.fc2.bias.add_(offset)

    def start_macs(self, input_size: tuple[int, int, int]) -> int:
        """MACs of the dense start (the backbone alone, no controller): the reference of a MAC target."""
        return sum(s.macs for s in self.layer_shapes(tuple(input_size)) if ".controller." not in s.name)

    def dense_macs(self, input_size: tuple[int, int, int]) -> int:
        """MACs with every gate open (controllers included)."""
        return count_macs(self, input_size)


def _replace(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new  # works for attributes and nn.Sequential indices alike


def backbone_name(model: Backbone) -> str:
    """The registry name of a backbone instance (for Table 5 defaults and to rebuild it from model.pt)."""
    kind = type(model).__name__
    if kind == "CifarResNet":
        return f"resnet{2 * len(model.blocks()) + 2}"  # type: ignore[attr-defined]
    if kind == "VGG":
        return "vgg16"
    if kind == "ResNet18":
        return "resnet18"
    raise ValueError(f"decoupling does not support backbone class {kind}; use a CIFAR ResNet, resnet18 or vgg16")


def save_decoupled(model: DecoupledNet, path, backbone: str, num_classes: int, reduction: int,
                   init_bias: float, controller_init: str = "open", deployment: dict[str, Any] | None = None) -> None:
    """model.pt: what ``load_decoupled`` needs to rebuild the network, and its weights (the frozen filter
    states included); ``deployment`` says how the states were frozen (e.g. the calibration images)."""
    from common.run import atomic_torch_save

    atomic_torch_save({"backbone": backbone, "num_classes": num_classes, "reduction": reduction,
                       "init_bias": init_bias, "controller_init": controller_init, "deployment": deployment or {},
                       "state_dict": model.state_dict()}, path)


def load_decoupled(path, map_location: str | torch.device = "cpu") -> tuple[DecoupledNet, dict]:
    """Rebuild a decoupled network from a ``model.pt`` file; returns it with the file's metadata (internal:
    the public way to load a run is ``load_run``)."""
    from common.backbones import build_backbone
    from common.run import CheckpointError, load_checkpoint

    blob = load_checkpoint(path, map_location)
    if not isinstance(blob, dict) or "state_dict" not in blob or "backbone" not in blob:
        raise CheckpointError(f"{path} is not a decoupling model file (written by `python -m decoupling train`)")
    model = DecoupledNet(build_backbone(blob["backbone"], blob["num_classes"]), blob["reduction"], blob["init_bias"],
                         blob.get("controller_init", "open"))
    model.load_state_dict(blob["state_dict"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta


def run_model_file(path: str | os.PathLike) -> Path:
    """``path/model.pt`` of a run directory, or a one-line error saying what writes it."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a run directory; train into it first "
                                f"(python -m decoupling train --out {folder})")
    file = folder / "model.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; train into {folder} first")
    return file


def load_run(path: str | os.PathLike, *, device: torch.device | str | None = None) -> DecoupledNet:
    """The trained network of a run directory: ``path/model.pt`` as written by ``python -m decoupling
    train``, by ``run_method`` (the network it returned) or by the ``static-twin`` command (``RUN/static_twin``).

    It is the deployed network (filter states frozen on calibration training images at the end of
    training: energetic filters always on, silent ones off, the rest gated per input), pixels in [0, 1] ->
    logits, in eval mode and fp32 on ``device`` (None: ``common.run.pick_device``'s default), loaded with
    ``weights_only=True``: the logits the run's own evaluation measures."""
    from common.run import pick_device

    file = run_model_file(path)
    target = pick_device(None if device is None else str(device))
    model, _ = load_decoupled(file, target)
    if not model.deployed:
        raise ValueError(f"{file} holds a decoupled network without frozen filter states, not a deployed one; "
                         f"train the run again (python -m decoupling train --out {Path(path)})")
    return model.to(target).eval()
