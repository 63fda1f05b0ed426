"""A backbone with a DecisionGate on each gated conv: the DRIB dynamic network.

Gates attach through hooks on the backbone's `GateSite`s (common.backbones), so one code path serves every
backbone: a pre-hook on the conv runs the decision on x_{l-1}; a hook on its BN (and on the BNs that carry
the same channels, MobileNetV2's depthwise BN) multiplies the output by G_l[i] (Eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.backbones import Backbone, GateSite
from common.macs import ChannelActivity, LayerShape, count_macs, dynamic_macs, layer_shapes

from .config import DecisionSettings
from .decision import DecisionGate

BACKBONE_PREFIX = "backbone."


def default_gate_sites(backbone: Backbone) -> list[GateSite]:
    """Where DRIB gates go by default (Wang et al.): the internal channels of each block (ResNet: the inner
    conv of every residual block; the residual stream stays dense), and for a plain net (VGG) every conv
    but the first, which reads the image."""
    return [site for site in backbone.gate_sites() if site.internal and site.conv.in_channels != 3]


@dataclass
class GatedSite:
    site: GateSite
    gate: DecisionGate
    follower_convs: tuple[nn.Conv2d, ...]  # depthwise convs that carry the same channels


def _conv_before(parent: nn.Module, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The conv registered just before ``bn`` inside ``parent`` (MobileNetV2: the depthwise conv)."""
    previous = None
    for module in parent.children():
        if module is bn:
            if not isinstance(previous, nn.Conv2d):
                raise ValueError("cannot find the convolution that feeds a follower BatchNorm")
            return previous
        if isinstance(module, nn.Conv2d):
            previous = module
    raise ValueError("follower BatchNorm is not a child of its gate site's block")


