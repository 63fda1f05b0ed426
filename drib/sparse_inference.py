"""Inference that really skips the unselected channels (theta'_l of Eq. 4).

`deploy(net)` (residual BasicBlock backbones: the CIFAR ResNets, ResNet-18) builds a standalone copy once:
every BN folded into its conv; for each gated block and each code-book row r (a finite set of masks), conv1
sliced to the row's kept output channels with BN1 and the decision's scale G_l[r] folded in, and conv2
sliced to the same input channels with BN2 folded; at run time each block decides and runs the pre-sliced
convolutions of the batch's code; a batch with several codes runs once on the union of their channels
(default, weights of each union sliced once and cached), per code on its group of samples
(`multi="group"`), or the most frequent code on its samples and the union of the rest on the others
(`multi="majority"`); the gathers keep channels_last. Ungated blocks and the dense start run the same
folded path with one code.

Fallback for other backbones (VGG, MobileNetV2): inside `channel_skipping(net)`, each gated conv + BN pair
is swapped for a module that runs the decision,
groups the batch by chosen action pattern and computes, per group, only the selected output channels
from the active input channels (gathered weights, `common.sparse.conv_bn_subset`); the convs that consume
gated channels read only the active ones. Outputs equal the masked dense computation (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones.base import BasicBlock
from common.sparse import bn_affine, conv_bn_subset, group_rows, scatter_channels

from .decision import DecisionGate
from .model import DynamicNetwork


class _InputSource:
    """Where a conv learns which of its input channels are active: the gate that produced them."""

    def __init__(self, gate: DecisionGate | None = None):
        self.gate = gate

    def active(self, batch: int, channels: int, device: torch.device) -> Tensor:
        if self.gate is None or self.gate.mask is None:
            return torch.ones(batch, channels, dtype=torch.bool, device=device)
        return self.gate.mask != 0


def _grouped(in_active: Tensor, out_active: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Samples sharing (input pattern, output pattern): (sample index, input channels, output channels)."""
    c_in = in_active.shape[1]
    groups = []
    for rows, channels in group_rows(torch.cat([in_active, out_active], dim=1)):
        groups.append((rows, channels[channels < c_in], channels[channels >= c_in] - c_in))
    return groups


def _subset_conv(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, in_active: Tensor,
                 out_active: Tensor, scale: Tensor | None) -> Tensor:
    """bn(conv(x)) * scale, computing per group only the active outputs from the active inputs."""
    out: Tensor | None = None
    for rows, in_index, out_index in _grouped(in_active, out_active):
        xs = x[rows]
        if conv.groups != 1:  # depthwise: a channel is computed iff it is active on both sides
            out_index = out_index[torch.isin(out_index, in_index)]
            in_index = None
        elif in_index.numel() == 0:  # nothing to read: the output is BN's shift alone
            xs, in_index = torch.zeros_like(xs[:, :1]), torch.zeros(1, dtype=torch.long, device=x.device)
        if out_index.numel() == 0:
            compact = None
        else:
            compact = conv_bn_subset(xs, conv, bn, out_index, in_index)
            if scale is not None:
                compact = compact * scale[rows][:, out_index, None, None]
        if out is None:
            h, w = _output_size(x, conv)
            out = x.new_zeros(x.shape[0], conv.out_channels, h, w)
        if compact is not None:
            out[rows] = scatter_channels(compact, out_index, conv.out_channels)
    assert out is not None
    return out


