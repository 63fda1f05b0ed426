"""`python -m drib evaluate`: DRIB's own metrics -> RUN/metrics.json.

* dynamism (`drib.dynamism`: per-layer usage perplexity, top-row share, rows serving >= 5%, mask
  difference of two random images, channels dynamic both ways, class probe beside shuffled labels) and the
  static twin (`drib.static`: every layer fixed to its most used row on class-mixed training images), top-1
  and MACs, on the whole reported test split;
* top-1 and mean MACs on the whole reported test split (the held-out test half for a run from published
  weights), with the pre-sliced channel-skipping computation (`sparse_inference.deploy`), under the shared
  keys of `common.method.SHARED_METRIC_KEYS` (top1, split, macs, mac_reduction, target_mac_reduction, params,
  precision);
* on a fixed subset of that split (a seeded permutation; per-sample IBA is costly): tiled deletion /
  insertion on a blurred canvas (`common.explain.tile_deletion_insertion`) and IBA's degradation test for
  DRIB's IBA map beside Grad-CAM, a random map and a centred Gaussian map of the same model;
* credibility beside its four controls over a beta sweep, and the in-the-loop verification's effect on
  accuracy and MACs (`verification.verify`, `verification.verified_forward`);
* optionally, speed of the deployed DRIB against the dense start in its fastest form (`speed.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.data import BatchLoader, DatasetSplits
from common.explain import (
    centre_saliency,
    degradation_test,
    grad_cam,
    random_saliency,
    scaled_tile,
    tile_deletion_insertion,
)
from common.macs import count_params
from common.method import shared_metrics
from common.precision import Precision, resolve_precision
from common.run import progress

from .dynamism import collect_decisions, dynamism_metrics, goal_met
from .model import DynamicNetwork
from .sparse_inference import deploy, sparse_forward, supports_deploy
from .static import STATIC_IMAGES, class_mixed_images, head_macs, most_used_rows, static_twin
from .train import TrainedDRIB, ensure_statistics
from .verification import ib_saliency, verified_forward, verify, with_beta

IBA_TILES_AT_224 = (14,)  # IBA's degradation tile on 224 px images (2 px on CIFAR)
GAME_TILES = (2, 4)  # tiled deletion / insertion (evaluation-protocol.md: 2 x 2 or 4 x 4 tiles)
GAME_POINTS = 33


def attribution_subset(data: DatasetSplits, size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The documented evaluation subset: ``size`` test images drawn by a seeded permutation (class-mixed)."""
    size = min(size, len(data.test))
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))[:size]
    subset = data.test.subset(order)
    return subset.images.float() / 255.0, subset.labels


@torch.no_grad()
def accuracy_and_macs(net: DynamicNetwork, data: DatasetSplits, device: torch.device, batch_size: int = 256,
                      precision: Precision | None = None, target_mac_reduction: float | None = None
                      ) -> dict[str, Any]:
    """Top-1 and per-sample MACs of the channel-skipping computation of ``net`` (a trained network or its
    static twin) over the whole reported test split, under ``precision`` (default fp32): the shared figures
    (``common.method.shared_metrics``) and DRIB's own (``macs_std``, ``macs_dense``, the paper's formula)."""
    net = net.eval()
    policy = precision or resolve_precision("fp32", device)
    correct, macs = 0, []
    loader = BatchLoader(data.test, batch_size, train=False, device=device)
    for x, y in progress(loader, "test (channel skipping)", total=len(loader)):
        with policy.autocast():  # the layout stays as loaded: this is a measurement of accuracy, not speed
            logits, sample_macs = sparse_forward(net, x)
        correct += int((logits.float().argmax(1) == y).sum())
        macs.append(sample_macs)
    all_macs = torch.cat(macs)
    dense = net.dense_backbone_macs()
    mean = float(all_macs.mean())
    shared = shared_metrics(top1=100.0 * correct / len(data.test), split=data.test_split_name, macs=mean,
                            dense_macs=dense, params=count_params(net), precision=policy.name,
                            target_mac_reduction=target_mac_reduction)
    return {**shared, "macs_std": float(all_macs.std()), "macs_dense": float(dense),
            "mac_reduction_paper_formula": (dense - mean) / mean, "params_backbone": count_params(net.backbone)}