class DynamicNetwork(nn.Module):
    """Pixels in, logits out; after each forward ``gated[k].gate.mask`` holds the per-sample masks."""

    def __init__(self, backbone: Backbone, config: DecisionSettings | None = None,
                 sites: list[GateSite] | None = None, input_size: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        config = config or DecisionSettings()
        self.backbone = backbone
        self.input_size = input_size
        sites = default_gate_sites(backbone) if sites is None else sites
        if not sites:
            raise ValueError("the backbone offers no gate sites for DRIB")
        self.gates = nn.ModuleList(
            DecisionGate(s.conv.in_channels, s.conv.out_channels, config.actions, config.codebook_max,
                         config.prune_below)
            for s in sites)
        self.gated: list[GatedSite] = []
        for site, gate in zip(sites, self.gates):
            followers = tuple(_conv_before(self._parent_of(f), f) for f in site.followers)
            self.gated.append(GatedSite(site, gate, followers))
            site.conv.register_forward_pre_hook(self._decide_hook(gate))
            for bn in (site.bn, *site.followers):
                bn.register_forward_hook(self._mask_hook(gate))
        self._shapes: list[LayerShape] | None = None

    # -- hooks -------------------------------------------------------------------------------------
    @staticmethod
    def _decide_hook(gate: DecisionGate):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            gate.decide(inputs[0])
        return hook

    @staticmethod
    def _mask_hook(gate: DecisionGate):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return gate.apply_mask(output)
        return hook

    def _parent_of(self, module: nn.Module) -> nn.Module:
        for parent in self.backbone.modules():
            if any(child is module for child in parent.children()):
                return parent
        raise KeyError("module is not part of the backbone")

    # -- forward and bookkeeping -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DRIB expects images B x 3 x H x W in [0, 1], got shape {tuple(x.shape)}")
        return self.backbone(x)

    def set_tau(self, tau: float) -> None:
        for gate in self.gates:
            gate.tau = tau

    def project_(self) -> None:
        for gate in self.gates:
            gate.project_()

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def masks(self) -> list[Tensor]:
        """Per-sample masks of the last forward, one B x C_out tensor per gated layer (real values; 0 = skipped)."""
        if any(g.gate.mask is None for g in self.gated):
            raise RuntimeError("run a forward pass before reading the masks")
        return [g.gate.mask for g in self.gated]  # type: ignore[misc]

    @torch.no_grad()
    def channel_masks(self, images: Tensor) -> list[Tensor]:
        """Inference-time (argmax) masks for ``images``: one B x C_out tensor per gated layer."""
        was_training = self.training
        self.eval()
        try:
            self(images)
            return [m.detach().clone() for m in self.masks()]
        finally:
            self.train(was_training)

    # -- MACs ---------------------------------------------------------------------------------------
    def shapes(self) -> list[LayerShape]:
        """Conv / linear layers of one forward (decision heads included), computed once."""
        if self._shapes is None:
            # layer_shapes runs a forward of one zero image: keep the masks of the caller's last batch.
            saved = [(g.gate.mask, g.gate.selection) for g in self.gated]
            self._shapes = layer_shapes(self, self.input_size)
            for g, (mask, selection) in zip(self.gated, saved):
                g.gate.mask, g.gate.selection = mask, selection
        return self._shapes

    def dense_backbone_macs(self) -> int:
        """MACs of the backbone without gates (the baseline of the reduction ratio)."""
        return count_macs(self.backbone, self.input_size)

    def activity(self, masks: list[Tensor]) -> dict[str, ChannelActivity]:
        """Which channels each conv / linear reads and writes, from the per-sample masks."""
        activity: dict[str, ChannelActivity] = {}

        def entry(module: nn.Module) -> ChannelActivity:
            name = BACKBONE_PREFIX + self.backbone.module_name(module)
            return activity.setdefault(name, ChannelActivity())

        for gated, mask in zip(self.gated, masks):
            active = mask.detach() != 0
            entry(gated.site.conv).outputs = active
            for conv in gated.follower_convs:
                entry(conv).inputs = active
                entry(conv).outputs = active
            if gated.site.consumer is not None:
                entry(gated.site.consumer).inputs = active
        return activity

    def per_sample_macs(self, masks: list[Tensor]) -> Tensor:
        """Per-sample MACs (float64, B) of the channel-skipping computation, decision heads included."""
        return dynamic_macs(self.shapes(), self.activity(masks), masks[0].shape[0])

    def mac_fraction(self, masks: list[Tensor]) -> Tensor:
        """Differentiable per-sample MAC fraction of the whole network (B), for the sparsity regulariser.

        A channel counts as active through a straight-through step: 1 in the forward pass when its mask
        value is non-zero, gradient 1 with respect to the mask value (so the loss can push entries to 0).
        """
        shapes = {s.name: s for s in self.shapes()}
        dense = float(sum(s.macs for s in shapes.values()))
        fractions = {}
        for gated, mask in zip(self.gated, masks):
            binary = (mask != 0).to(mask.dtype)
            fractions[id(gated)] = (binary + mask - mask.detach()).mean(dim=1)
        total = torch.zeros(masks[0].shape[0], dtype=masks[0].dtype, device=masks[0].device)
        gated_macs = 0.0
        factors: dict[str, list[Tensor]] = {}
        for gated in self.gated:
            frac = fractions[id(gated)]
            factors.setdefault(self._name(gated.site.conv), []).append(frac)
            for conv in gated.follower_convs:
                factors.setdefault(self._name(conv), []).append(frac)  # depthwise: one factor
            if gated.site.consumer is not None:
                factors.setdefault(self._name(gated.site.consumer), []).append(frac)
        for name, parts in factors.items():
            layer_macs = float(shapes[name].macs)
            gated_macs += layer_macs
            product = parts[0]
            for part in parts[1:]:
                product = product * part
            total = total + layer_macs * product
        return (total + (dense - gated_macs)) / dense

    @torch.no_grad()
    def keep_fraction_for(self, target_macs: float) -> float:
        """The uniform share of channels per gated layer whose MAC fraction is ``target_macs`` (bisection)."""
        low, high = 0.0, 1.0
        for _ in range(30):
            mid = (low + high) / 2
            masks = [torch.zeros(1, g.site.channels).index_fill_(1, torch.arange(max(1, round(mid * g.site.channels))),
                                                               1.0) for g in self.gated]
            if float(self.mac_fraction(masks)[0]) > target_macs:
                high = mid
            else:
                low = mid
        return low

    @torch.no_grad()
    def layer_features(self, images: Tensor, batch_size: int = 256, layers: list[int] | None = None
                       ) -> tuple[list[Tensor], list[Tensor]]:
        """Per gated layer (all, or ``layers``) and image, the head's input GAP(ReLU(x_{l-1})) (N x C_in) and
        the mean ReLU of the BN output before its mask (N x C_out), the other gates deciding as they are."""
        chosen = [self.gated[i] for i in (range(len(self.gated)) if layers is None else layers)]
        heads: list[list[Tensor]] = [[] for _ in chosen]
        outputs: list[list[Tensor]] = [[] for _ in chosen]
        handles = []
        for k, g in enumerate(chosen):
            def record_in(module, inputs, k=k):
                heads[k].append(F.adaptive_avg_pool2d(torch.relu(inputs[0]), 1).flatten(1).float())

            def record_out(module, inputs, output, k=k):
                outputs[k].append(torch.relu(output).mean(dim=(2, 3)).float())
            handles.append(g.site.conv.register_forward_pre_hook(record_in, prepend=True))
            handles.append(g.site.bn.register_forward_hook(record_out, prepend=True))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(images), batch_size):
                self(images[start:start + batch_size])
        finally:
            self.train(was_training)
            for handle in handles:
                handle.remove()
        return [torch.cat(h) for h in heads], [torch.cat(o) for o in outputs]

    def consumer_norms(self, gated: GatedSite) -> Tensor:
        """||weights of the consumer reading channel j|| per channel of a gated layer (ones if none)."""
        consumer = gated.site.consumer
        if isinstance(consumer, nn.Conv2d | nn.Linear):
            weight = consumer.weight.flatten(2) if consumer.weight.dim() > 2 else consumer.weight[..., None]
            return weight.detach().pow(2).sum(dim=(0, 2)).sqrt()
        return torch.ones(gated.site.channels, device=gated.site.bn.weight.device)

    @torch.no_grad()
    def channel_importance(self, images: Tensor, batch_size: int = 256) -> list[Tensor]:
        """Per gated layer, importance_j = E[ReLU(BN output_j)] x ||consumer weights reading channel j||:
        how much channel j feeds the next layer on these images (gates open)."""
        _, outputs = self.layer_features(images, batch_size)
        return [out.mean(0) * self.consumer_norms(g).to(out) for out, g in zip(outputs, self.gated)]

    @torch.no_grad()
    def init_codebooks(self, importance: list[Tensor], config: DecisionSettings, seed: int = 0) -> float:
        """Importance initialisation of every code book (see DecisionSettings.codebook_init); returns the
        share of channels each row keeps."""
        keep = self.keep_share(config)
        generator = torch.Generator().manual_seed(seed)
        for g, scores in zip(self.gated, importance):
            g.gate.init_by_importance_(scores, round(keep * g.site.channels), config.init_jitter, generator)
        return keep

    def keep_share(self, config: DecisionSettings) -> float:
        return config.target if config.regulariser == "density" else self.keep_fraction_for(config.target)

    @torch.no_grad()
    def init_by_clusters(self, images: Tensor, config: DecisionSettings, seed: int = 0) -> dict[str, list[float]]:
        """Deviation (codebook_init "clusters"): per gated layer, spherical k-means of the heads' inputs
        GAP(ReLU(x_{l-1})) on ``images`` into K = min(init_clusters, m) clusters; head row r < K is cluster r's
        unit centroid, so argmax A(x) (Eq. 2, bias-free unit rows as in Wang et al.) sends each image to the row
        of its cluster; code-book row r keeps the channels most important on cluster r's images. Rows >= K
        start as in "importance" (whole-set ranking + jitter) with their random heads. With
        ``init_specificity`` gamma > 0 a cluster's score is importance x (importance / overall importance)^gamma,
        so rows differ more. Returns the cluster shares per layer."""
        keep = self.keep_share(config)
        generator = torch.Generator().manual_seed(seed)
        shares: dict[str, list[float]] = {}
        for index, g in enumerate(self.gated):
            # layer by layer: the features of layer l are those the already initialised layers < l give
            heads, outputs = self.layer_features(images, layers=[index])
            x, out = heads[0], outputs[0]
            gate = g.gate
            k = min(config.init_clusters, gate.actions)
            centroids, assign = spherical_kmeans(x, k, generator)
            norms = self.consumer_norms(g).to(out)
            overall = out.mean(0) * norms
            gate.init_by_importance_(overall.cpu(), round(keep * g.site.channels), config.init_jitter, generator)
            count = max(1, min(g.site.channels, round(keep * g.site.channels)))
            for r in range(k):
                members = assign == r
                scores = (out[members].mean(0) if members.any() else out.mean(0)) * norms
                # specificity gamma: favour the channels more important on this cluster than on all images
                scores = scores * (scores / overall.clamp_min(1e-12)) ** config.init_specificity
                row = torch.zeros(g.site.channels, device=gate.codebook.device)
                row[scores.topk(count).indices.to(row.device)] = 1.0
                gate.codebook[r] = row
                gate.head.weight[r] = centroids[r].to(gate.head.weight)
            gate.project_()
            shares[g.site.name] = torch.bincount(assign, minlength=k).double().div(len(assign)).tolist()
        return shares

    def _name(self, module: nn.Module) -> str:
        return BACKBONE_PREFIX + self.backbone.module_name(module)


def spherical_kmeans(x: Tensor, k: int, generator: torch.Generator, iterations: int = 30
                     ) -> tuple[Tensor, Tensor]:
    """k unit centroids of the rows of ``x`` by cosine similarity (k-means++ seeding, Lloyd steps) and each
    row's cluster (the argmax of centroid . x, which is what a bias-free head with unit rows computes)."""
    z = F.normalize(x.float().cpu(), dim=1)
    n = len(z)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [z[first]]
    for _ in range(1, k):
        distance = (1 - (z @ torch.stack(centroids).T).max(dim=1).values).clamp_min(0)
        weights = distance if float(distance.sum()) > 0 else torch.ones(n)
        centroids.append(z[int(torch.multinomial(weights, 1, generator=generator))])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (z @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, z)
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]
        new = F.normalize(new, dim=1)
        if torch.allclose(new, c):
            break
        c = new
    return c, (z @ c.T).argmax(dim=1)