def _output_size(x: Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    sizes = []
    for i, dim in enumerate(x.shape[-2:]):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]  # type: ignore[index]
        sizes.append((dim + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


class _SkippingConv(nn.Module):
    """Replaces a conv (and absorbs its BN when ``bn`` is given, the BN then becomes an identity)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, gate: DecisionGate | None,
                 source: _InputSource, follow: DecisionGate | None = None):
        super().__init__()
        self.conv, self.bn, self.gate, self.source, self.follow = conv, bn, gate, source, follow

    def forward(self, x: Tensor) -> Tensor:
        b, device = x.shape[0], x.device
        in_active = self.source.active(b, self.conv.in_channels, device)
        if self.gate is not None:  # a gated conv: decide on x_{l-1}, compute theta'_l only
            mask = self.gate.decide(x)
            return _subset_conv(x, self.conv, self.bn, in_active, mask != 0, mask)
        if self.follow is not None:  # depthwise conv carrying a gate's channels
            mask = self.follow.mask
            assert mask is not None
            return _subset_conv(x, self.conv, self.bn, mask != 0, mask != 0, mask)
        out_active = torch.ones(b, self.conv.out_channels, dtype=torch.bool, device=device)
        return _subset_conv(x, self.conv, None, in_active, out_active, None)


class _SkippingLinear(nn.Module):
    def __init__(self, linear: nn.Linear, source: _InputSource):
        super().__init__()
        self.linear, self.source = linear, source

    def forward(self, x: Tensor) -> Tensor:
        in_active = self.source.active(x.shape[0], self.linear.in_features, x.device)
        out = x.new_empty(x.shape[0], self.linear.out_features)
        for rows, index in group_rows(in_active):
            out[rows] = F.linear(x[rows][:, index], self.linear.weight[:, index], self.linear.bias)
        return out


def _swap(net: DynamicNetwork, old: nn.Module, new: nn.Module, undo: list) -> None:
    parent = net._parent_of(old)
    for name, child in parent.named_children():
        if child is old:
            setattr(parent, name, new)
            undo.append((parent, name, old))
            return
    raise KeyError("module not found in its parent")


@contextlib.contextmanager
def channel_skipping(net: DynamicNetwork) -> Iterator[DynamicNetwork]:
    """Run ``net`` with channel-skipping modules in place of the gated convs (eval mode only)."""
    if net.training:
        raise RuntimeError("channel-skipping inference needs eval mode (BN folded with running statistics)")
    undo: list = []
    consumers: dict[int, _InputSource] = {}
    gated_convs = {id(g.site.conv): g for g in net.gated}
    for g in net.gated:
        if g.site.consumer is not None:
            consumers[id(g.site.consumer)] = _InputSource(g.gate)
    try:
        for g in net.gated:
            source = consumers.get(id(g.site.conv), _InputSource())
            _swap(net, g.site.conv, _SkippingConv(g.site.conv, g.site.bn, g.gate, source), undo)
            _swap(net, g.site.bn, nn.Identity(), undo)
            for conv, bn in zip(g.follower_convs, g.site.followers):
                _swap(net, conv, _SkippingConv(conv, bn, None, _InputSource(), follow=g.gate), undo)
                _swap(net, bn, nn.Identity(), undo)
        for g in net.gated:
            consumer = g.site.consumer
            if consumer is None or id(consumer) in gated_convs:
                continue
            source = consumers[id(consumer)]
            if isinstance(consumer, nn.Conv2d):
                _swap(net, consumer, _SkippingConv(consumer, None, None, source), undo)
            elif isinstance(consumer, nn.Linear):
                _swap(net, consumer, _SkippingLinear(consumer, source), undo)
        yield net
    finally:
        for parent, name, old in reversed(undo):
            setattr(parent, name, old)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the single conv equal to bn(conv(x)) in eval mode."""
    scale, shift = bn_affine(bn)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight.detach().clone(), bias.detach().clone()


class _Code(nn.Module):
    """One code's pre-sliced convolutions of a block: conv1 (kept outputs, BN1 and G folded), conv2 (kept
    inputs, BN2 folded). ``conv1`` None: the code keeps no channel, the branch is BN2's shift alone."""

    def __init__(self, block: BasicBlock, keep: Tensor, scale: Tensor):
        super().__init__()
        w1, b1 = fold_conv_bn(block.conv1, block.bn1)
        w2, b2 = fold_conv_bn(block.conv2, block.bn2)
        self.k = int(keep.numel())
        self.w1 = nn.Parameter((w1[keep] * scale.view(-1, 1, 1, 1)).contiguous(), requires_grad=False)
        self.b1 = nn.Parameter((b1[keep] * scale).contiguous(), requires_grad=False)
        self.w2 = nn.Parameter(w2[:, keep].contiguous(), requires_grad=False)
        self.b2 = nn.Parameter(b2.contiguous(), requires_grad=False)
        self.s1, self.p1 = block.conv1.stride, block.conv1.padding
        self.s2, self.p2 = block.conv2.stride, block.conv2.padding
        self.out_channels = block.conv2.out_channels

    def forward(self, x: Tensor, shortcut: Tensor) -> Tensor:
        if self.k == 0:
            return F.relu(shortcut + self.b2.view(1, -1, 1, 1))
        h = F.relu(F.conv2d(x, self.w1, self.b1, self.s1, self.p1))
        return F.relu(F.conv2d(h, self.w2, self.b2, self.s2, self.p2) + shortcut)


class DeployedBlock(nn.Module):
    """A BasicBlock run per code (see the module docstring); ``gate`` None: the dense block, one code.

    A batch whose samples chose several codes runs either per code on its group of samples (``multi =
    "group"``) or once on the union of the codes' channels with each sample's G_l[i] applied after conv1
    (``"union"``: zeros where a sample's code skips the channel, so the output is the same; the weights of
    each union are sliced once and cached). The block input is a ReLU output (stem or previous block), so
    the head's ReLU of Eq. 2 is the identity and is not recomputed.
    """

    def __init__(self, block: BasicBlock, gate: DecisionGate | None, multi: str = "union"):
        super().__init__()
        if multi not in ("union", "group", "majority"):
            raise ValueError(f"multi must be 'union', 'group' or 'majority', got {multi!r}")
        self.shortcut = block.shortcut
        self.multi = multi
        if gate is None:
            channels = block.conv1.out_channels
            self.codes = nn.ModuleList([_Code(block, torch.arange(channels), torch.ones(channels))])
            self.head = None
        else:
            codebook = gate.effective_codebook().detach()
            self.codes = nn.ModuleList(_Code(block, torch.nonzero(row).flatten(), row[row != 0]) for row in codebook)
            self.head = nn.Parameter(gate.head.weight.detach().clone(), requires_grad=False)
            self.register_buffer("codebook", codebook.clone())
            self._full = _Code(block, torch.arange(block.conv1.out_channels), torch.ones(block.conv1.out_channels))
        self._unions: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.last_codes: Tensor | None = None

    def _union(self, present: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = tuple(present)
        if key not in self._unions:
            index = torch.nonzero((self.codebook[present] != 0).any(dim=0)).flatten()
            full = self._full
            fmt = torch.channels_last if full.w1.is_contiguous(memory_format=torch.channels_last) \
                and not full.w1.is_contiguous() else torch.contiguous_format
            self._unions[key] = (index, full.w1[index].contiguous(memory_format=fmt), full.b1[index].contiguous(),
                                 full.w2[:, index].contiguous(memory_format=fmt))
        return self._unions[key]

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        if self.head is None:
            return self.codes[0](x, shortcut)
        codes = F.linear(x.mean(dim=(2, 3)), self.head).argmax(dim=1)  # Eq. 2 + Algorithm 1, line 5
        self.last_codes = codes
        if len(codes) == 1:
            return self.codes[int(codes)](x, shortcut)
        present = torch.unique(codes).tolist()
        if len(present) == 1:
            return self.codes[present[0]](x, shortcut)
        if self.multi == "union":
            return self._run_union(x, shortcut, codes, present)
        fmt = _memory_format(x)
        out = torch.empty_like(shortcut, memory_format=fmt)
        if self.multi == "majority":  # the most frequent code on its samples, the union of the rest on theirs
            counts = torch.bincount(codes, minlength=len(self.codes))
            top = int(counts.argmax())
            main, rest = codes == top, codes != top
            groups = [(top, torch.nonzero(main).flatten()), (None, torch.nonzero(rest).flatten())]
        else:
            groups = [(code, torch.nonzero(codes == code).flatten()) for code in present]
        for code, rows in groups:
            xs = x.index_select(0, rows).contiguous(memory_format=fmt)  # index_select drops channels_last
            ss = shortcut.index_select(0, rows).contiguous(memory_format=fmt)
            if code is None:
                sub = codes.index_select(0, rows)
                part = self._run_union(xs, ss, sub, torch.unique(sub).tolist())
            else:
                part = self.codes[code](xs, ss)
            out.index_copy_(0, rows, part)
        return out

    def _run_union(self, x: Tensor, shortcut: Tensor, codes: Tensor, present: list[int]) -> Tensor:
        if len(present) == 1:
            return self.codes[present[0]](x, shortcut)
        index, w1, b1, w2 = self._union(present)
        full = self._full
        scale = self.codebook[codes][:, index].to(x.dtype)[:, :, None, None]
        h = F.relu(F.conv2d(x, w1, b1, full.s1, full.p1) * scale)
        return F.relu(F.conv2d(h, w2, full.b2, full.s2, full.p2) + shortcut)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class DeployedDRIB(nn.Module):
    """Standalone inference copy of a DynamicNetwork (or a dense backbone) with pre-sliced, folded weights."""

    def __init__(self, backbone: nn.Module, blocks: list[tuple[str, DeployedBlock]], gated_blocks: list[str],
                 channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.block_names = [name for name, _ in blocks]
        self.gated_blocks = gated_blocks
        self._blocks = dict(blocks)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def codes(self) -> list[Tensor]:
        """The code each sample chose in each gated block in the last forward."""
        return [self._blocks[name].last_codes for name in self.gated_blocks]  # type: ignore[misc]


def supports_deploy(net: DynamicNetwork) -> bool:
    """True when every gated layer is a BasicBlock's conv1 read by that block's conv2."""
    for g in net.gated:
        parent = net._parent_of(g.site.conv)
        if not (isinstance(parent, BasicBlock) and parent.conv1 is g.site.conv and g.site.consumer is parent.conv2
                and not g.follower_convs):
            return False
    return True


def _fold_stem_and_blocks(backbone: nn.Module, gates: dict[int, DecisionGate], multi: str = "union"
                          ) -> tuple[nn.Module, list, list]:
    import copy

    twin = copy.deepcopy(backbone).eval()
    blocks, gated = [], []
    names = dict(twin.named_modules())
    original_by_name = dict(backbone.named_modules())
    for name, module in list(names.items()):
        if isinstance(module, BasicBlock):
            source = original_by_name[name]
            gate = gates.get(id(source.conv1))
            deployed = DeployedBlock(module, gate, multi)
            parent_name, _, child = name.rpartition(".")
            setattr(names[parent_name] if parent_name else twin, child, deployed)
            blocks.append((name, deployed))
            if gate is not None:
                gated.append(name)
    # the stem: a conv followed by a BN directly under the backbone (CIFAR ResNets: conv1 / bn1)
    conv, bn = getattr(twin, "conv1", None), getattr(twin, "bn1", None)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        weight, bias = fold_conv_bn(conv, bn)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, bias=True)
        folded.weight.data.copy_(weight)
        folded.bias.data.copy_(bias)
        twin.conv1, twin.bn1 = folded, nn.Identity()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin, blocks, gated


@torch.no_grad()
def deploy(net: DynamicNetwork, channels_last: bool = False, multi: str = "union") -> DeployedDRIB:
    """Build the pre-sliced, BN-folded inference copy of ``net`` (see the module docstring); ``channels_last``
    stores the weights and runs the inputs in NHWC (faster for large batches on this project's CPU)."""
    if not supports_deploy(net):
        raise ValueError("deploy() needs gates on BasicBlock conv1 layers (CIFAR ResNets, ResNet-18); "
                         "use channel_skipping() for this backbone")
    gates = {id(g.site.conv): g.gate for g in net.gated}
    # The copy's gated convs / BNs (which carry DRIB's hooks) are all replaced by DeployedBlocks.
    backbone, blocks, gated = _fold_stem_and_blocks(net.backbone, gates, multi)
    return DeployedDRIB(backbone, blocks, gated, channels_last).eval()


@torch.no_grad()
def deploy_dense(backbone: nn.Module, channels_last: bool = False) -> DeployedDRIB:
    """The dense start in the same folded form (BN folded into every conv, one code per block)."""
    folded, blocks, _ = _fold_stem_and_blocks(backbone.eval(), {})
    return DeployedDRIB(folded, blocks, [], channels_last).eval()


def deployed_masks(net: DynamicNetwork, deployed: DeployedDRIB) -> list[Tensor]:
    """The per-sample masks G_l[i] of the deployed copy's last forward, one B x C per gated layer."""
    return [g.gate.effective_codebook().detach()[codes] for g, codes in zip(net.gated, deployed.codes())]


@torch.no_grad()
def sparse_forward(net: DynamicNetwork, images: Tensor) -> tuple[Tensor, Tensor]:
    """Logits computed with channel skipping, and the per-sample MACs of that computation."""
    was_training = net.training
    net.eval()
    try:
        if supports_deploy(net):
            deployed = deploy(net)
            logits = deployed(images)
            return logits, net.per_sample_macs(deployed_masks(net, deployed))
        with channel_skipping(net):
            logits = net(images)
        return logits, net.per_sample_macs(net.masks())
    finally:
        net.train(was_training)