def _faithfulness(scorer, images: Tensor, maps: Tensor, targets: Tensor, points: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for tile in GAME_TILES:
        game = tile_deletion_insertion(scorer, images, maps, targets, tile=tile, points=GAME_POINTS)
        out[f"deletion_{tile}px_auc"] = float(game.deletion_auc.mean())
        out[f"insertion_{tile}px_auc"] = float(game.insertion_auc.mean())
    if points > 0:
        for tile in (scaled_tile(t, images.shape[-1]) for t in IBA_TILES_AT_224):
            curves = degradation_test(scorer, images, maps, targets, tile=tile, points=points)
            out[f"degradation_{tile}px_score"] = float(curves.score.mean())
    return out


def attribution_metrics(trained: TrainedDRIB, images: Tensor, targets: Tensor, device: torch.device,
                        seed: int = 0, degradation_points: int = 20, compare: bool = True) -> dict[str, Any]:
    """DRIB's IBA map and its controls (Grad-CAM, random, centre) on the same images, same scorer (the
    deployed network; its logits equal the masked dense ones)."""
    net = trained.net.eval()
    scorer = deploy(net) if supports_deploy(net) else net
    cfg = trained.config.bottleneck
    maps = torch.cat([ib_saliency(net, images[i:i + 1], targets[i:i + 1], trained.stats, cfg, seed=seed)
                      for i in progress(range(len(images)), "IBA saliency", total=len(images))])
    metrics: dict[str, Any] = {f"iba_{k}": v for k, v in _faithfulness(scorer, images, maps, targets,
                                                                         degradation_points).items()}
    if compare:
        controls = {"gradcam": grad_cam(net, net.backbone.cam_layer(), images, targets),
                    "random": random_saliency(seed)(images, targets),
                    "centre": centre_saliency()(images, targets)}
        for name, control in controls.items():
            for key, value in _faithfulness(scorer, images, control, targets, degradation_points).items():
                metrics[f"{name}_{key}"] = value
    return metrics


def credibility_metrics(trained: TrainedDRIB, images: Tensor, labels: Tensor, data: DatasetSplits,
                        device: torch.device, betas: list[float], seed: int = 0,
                        thresholds: list[float] | None = None, rows: list[int] | None = None
                        ) -> dict[str, Any]:
    """Credibility and its four controls for each beta; in-the-loop verification at ``thresholds`` (with
    the config's beta) against the plain decisions, on the same images. ``rows``: `static_rows`, if known."""
    net = trained.net.eval()
    cfg = trained.config.bottleneck
    static = _static_mask(trained, static_rows(trained, data, seed) if rows is None else rows)
    sweep: dict[str, Any] = {}
    bits_at_config: Tensor | None = None
    for beta in betas:
        result = verify(net, images, trained.stats, with_beta(cfg, beta), seed=seed, static_mask=static)
        sweep[f"{beta:g}"] = result["summary"]
        if math.isclose(beta, cfg.beta) or bits_at_config is None:
            bits_at_config = result["bits"]  # type: ignore[assignment]
    out: dict[str, Any] = {"credibility_sweep": sweep, "credibility_betas": betas}
    main = sweep.get(f"{cfg.beta:g}", next(iter(sweep.values())))
    out.update({k: v for k, v in main.items()})
    assert bits_at_config is not None
    labels = labels.to(device)
    with torch.no_grad():
        plain_logits, plain_macs = sparse_forward(net, images)
    loop: dict[str, Any] = {"plain_top1": 100.0 * float((plain_logits.argmax(1) == labels).float().mean()),
                            "plain_macs_mean": float(plain_macs.mean())}
    for threshold in thresholds or []:
        for fallback in ("dense", "best_code"):
            cfg_t = with_beta(cfg, cfg.beta)
            cfg_t.verify_fallback = fallback
            res = verified_forward(net, images, bits_at_config, threshold, cfg_t)
            loop[f"{threshold:g}_{fallback}"] = {
                "top1": 100.0 * float((res["logits"].argmax(1) == labels).float().mean()),
                "macs_mean": float(res["macs"].mean()), "replaced_share": float(res["replaced"].float().mean())}
    out["verification_in_the_loop"] = loop
    return out


def static_rows(trained: TrainedDRIB, data: DatasetSplits, seed: int = 0) -> list[int]:
    """Per gated layer, the most used code-book row (by channel set) on class-mixed training images."""
    return most_used_rows(trained.net, class_mixed_images(data.train.images, STATIC_IMAGES, seed))


def _static_mask(trained: TrainedDRIB, rows: list[int]) -> Tensor:
    """The static control of credibility: the credibility layer's most used row (class-mixed images)."""
    from .verification import bottleneck_site

    gated = bottleneck_site(trained.net, trained.config.bottleneck.credibility_site)
    index = next(k for k, g in enumerate(trained.net.gated) if g is gated)
    return gated.gate.effective_codebook().detach()[rows[index]]


@torch.no_grad()
def dynamism_on_test(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, seed: int = 0
                     ) -> dict[str, Any]:
    """The dynamism figures (drib.dynamism) over the whole reported test split, with the goal's verdicts."""
    images = data.test.images.float() / 255.0
    metrics = dynamism_metrics(collect_decisions(trained.net.eval(), images), data.test.labels, seed=seed)
    metrics["goal"] = goal_met(metrics)
    return metrics


def static_twin_metrics(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, rows: list[int]
                        ) -> dict[str, Any]:
    """Top-1 and MACs on the test split of the same network with every layer fixed to its most used row;
    ``macs_without_heads``: a static network does not run the decision heads."""
    twin = static_twin(trained.net, rows)
    out: dict[str, Any] = accuracy_and_macs(twin, data, device)
    heads = head_macs(twin)
    out["macs_without_heads"] = out["macs"] - heads
    out["mac_reduction_without_heads"] = (out["macs_dense"] - out["macs_without_heads"]) / out["macs_dense"]
    out["rows"] = dict(zip((g.site.name for g in trained.net.gated), rows))
    out["rows_counted_on"] = f"{STATIC_IMAGES} class-mixed training images (seeded permutation)"
    return out


def evaluate(trained: TrainedDRIB, data: DatasetSplits, device: torch.device, subset: int = 200,
             seed: int = 0, compare: bool = True, degradation_points: int = 20, betas: list[float] | None = None,
             speed: bool = False, thresholds: list[float] | None = None, attribution: bool = True,
             speed_repeats: int = 20, precision: Precision | None = None) -> dict[str, Any]:
    """Every figure of metrics.json (module docstring): the shared ones (``common.method.SHARED_METRIC_KEYS``,
    top-1 and MACs under ``precision``, default fp32) first, then DRIB's own."""
    metrics: dict[str, Any] = accuracy_and_macs(trained.net, data, device, precision=precision,
                                                target_mac_reduction=trained.config.target_mac_reduction)
    metrics.update({"backbone": trained.meta["backbone"], "dataset": data.name, "val_source": data.val_source})
    metrics["dynamism"] = dynamism_on_test(trained, data, device, seed)
    metrics["dynamic_filter_share"] = metrics["dynamism"]["dynamic_filter_share"]
    rows = static_rows(trained, data, seed)  # counted once: the static twin and credibility's static control
    metrics["static_twin"] = static_twin_metrics(trained, data, device, rows)
    if ensure_statistics(trained, data, device, seed):
        metrics["bottleneck_statistics"] = "re-estimated at evaluation (model.pt lacked the configured sites)"
    cfg = trained.config.bottleneck
    from .verification import attribution_site

    metrics["bottleneck_layer"] = attribution_site(trained.net, cfg.site).name
    if subset > 0:
        images, labels = attribution_subset(data, subset, seed)
        images = images.to(device)
        with torch.no_grad():
            targets = trained.net.eval()(images).argmax(1)
        metrics.update({"attribution_subset": len(images), "attribution_subset_seed": seed})
        if attribution:
            metrics.update(attribution_metrics(trained, images, targets, device, seed, degradation_points, compare))
        if thresholds is None:
            thresholds = [cfg.verify_threshold] if cfg.verify_threshold is not None else [0.5, 0.6]
        metrics.update(credibility_metrics(trained, images, labels, data, device, betas or [cfg.beta], seed,
                                           thresholds, rows))
    if speed:
        from .speed import speed_metrics

        metrics["speed"] = speed_metrics(trained, data, seed=seed, repeats=speed_repeats)
    metrics["training"] = {k: trained.meta.get(k) for k in ("steps", "train_seconds", "selected_epoch",
                                                              "val_top1", "val_mac_fraction", "val_source",
                                                              "calibration")}
    return metrics


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """``out_dir/metrics.json``, written atomically (RunDir creates the directory if needed)."""
    from common.run import RunDir

    RunDir(out_dir).write_metrics(metrics)
