"""Information bottleneck verification of the dynamic decisions (paper Sec. 3.2) and DRIB's saliency.

Two bottleneck sites (both must be cuts of the network: `bottleneck.check_cut` refuses a bypassable one):

* the attribution site (`BottleneckSettings.site`, default the output of the residual block that holds the
  middle gated layer, ResNet-20's ``layer2.1``): the residual stream, where Schulz et al. put IBA; the
  network runs exactly as deployed (every gate decides); this gives DRIB's saliency map;
* the credibility site (`BottleneckSettings.credibility_site`, default the middle gated layer): the gated
  layer's BN output, whose channels are the ones the decision selects, together with its block's shortcut
  (a residual branch alone can be bypassed; branch + shortcut cannot). Layer l's own gate is opened there
  (the bits of a skipped channel can only be measured if it is computed); every other gate decides as at
  inference and the target is the deployed network's prediction.

Credibility of a channel set S at layer l, for one image: I_j = bits channel j lets through (capacity
summed over positions), cred(S) = sum_{j in S} I_j / sum_j I_j. It is reported for the decision's own S
beside four controls of the same image: a random subset of |S| channels (expected share |S| / C), the
selection of another image drawn among those whose selection differs (the share that do is reported), the
most used row over class-mixed training images (static), and the oracle, the top-|S| channels by I_j. The
decisions are "accepted" only if their credibility beats random, another image's and the static selection
by more than two standard errors of the paired difference; every control also gets a size-corrected score
(0 = a random set of its size, 1 = the best set of its size), tested the same way.

In-the-loop verification (the paper's Fig. 2, `BottleneckSettings.verify_threshold`): a decision whose
credibility is below the threshold is replaced by the dense layer or by the most credible code-book row that
is no larger than the decision's own; `verified_forward` measures what that does to accuracy and MACs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.stats import beyond_two_se, paired_difference

from .bottleneck import FeatureStats, attribute_sites, check_cut
from .config import BottleneckSettings
from .model import BACKBONE_PREFIX, DynamicNetwork, GatedSite


@dataclass
class Site:
    """Modules carrying a bottleneck (their outputs together are a cut), under stats keys ``keys``."""

    name: str
    modules: list[nn.Module]
    keys: list[str]
    gated: GatedSite | None = None  # credibility: the gated layer whose gate is opened
    internal: int = 0  # credibility: index in ``modules`` of the gated layer's BN


def bottleneck_site(net: DynamicNetwork, site: int | str = "middle") -> GatedSite:
    """A gated layer: an index, a qualified conv name, or "middle" (the middle gated layer)."""
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


def _probe_images(net: DynamicNetwork) -> Tensor:
    device = next(net.parameters()).device
    return torch.rand(3, *net.input_size, generator=torch.Generator().manual_seed(0)).to(device)


def _key(net: DynamicNetwork, module: nn.Module, prefix: str = "") -> str:
    return prefix + BACKBONE_PREFIX + net.backbone.module_name(module)


def _ancestors(net: DynamicNetwork, module: nn.Module) -> list[nn.Module]:
    name = net.backbone.module_name(module)
    parts = name.split(".")
    modules = dict(net.backbone.named_modules())
    return [modules[".".join(parts[:k])] for k in range(len(parts) - 1, 0, -1)]


def attribution_site(net: DynamicNetwork, site: int | str = "middle") -> Site:
    """The residual-stream site of the saliency bottleneck (see the module docstring).

    "middle" (or a gated layer's index / conv name): the first of {that layer's BN output after its mask,
    its enclosing blocks from the innermost out} that is a cut of the network (ResNet: the block output;
    VGG: the BN output itself). A qualified backbone module name is used as given, if it is a cut.
    """
    probe = _probe_images(net)
    modules = dict(net.backbone.named_modules())
    if isinstance(site, str) and site != "middle" and site not in {g.site.name for g in net.gated} \
            and not site.lstrip("-").isdigit():
        if site not in modules or site == "":
            raise ValueError(f"no backbone module named {site!r} for the bottleneck")
        check_cut(net, [modules[site]], probe, name=f"bottleneck site {site!r}")
        return Site(site, [modules[site]], [_key(net, modules[site])])
    gated = bottleneck_site(net, site)
    for candidate in [gated.site.bn, *_ancestors(net, gated.site.conv)]:
        try:
            check_cut(net, [candidate], probe)
        except ValueError:
            continue
        return Site(net.backbone.module_name(candidate), [candidate], [_key(net, candidate)])
    raise ValueError(f"no module around {gated.site.name} is a cut of the network; name one as bottleneck.site")


def credibility_site(net: DynamicNetwork, site: int | str = "middle") -> Site:
    """The gated layer's BN output (gate opened) plus, in a residual block, the block's shortcut module."""
    gated = bottleneck_site(net, site)
    modules: list[nn.Module] = [gated.site.bn]
    parents = _ancestors(net, gated.site.conv)
    shortcut = getattr(parents[0], "shortcut", None) if parents else None
    if isinstance(shortcut, nn.Module):
        modules.append(shortcut)
    gated.gate.open = True
    try:
        check_cut(net, modules, _probe_images(net), name=f"credibility site {gated.site.name}")
    finally:
        gated.gate.open = False
    return Site(gated.site.name, modules, [_key(net, m, "open:") for m in modules], gated=gated)


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


def _share(info: Tensor, chosen: Tensor) -> float:
    total = float(info.sum())
    return float(info[chosen].sum()) / total if total > 0 else float("nan")


@torch.no_grad()
def _decide(net: DynamicNetwork, images: Tensor, gated: GatedSite) -> tuple[Tensor, Tensor, Tensor]:
    """Predicted classes, selected masks and chosen actions at ``gated`` (inference mode)."""
    was_training = net.training
    net.eval()
    try:
        predictions = net(images).argmax(dim=1)
        return (predictions, gated.gate.mask.detach().clone(),  # type: ignore[union-attr]
                gated.gate.selection.argmax(dim=1).clone())  # type: ignore[union-attr]
    finally:
        net.train(was_training)


def site_stats(stats: dict[str, FeatureStats], site: Site) -> list[FeatureStats]:
    missing = [k for k in site.keys if k not in stats]
    if missing:
        raise ValueError(f"no bottleneck statistics for {missing}: estimate them (drib.train.feature_statistics)")
    return [stats[k] for k in site.keys]


def channel_bits(net: DynamicNetwork, images: Tensor, targets: Tensor, stats: dict[str, FeatureStats],
                 config: BottleneckSettings, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per image, the bits of each channel of the credibility layer (B x C) and the shortcut's bits (B)."""
    site = credibility_site(net, config.credibility_site)
    assert site.gated is not None
    chosen = site_stats(stats, site)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    channel, shortcut = [], []
    site.gated.gate.open = True
    try:
        for image, target in zip(images, targets):
            results = attribute_sites(net, site.modules, chosen, image, int(target), config, generator=generator)
            channel.append(channel_information(results[0].capacity_bits))
            shortcut.append(sum(float(r.capacity_bits.sum()) for r in results[1:]))
    finally:
        site.gated.gate.open = False
    return torch.stack(channel), torch.tensor(shortcut)


