"""The interpretability columns of the leaderboard, each beside its control (evaluation-protocol.md).

For one trained model and a fixed subset of held-out test images, four explainers are scored by the same
faithfulness metrics (tiled deletion and insertion onto a blurred canvas, ROAD's MoRF - LeRF gap):

- ``own``: the method's own explanation (Grad-CAM for methods without one);
- ``gradcam``: the common Grad-CAM of the same model at its last feature map;
- ``random`` and ``centre``: seeded noise and a centred Gaussian, the controls every real map must beat.

Beside them: each method's lift over the random map on the same model, the model-parameter randomisation
sanity test (Spearman correlation of the maps after every layer is randomised; near 0 is what a map that
depends on the weights gives, a map blind to the model scores 1), and the drift of the model's Grad-CAM
from its uncompressed start's on the same images.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from common.explain import (
    cascading_randomisation,
    centre_saliency,
    explanation_drift,
    grad_cam,
    random_saliency,
    road,
    tile_deletion_insertion,
)

from .presets import MetricSpec

SaliencyFn = Callable[[Tensor, Tensor], Tensor]
EXPLAINERS = ("own", "gradcam", "random", "centre")
FAITHFULNESS = ("deletion_auc", "insertion_auc", "road_gap")
# The columns this module fills, in table order.
COLUMNS = (
    *(f"{e}_{m}" for e in EXPLAINERS for m in FAITHFULNESS),
    "own_deletion_lift", "own_insertion_lift", "own_road_lift",
    "own_sanity_spearman", "gradcam_sanity_spearman", "random_sanity_spearman", "centre_sanity_spearman",
    "drift_spearman", "drift_top10",
)


def faithfulness(model: nn.Module, images: Tensor, labels: Tensor, maps: Tensor, spec: MetricSpec
                 ) -> dict[str, float]:
    """Mean tiled deletion AUC (lower is better), insertion AUC and ROAD gap (higher is better)."""
    game = tile_deletion_insertion(model, images, maps, labels, tile=spec.tile, points=spec.game_points)
    gap = road(model, images, maps, labels, fractions=spec.road_fractions, seed=spec.subset_seed).gap
    return {"deletion_auc": float(game.deletion_auc.mean()), "insertion_auc": float(game.insertion_auc.mean()),
            "road_gap": float(gap.mean())}


def explanation_columns(model: nn.Module, start: nn.Module, cam_layer: nn.Module, start_cam_layer: nn.Module,
                        own: SaliencyFn | None, maps_of: Callable[[SaliencyFn, str], Tensor], images: Tensor,
                        labels: Tensor, spec: MetricSpec) -> tuple[dict[str, float], Tensor]:
    """Every interpretability column for ``model``, and its own (or Grad-CAM) maps for the figure.

    ``maps_of(fn, what)`` computes the maps of ``fn`` on ``images`` / ``labels`` in chunks and checks them.
    """
    explainers: dict[str, SaliencyFn] = {
        "gradcam": lambda x, y: grad_cam(model, cam_layer, x, y),
        "random": random_saliency(spec.subset_seed),
        "centre": centre_saliency(),
    }
    if own is not None:
        explainers["own"] = own
    metrics: dict[str, float] = {}
    maps: dict[str, Tensor] = {}
    for name in ("gradcam", "random", "centre", "own"):
        if name == "own" and own is None:
            maps[name] = maps["gradcam"]
            scores = {m: metrics[f"gradcam_{m}"] for m in FAITHFULNESS}
        else:
            maps[name] = maps_of(explainers[name], f"{name} saliency")
            scores = faithfulness(model, images, labels, maps[name], spec)
        metrics.update({f"{name}_{m}": v for m, v in scores.items()})
    metrics["own_deletion_lift"] = metrics["random_deletion_auc"] - metrics["own_deletion_auc"]
    metrics["own_insertion_lift"] = metrics["own_insertion_auc"] - metrics["random_insertion_auc"]
    metrics["own_road_lift"] = metrics["own_road_gap"] - metrics["random_road_gap"]

    n = min(spec.sanity_images, len(images))
    x, y = images[:n], labels[:n]  # the first n of the seeded random test subset (subset_indices): class-mixed
    for name in ("gradcam", "random", "centre", "own"):
        if name == "own" and own is None:
            metrics["own_sanity_spearman"] = metrics["gradcam_sanity_spearman"]
            continue
        fn = random_saliency(spec.subset_seed) if name == "random" else explainers[name]
        result = cascading_randomisation(model, fn, x, y, stages=spec.sanity_stages, seed=spec.subset_seed)
        metrics[f"{name}_sanity_spearman"] = result.final

    start_maps = maps_of(lambda xx, yy: grad_cam(start, start_cam_layer, xx, yy), "the start's Grad-CAM")
    drift = explanation_drift(start_maps, maps["gradcam"], top_fraction=0.1)
    metrics["drift_spearman"], metrics["drift_top10"] = drift["spearman"], drift["top_overlap"]
    return metrics, maps["own"]
