"""Information bottleneck verification of the dynamic decisions (paper Sec. 3.2) and DRIB's saliency.

Credibility, the definition implemented here (the paper gives none). For one image x at the bottleneck
layer l (a gated conv, bottleneck on its BN output before the mask):
  1. open the gate of layer l (all C channels pass; every other gate decides as usual) and run per-sample
     IBA for the predicted class, giving the capacity I_j = sum over positions of the bits channel j lets
     through;
  2. S = the channels the decision module selects for x at layer l (argmax action, G_l[i][j] != 0);
  3. credibility(x) = sum_{j in S} I_j / sum_j I_j.
It is the share of the information the network needs at layer l that lies in the channels the dynamic
module kept. A decision that ignored the image would score about |S| / C on average (reported as
`credibility_chance`).

The native saliency map is IBA on the deployed network (gate closed as decided): only the selected
channels exist, so only their capacity counts; heatmap in bits per pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .bottleneck import attribute
from .config import BottleneckConfig
from .network import DynamicNetwork, GatedSite


def bottleneck_site(net: DynamicNetwork, site: int | str = "middle") -> GatedSite:
    """The gated layer carrying the bottleneck: an index, a qualified conv name, or "middle" (the middle
    gated layer, e.g. ResNet-20's layer2.1.conv1 at 16 x 16, like IBA's layer2 of ResNet-50)."""
    if site == "middle":
        return net.gated[len(net.gated) // 2]
    if isinstance(site, int) or (isinstance(site, str) and site.lstrip("-").isdigit()):
        index = int(site)
        if not -len(net.gated) <= index < len(net.gated):
            raise ValueError(f"bottleneck site {index} out of range: the network has {len(net.gated)} gated layers")
        return net.gated[index]
    for gated in net.gated:
        if gated.site.name == site:
            return gated
    names = ", ".join(g.site.name for g in net.gated)
    raise ValueError(f"no gated layer named {site!r}; choose one of: {names}")


def channel_information(capacity_bits: Tensor) -> Tensor:
    """Bits per channel (C), summed over positions."""
    return capacity_bits.sum(dim=(-2, -1))


def credibility(capacity_bits: Tensor, selected: Tensor) -> float:
    """Share of the bottleneck's information inside the selected channels (NaN if no information at all)."""
    info = channel_information(capacity_bits)
    total = float(info.sum())
    if total <= 0:
        return float("nan")
    return float(info[selected.to(info.device) != 0].sum()) / total


@torch.no_grad()
def _decide(net: DynamicNetwork, images: Tensor, gated: GatedSite) -> tuple[Tensor, Tensor]:
    """Predicted classes and the selected masks at ``gated`` for ``images`` (inference mode)."""
    was_training = net.training
    net.eval()
    try:
        predictions = net(images).argmax(dim=1)
        return predictions, gated.gate.mask.detach().clone()  # type: ignore[union-attr]
    finally:
        net.train(was_training)


def verify(net: DynamicNetwork, images: Tensor, stats: tuple[Tensor, Tensor], config: BottleneckConfig,
           targets: Tensor | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Per-image credibility (see the module docstring), chance level and bits at the bottleneck layer."""
    gated = bottleneck_site(net, config.site)
    predictions, masks = _decide(net, images, gated)
    targets = predictions if targets is None else targets
    generator = torch.Generator(device=images.device).manual_seed(seed)
    scores, chance, total_bits = [], [], []
    gated.gate.open = True
    try:
        for image, target, mask in zip(images, targets, masks):
            result = attribute(net, gated.site.bn, image, int(target), *stats, config, generator=generator)
            scores.append(credibility(result.capacity_bits, mask))
            chance.append(float((mask != 0).float().mean()))
            total_bits.append(float(result.capacity_bits.sum()))
    finally:
        gated.gate.open = False
    return {"credibility": torch.tensor(scores), "chance": torch.tensor(chance),
            "bits": torch.tensor(total_bits)}


def ib_saliency(net: DynamicNetwork, images: Tensor, targets: Tensor | None, stats: tuple[Tensor, Tensor],
                config: BottleneckConfig, seed: int = 0) -> Tensor:
    """DRIB's native explanation: per-sample IBA heatmaps (B x H x W, bits per pixel) of the deployed net."""
    gated = bottleneck_site(net, config.site)
    predictions, masks = _decide(net, images, gated)
    targets = predictions if targets is None else targets.to(images.device)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    maps = [attribute(net, gated.site.bn, image, int(target), *stats, config, element_mask=mask,
                      generator=generator).heatmap
            for image, target, mask in zip(images, targets, masks)]
    return torch.stack(maps)


def saliency_function(net: DynamicNetwork, stats: tuple[Tensor, Tensor], config: BottleneckConfig
                      ) -> Callable[[Tensor, Tensor], Tensor]:
    """The `MethodResult.saliency` callable: (images, targets) -> B x H x W."""
    def saliency(images: Tensor, targets: Tensor) -> Tensor:
        device = next(net.parameters()).device
        chosen = None if targets is None else torch.as_tensor(targets, device=device).reshape(-1)
        if chosen is not None and chosen.numel() == 1:
            chosen = chosen.expand(len(images))
        if chosen is not None and chosen.numel() != len(images):
            raise ValueError(f"{chosen.numel()} targets for {len(images)} images")
        return ib_saliency(net, images.to(device), chosen, stats, config)
    return saliency