def _beats(own: Tensor, control: Tensor) -> dict[str, float | bool]:
    mean, se, _ = paired_difference(own, control)  # images where a control is undefined (NaN) drop out
    return {"difference": mean, "standard_error": se, "beats": beyond_two_se(mean, se) > 0}


def _other_differing(selected: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """For each image, another image whose selection differs from its own (seeded pick among them; -1 if
    none), and the share of the other images whose selection differs (per image)."""
    n = len(selected)
    ids = torch.unique(selected.to(torch.uint8).cpu(), dim=0, return_inverse=True)[1]
    generator = torch.Generator().manual_seed(seed + 5)
    partner = torch.full((n,), -1, dtype=torch.long)
    pool = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        candidates = torch.nonzero(ids != ids[i]).flatten()
        pool[i] = len(candidates) / max(1, n - 1)
        if len(candidates):
            partner[i] = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    return partner, pool


def credibility_controls(info: Tensor, selected: Tensor, static: Tensor, seed: int = 0
                         ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-image credibility of ``selected`` (B x C bool) under channel bits ``info`` (B x C) and of its four
    controls: "random" (expected share of a random |S|-subset, |S| / C), "other" (the selection of another
    image whose selection differs from this one's; NaN when every image has the same), "static" (``static``,
    C bool: the most used row over class-mixed images), "oracle" (top-|S| channels by bits).

    The summary holds the means, paired tests (own minus control, mean > 2 standard errors), the normalised
    score (own - random) / (oracle - random) and the verdict (accepted iff it beats random, other and static).
    Because the controls need not keep |S| channels, each set T also gets a size-corrected score,
    (cred(T) - |T| / C) / (oracle_|T| - |T| / C): 0 for a random set of that size, 1 for the best set of that
    size ("credibility_sized_*", tested the same way; "credibility_accepted_sized").
    """
    static = static.to(selected.device)
    n, c = selected.shape
    partner, pool = _other_differing(selected, seed)
    # oracle share of the best k channels, for every k (B x (C + 1))
    total = info.sum(1, keepdim=True)
    ranked = info.sort(dim=1, descending=True).values.cumsum(1) / total.clamp_min(1e-30)
    best_of = torch.cat([torch.zeros(n, 1, dtype=ranked.dtype, device=ranked.device), ranked], dim=1)
    rows: dict[str, list[float]] = {k: [] for k in ("own", "random", "other", "static", "oracle",
                                                     "sized_own", "sized_other", "sized_static")}
    sizes: dict[str, list[float]] = {"own": [], "other": [], "static": []}

    def sized(i: int, share: float, k: int) -> float:
        chance, top = k / c, float(best_of[i, k])
        return (share - chance) / (top - chance) if top - chance > 1e-9 else float("nan")

    for i in range(n):
        has_info = float(info[i].sum()) > 0
        k = int(selected[i].sum())
        own = _share(info[i], selected[i])
        rows["own"].append(own)
        rows["random"].append(k / c if has_info else float("nan"))
        rows["oracle"].append(float(best_of[i, k]) if has_info else float("nan"))
        rows["sized_own"].append(sized(i, own, k) if has_info else float("nan"))
        sizes["own"].append(k)
        sets = {"static": static}
        if partner[i] >= 0:
            sets["other"] = selected[int(partner[i])]
        for name in ("other", "static"):
            if name not in sets or not has_info:
                rows[name].append(float("nan"))
                rows[f"sized_{name}"].append(float("nan"))
                sizes[name].append(float("nan"))
                continue
            chosen = sets[name]
            share, size = _share(info[i], chosen), int(chosen.sum())
            rows[name].append(share)
            rows[f"sized_{name}"].append(sized(i, share, size))
            sizes[name].append(size)
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}
    summary: dict[str, Any] = {f"credibility_{k}": float(torch.nanmean(v)) for k, v in out.items()}
    tests = {name: _beats(out["own"], out[name]) for name in ("random", "other", "static")}
    summary["credibility_tests"] = tests
    summary["credibility_tests_sized"] = {
        "random": _beats(out["sized_own"], torch.zeros_like(out["sized_own"])),
        "other": _beats(out["sized_own"], out["sized_other"]),
        "static": _beats(out["sized_own"], out["sized_static"])}
    summary["credibility_set_sizes"] = {k: float(torch.nanmean(torch.tensor(v, dtype=torch.float64)))
                                        for k, v in sizes.items()}
    summary["credibility_other_differs_share"] = float((partner >= 0).double().mean())
    summary["credibility_other_pool_share"] = float(pool.mean())
    summary["credibility_static_equals_own_share"] = float((selected == static[None]).all(1).double().mean())
    gain = float(torch.nanmean(out["oracle"]) - torch.nanmean(out["random"]))
    summary["credibility_normalised"] = (float(torch.nanmean(out["own"]) - torch.nanmean(out["random"])) / gain
                                         if gain > 0 else float("nan"))
    if not gain > 0:  # written as null (common.run.atomic_write_json); the reason goes beside it
        summary["credibility_normalised_reason"] = (
            "undefined: the oracle's mean credibility does not exceed the random control's (oracle - random = "
            f"{gain:.3g}), so (own - random) / (oracle - random) has no scale")
    summary["credibility_accepted"] = all(bool(t["beats"]) for t in tests.values())
    summary["credibility_accepted_sized"] = all(bool(t["beats"]) for t in summary["credibility_tests_sized"].values())
    return out, summary


def verify(net: DynamicNetwork, images: Tensor, stats: dict[str, FeatureStats], config: BottleneckSettings,
           targets: Tensor | None = None, seed: int = 0, static_mask: Tensor | None = None) -> dict[str, object]:
    """Credibility of each image's decision at the credibility layer beside its four controls.

    ``static_mask`` (C): the most frequent selection (default: the most frequent action on ``images``).
    Returns per-image tensors ("own", "random", "other", "static", "oracle", "bits", "shortcut_bits") and a
    summary dict ("summary") with the means, the paired tests and the verdict.
    """
    site = credibility_site(net, config.credibility_site)
    gated = site.gated
    assert gated is not None
    predictions, masks, actions = _decide(net, images, gated)
    targets = predictions if targets is None else targets
    if static_mask is None:
        mode = int(torch.mode(actions.cpu()).values)
        static_mask = gated.gate.effective_codebook().detach()[mode]
    info, shortcut = channel_bits(net, images, targets, stats, config, seed)
    out, summary = credibility_controls(info, masks != 0, static_mask != 0, seed)
    out.update({"bits": info, "shortcut_bits": shortcut, "masks": masks, "predictions": predictions})
    summary["credibility_branch_share"] = float((info.sum(1) / (info.sum(1) + shortcut.to(info)).clamp_min(1e-12)
                                                 ).mean())
    summary["credibility_layer"] = site.name
    summary["credibility_sites"] = [k.removeprefix("open:") for k in site.keys]
    gated.gate.open = True
    try:
        with torch.no_grad():
            opened = net.eval()(images).argmax(1)
    finally:
        gated.gate.open = False
    summary["credibility_open_gate_prediction_changes"] = float((opened != predictions).float().mean())
    out["summary"] = summary
    return out


@torch.no_grad()
def verified_forward(net: DynamicNetwork, images: Tensor, bits: Tensor, threshold: float,
                     config: BottleneckSettings) -> dict[str, Tensor]:
    """The paper's in-the-loop verification at the credibility layer, given each image's channel bits.

    A decision with credibility < ``threshold`` is replaced by the dense layer ("dense": every channel at
    scale 1, the gate opened) or by the code-book row of highest credibility among those that keep no more
    channels ("best_code"). Returns logits, per-sample MACs (decision heads included; the IBA run that
    verifies costs config.steps x config.copies forward + backward passes on top and is not counted) and
    the replaced flags.
    """
    site = credibility_site(net, config.credibility_site)
    gated = site.gated
    assert gated is not None
    _, masks, _ = _decide(net, images, gated)
    total = bits.sum(1).clamp_min(1e-12)
    own = ((masks != 0).to(bits) * bits).sum(1) / total
    replaced = own < threshold
    forced = masks.clone()
    if config.verify_fallback == "dense":
        forced[replaced] = 1.0
    else:
        codebook = gated.gate.effective_codebook().detach()
        rows = (codebook != 0).to(bits)
        row_share = (bits @ rows.T) / total[:, None]  # B x m
        fits = rows.sum(1)[None] <= (masks != 0).sum(1, keepdim=True)
        row_share = torch.where(fits, row_share, torch.full_like(row_share, -1.0))
        best = row_share.argmax(1)
        better = row_share.gather(1, best[:, None])[:, 0] > own
        use = replaced & better
        forced[use] = codebook[best[use]].to(forced)
        replaced = use
    net.shapes()  # computed once, before the forced masks are in place
    gated.gate.forced = forced
    try:
        net.eval()
        logits = net(images)
        used = [m.clone() for m in net.masks()]
    finally:
        gated.gate.forced = None
    macs = net.per_sample_macs(used)
    return {"logits": logits, "macs": macs, "replaced": replaced, "credibility": own}


def verified_predict(net: DynamicNetwork, images: Tensor, stats: dict[str, FeatureStats],
                     config: BottleneckSettings, seed: int = 0) -> dict[str, Tensor]:
    """Inference with the paper's verification in the loop: decide, measure each decision's credibility
    with IBA (target: the deployed prediction), replace the decisions below ``config.verify_threshold``
    (`verified_forward`). Without a threshold this is the plain deployed forward."""
    site = credibility_site(net, config.credibility_site)
    assert site.gated is not None
    predictions, _, _ = _decide(net, images, site.gated)
    if config.verify_threshold is None:
        with torch.no_grad():
            logits = net.eval()(images)
        return {"logits": logits, "macs": net.per_sample_macs(net.masks()),
                "replaced": torch.zeros(len(images), dtype=torch.bool), "credibility": torch.full((len(images),),
                                                                                               float("nan"))}
    bits, _ = channel_bits(net, images, predictions, stats, config, seed)
    return verified_forward(net, images, bits, config.verify_threshold, config)


def ib_saliency(net: DynamicNetwork, images: Tensor, targets: Tensor | None, stats: dict[str, FeatureStats],
                config: BottleneckSettings, seed: int = 0) -> Tensor:
    """DRIB's native explanation: per-sample IBA heatmaps (B x H x W, bits per pixel) at the attribution
    site (the residual stream), the network running as deployed."""
    site = attribution_site(net, config.site)
    chosen = site_stats(stats, site)
    net.eval()
    if targets is None:
        with torch.no_grad():
            targets = net(images).argmax(1)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    maps = [attribute_sites(net, site.modules, chosen, image, int(target), config, generator=generator)[0].heatmap
            for image, target in zip(images, targets.to(images.device))]
    return torch.stack(maps)


def with_beta(config: BottleneckSettings, beta: float) -> BottleneckSettings:
    return dataclasses.replace(config, beta=beta)


def saliency_function(net: DynamicNetwork, stats: dict[str, FeatureStats], config: BottleneckSettings
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
