"""Channel gates for pruning (paper Eq. 10; supplementary Eq. 15-16) and the prunable MAC count T(v).

Gates sit on the prunable channels: the ``internal`` gate sites of the backbone (a ResNet block's first conv,
a MobileNetV2 expansion, a VGG conv). Residual streams are never gated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.backbones import Backbone
from common.macs import layer_shapes

from .rbf import logistic_noise


@dataclass(eq=False)
class PrunableSite:
    """An internal gate site plus the depthwise convs that carry its channels (MobileNetV2)."""

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    consumer: nn.Module
    followers: tuple[nn.BatchNorm2d, ...]
    depthwise: tuple[nn.Conv2d, ...]

    @property
    def channels(self) -> int:
        return self.conv.out_channels


def prunable_sites(backbone: Backbone, input_size: tuple[int, int, int] = (3, 32, 32)) -> list[PrunableSite]:
    """The backbone's internal gate sites, with the conv feeding each follower BN found by tracing one pass."""
    sites = [s for s in backbone.gate_sites() if s.internal]
    if not sites:
        raise ValueError(f"{type(backbone).__name__} exposes no internal (prunable) gate sites")
    followers = {id(bn) for s in sites for bn in s.followers}
    previous_conv = _conv_before_each_bn(backbone, followers, input_size)
    out = []
    for s in sites:
        if s.consumer is None:
            raise ValueError(f"internal gate site {s.name} has no consumer layer; cannot prune it")
        out.append(PrunableSite(s.name, s.conv, s.bn, s.consumer, tuple(s.followers),
                                tuple(previous_conv[id(bn)] for bn in s.followers)))
    return out


def _conv_before_each_bn(backbone: nn.Module, bn_ids: set[int], input_size: tuple[int, int, int]
                         ) -> dict[int, nn.Conv2d]:
    last: list[nn.Conv2d] = []
    found: dict[int, nn.Conv2d] = {}

    def on_conv(module, _inputs, _output):
        last[:] = [module]

    def on_bn(module, _inputs, _output):
        if id(module) in bn_ids and last:
            found[id(module)] = last[0]

    handles = [m.register_forward_hook(on_conv if isinstance(m, nn.Conv2d) else on_bn)
               for m in backbone.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            param = next(backbone.parameters())
            backbone(torch.zeros(1, *input_size, device=param.device))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    for bn_id in bn_ids:
        conv = found.get(bn_id)
        if conv is None or conv.groups != conv.in_channels or conv.in_channels != conv.out_channels:
            raise ValueError("a follower BatchNorm is not preceded by a depthwise conv; cannot prune it")
    return found


def group_sizes(channels: Sequence[int], block: int) -> list[int]:
    """Channels per gate at each site: the largest common divisor of ``block`` and the site's width (1 = the
    paper's one gate per channel). A site only one block wide becomes one group, i.e. it is not pruned: on
    AVX-512, 8 of 16 channels were measured no faster than 16 (README, channel groups)."""
    if block < 1:
        raise ValueError(f"channel group must be >= 1, got {block}")
    return [math.gcd(c, block) for c in channels]


class ChannelGates(nn.Module):
    """v = sigmoid((theta + g + b) / tau) per channel (supplementary Eq. 15), g Logistic noise, b = 3 so that
    every gate starts open, tau = 0.4. Only theta is trained: one logit per *group* of ``groups[i]``
    consecutive channels of site i (all 1: the paper's one logit per channel). A group opens and closes as
    one, so every site keeps a multiple of its group size and T(v) of the relaxed gates counts exactly the
    channels the slim network will have."""

    def __init__(self, channels: Sequence[int], bias: float = 3.0, tau: float = 0.4,
                 groups: Sequence[int] | None = None):
        super().__init__()
        self.channels = list(channels)
        self.groups = [1] * len(self.channels) if groups is None else list(groups)
        if len(self.groups) != len(self.channels):
            raise ValueError(f"{len(self.groups)} group sizes for {len(self.channels)} sites")
        for c, g in zip(self.channels, self.groups):
            if g < 1 or c % g:
                raise ValueError(f"group size {g} does not divide a site of {c} channels")
        self.bias = bias
        self.tau = tau
        self.theta = nn.Parameter(torch.zeros(sum(c // g for c, g in zip(self.channels, self.groups))))

    def _split(self, flat: Tensor) -> list[Tensor]:
        """Per-group values -> per-channel values, one tensor per site."""
        per_site = torch.split(flat, [c // g for c, g in zip(self.channels, self.groups)])
        return [v.repeat_interleave(g) if g > 1 else v for v, g in zip(per_site, self.groups)]

    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """Relaxed gate values for one training step (one draw per group, shared by the whole batch)."""
        noise = logistic_noise(self.theta.shape, self.theta.device, generator)
        return self._split(torch.sigmoid((self.theta + noise + self.bias) / self.tau))

    def open_probability(self) -> list[Tensor]:
        """Noise-free sigmoid((theta + b) / tau) per channel."""
        return self._split(torch.sigmoid((self.theta + self.bias) / self.tau))

    @torch.no_grad()
    def hard(self) -> list[Tensor]:
        """The final architecture: a group is open iff theta + b > 0; every site keeps at least its best group
        (a layer with no channel cannot be built, and the slim model must equal the gated one)."""
        values = []
        sizes = [c // g for c, g in zip(self.channels, self.groups)]
        for logits, g in zip(torch.split(self.theta.detach() + self.bias, sizes), self.groups):
            keep = (logits > 0).float()
            if keep.sum() == 0:
                keep[logits.argmax()] = 1.0
            values.append(keep.repeat_interleave(g) if g > 1 else keep)
        return values


class GateInjector:
    """Multiplies every prunable site's BN output (and its followers') by the current gate values (Eq. 16).

    v >= 0, so gating before the ReLU equals gating after it. Set ``values`` before each forward.
    """

    def __init__(self, sites: Sequence[PrunableSite]):
        self.sites = list(sites)
        self.values: list[Tensor] | None = None
        self._handles: list = []

    def _hook(self, index: int):
        def hook(_module, _inputs, output: Tensor) -> Tensor:
            if self.values is None:
                return output
            return output * self.values[index].to(output.dtype).view(1, -1, 1, 1)
        return hook

    def __enter__(self) -> GateInjector:
        for i, site in enumerate(self.sites):
            for bn in (site.bn, *site.followers):
                self._handles.append(bn.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PrunableMacs:
    """T(v): MACs of every layer whose input or output channels are gated, counted with soft channel
    activity (a_in / groups) x a_out x k x H x W, the same formula as ``common.macs.dynamic_macs``.

    T_all is the same sum with every gate open: both count the same layers (each gated conv, its consumer,
    and the depthwise convs in between), so p T_all is a meaningful target (unlike the reference code, whose
    regulariser counted only the first conv of each pair while its total counted both).
    """

    def __init__(self, backbone: Backbone, sites: Sequence[PrunableSite], input_size: tuple[int, int, int]):
        shapes = {layer.name: layer for layer in layer_shapes(backbone, input_size)}
        self.model_macs = float(sum(layer.macs for layer in shapes.values()))
        role: dict[str, dict] = {}
        for i, site in enumerate(sites):
            role.setdefault(backbone.module_name(site.conv), {})["out"] = i
            role.setdefault(backbone.module_name(site.consumer), {})["in"] = i
            for conv in site.depthwise:
                role.setdefault(backbone.module_name(conv), {})["depthwise"] = i
        self.terms: list[tuple[float, int, int, int, int, int]] = []  # macs, in, c_in, out, c_out, dw
        for name, r in role.items():
            layer = shapes[name]
            self.terms.append((float(layer.macs), r.get("in", -1), layer.in_channels, r.get("out", -1),
                               layer.out_channels, r.get("depthwise", -1)))
        self.total = float(sum(t[0] for t in self.terms))  # T_all

    def __call__(self, values: Sequence[Tensor]) -> Tensor:
        count = values[0].new_zeros(())
        for macs, i_in, c_in, i_out, c_out, i_dw in self.terms:
            if i_dw >= 0:  # a depthwise channel is computed iff its (shared) gate is open
                count = count + macs * values[i_dw].sum() / c_in
                continue
            frac_in = values[i_in].sum() / c_in if i_in >= 0 else 1.0
            frac_out = values[i_out].sum() / c_out if i_out >= 0 else 1.0
            count = count + macs * frac_in * frac_out
        return count

    @property
    def fixed(self) -> float:
        """MACs no gate can change (stem, residual-stream convs not fed by a gate, classifier)."""
        return self.model_macs - self.total




# --- the shared cost knob: target_mac_reduction (fraction of the whole model's MACs removed) ------------------

# Channel groups are refined until one group per site could remove at least this much more than the target
# (a search needs room below the target; at exactly the bound every site would keep a single group).
GROUP_HEADROOM = 0.05


def prunable_target_ratio(macs: PrunableMacs, target_mac_reduction: float) -> float:
    """p of Eq. 10 for a whole-model target: removing ``target`` x MACs(model) from T_all keeps
    p = 1 - target x MACs(model) / T_all of the prunable MACs (the rest of the model cannot shrink)."""
    p = 1.0 - target_mac_reduction * macs.model_macs / macs.total
    if p <= 0.0:
        raise ValueError(f"target_mac_reduction {target_mac_reduction} removes more MACs than the prunable layers "
                         f"hold ({macs.total / macs.model_macs:.1%} of the model)")
    return p


def one_group_values(channels: Sequence[int], groups: Sequence[int]) -> list[Tensor]:
    """Hard gate values that keep exactly one group (the first) at every site: the smallest network."""
    out = []
    for c, g in zip(channels, groups):
        v = torch.zeros(c)
        v[:g] = 1.0
        out.append(v)
    return out


def max_mac_reduction(macs: PrunableMacs, channels: Sequence[int], groups: Sequence[int]) -> float:
    """The largest whole-model MAC reduction hard gates in these groups can reach (one group per site)."""
    kept = float(macs(one_group_values(channels, groups))) + macs.fixed
    return 1.0 - kept / macs.model_macs


def groups_for_target(macs: PrunableMacs, channels: Sequence[int], groups: Sequence[int],
                      target_mac_reduction: float, headroom: float = GROUP_HEADROOM) -> list[int]:
    """``groups``, halved where they are coarsest relative to their site (group / channels largest first),
    until the target is reachable with ``headroom`` to spare or every group is one channel. On ResNet-20 with
    16-channel blocks and a 50% target this splits only the first stage's 16-channel sites into two groups
    of 8 (40.6% -> 58% reachable)."""
    groups = list(groups)
    while max_mac_reduction(macs, channels, groups) < target_mac_reduction + headroom and max(groups) > 1:
        worst = max(g / c for g, c in zip(groups, channels) if g > 1)
        groups = [g // 2 if g > 1 and g / c == worst and c % (g // 2) == 0 else g
                  for g, c in zip(groups, channels)]
    return groups


@torch.no_grad()
def calibrated_hard(gates: ChannelGates, macs: PrunableMacs, target_macs: float) -> list[Tensor]:
    """Hard gates by logit order whose T lands closest to ``target_macs``: every site keeps its best group, then
    groups open in descending theta (one global threshold on theta, as ``hard`` but placed by MACs instead of
    at theta + b = 0)."""
    sizes = [c // g for c, g in zip(gates.channels, gates.groups)]
    theta = gates.theta.detach().cpu()
    per_site = list(torch.split(theta, sizes))
    opened = [torch.zeros(n) for n in sizes]
    for site, logits in enumerate(per_site):
        opened[site][logits.argmax()] = 1.0
    order = sorted(((float(v), site, j) for site, logits in enumerate(per_site) for j, v in enumerate(logits)),
                   reverse=True)

    def values() -> list[Tensor]:
        return [o.repeat_interleave(g) if g > 1 else o.clone() for o, g in zip(opened, gates.groups)]

    best = values()
    best_gap = abs(float(macs(best)) - target_macs)
    for _, site, j in order:
        if opened[site][j]:
            continue
        opened[site][j] = 1.0
        current = values()
        gap = abs(float(macs(current)) - target_macs)
        if gap < best_gap:
            best, best_gap = current, gap
        if float(macs(current)) > target_macs:
            break
    device = gates.theta.device
    return [v.to(device) for v in best]
