"""The interpretability columns of the leaderboard, each beside its control (evaluation-protocol.md).

For one trained model and a fixed subset of held-out test images, four explainers are scored by the same
faithfulness metrics (tiled deletion and insertion onto a blurred canvas, ROAD's MoRF - LeRF gap):

- ``own``: the method's own explanation (Grad-CAM for methods without one);
- ``gradcam``: the common Grad-CAM of the same model at its last feature map;
- ``random`` and ``centre``: seeded noise and a centred Gaussian, the controls every real map must beat.

Beside them: each method's lift over the random map on the same model; the grid pointing game of each
explainer on seeded 2 x 2 mosaics of held-out images of four distinct classes that the start classifies
correctly alone (share of positive attribution in the asked cell: 0.25 for the random and centre maps by
construction, near 1 for a map that finds the object); the model-parameter randomisation sanity test read
against its floor (same-image Spearman correlation of the trained and the fully reset model's maps beside
the correlation with another image's reset map: a map that depends on the weights falls to the floor, a
map blind to the model keeps 1); and the drift of the model's Grad-CAM from its uncompressed start's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from common.explain import (
    Mosaics,
    centre_saliency,
    explanation_drift,
    grad_cam,
    grid_pointing_game,
    random_saliency,
    randomisation_sanity,
    road,
    tile_deletion_insertion,
)

from .presets import MetricSpec

SaliencyFn = Callable[[Tensor, Tensor], Tensor]
EXPLAINERS = ("own", "gradcam", "random", "centre")
FAITHFULNESS = ("deletion_auc", "insertion_auc", "road_gap")
# Per explainer: GridPG and its standard error; the sanity test's same-image correlation, its floor, their
# standard errors and the verdict (1: depends on the weights). `_spearman` keeps its name: same image.
GRIDPG = ("gridpg", "gridpg_se")
SANITY = ("sanity_spearman", "sanity_spearman_se", "sanity_floor", "sanity_floor_se", "sanity_depends")
SANITY_RESET = "kaiming"  # the project's weight reset (common.explain.randomisation_sanity)
# The columns this module fills, in table order.
COLUMNS = (
    *(f"{e}_{m}" for e in EXPLAINERS for m in FAITHFULNESS),
    "own_deletion_lift", "own_insertion_lift", "own_road_lift",
    *(f"{e}_{m}" for e in EXPLAINERS for m in GRIDPG), "gridpg_mosaics", "gridpg_qualified",
    *(f"{e}_{m}" for e in EXPLAINERS for m in SANITY),
    "drift_spearman", "drift_top10",
)


def faithfulness(model: nn.Module, images: Tensor, labels: Tensor, maps: Tensor, spec: MetricSpec
                 ) -> dict[str, float]:
    """Mean tiled deletion AUC (lower is better), insertion AUC and ROAD gap (higher is better)."""
    game = tile_deletion_insertion(model, images, maps, labels, tile=spec.tile, points=spec.game_points)
    gap = road(model, images, maps, labels, fractions=spec.road_fractions, seed=spec.subset_seed).gap
    return {"deletion_auc": float(game.deletion_auc.mean()), "insertion_auc": float(game.insertion_auc.mean()),
            "road_gap": float(gap.mean())}


def gridpg_mosaic_count(spec: MetricSpec) -> int:
    """Mosaics of the grid pointing game: as many cells as faithfulness images (at least 2 mosaics)."""
    return max(2, spec.explain_images // 4)


def explanation_columns(model: nn.Module, start: nn.Module, cam_layer: nn.Module, start_cam_layer: nn.Module,
                        own: SaliencyFn | None, maps_of: Callable[[SaliencyFn, str], Tensor], images: Tensor,
                        labels: Tensor, spec: MetricSpec, mosaics: Mosaics | None = None
                        ) -> tuple[dict[str, float | str], Tensor]:
    """Every interpretability column for ``model``, and its own (or Grad-CAM) maps for the figure.

    ``maps_of(fn, what)`` computes the maps of ``fn`` on ``images`` / ``labels`` in chunks and checks them.
    ``mosaics``: the grid pointing game's mosaics (`common.explain.build_mosaics` with the start model);
    None leaves the GridPG columns NaN with the reason in ``gridpg_reason``. An own explainer that cannot
    run on a mosaic leaves ``own_gridpg`` NaN and says why in ``own_gridpg_reason``.
    """
    explainers: dict[str, SaliencyFn] = {
        "gradcam": lambda x, y: grad_cam(model, cam_layer, x, y),
        "random": random_saliency(spec.subset_seed),
        "centre": centre_saliency(),
    }
    if own is not None:
        explainers["own"] = own
    metrics: dict[str, Any] = {}
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

    metrics.update(gridpg_columns(explainers, own is not None, mosaics, images.device))

    n = max(2, min(spec.sanity_images, len(images)))
    x, y = images[:n], labels[:n]  # the first n of the seeded random test subset (subset_indices): class-mixed
    for name in ("gradcam", "random", "centre", "own"):
        if name == "own" and own is None:
            metrics.update({f"own_{m}": metrics[f"gradcam_{m}"] for m in SANITY})
            continue
        test = randomisation_sanity(model, explainers[name], x, y, reset=SANITY_RESET, seed=spec.subset_seed)
        metrics.update({f"{name}_sanity_spearman": test.same_image, f"{name}_sanity_spearman_se": test.same_image_se,
                        f"{name}_sanity_floor": test.floor, f"{name}_sanity_floor_se": test.floor_se,
                        f"{name}_sanity_depends": float(test.depends_on_weights)})
    metrics["sanity_reset"] = SANITY_RESET

    start_maps = maps_of(lambda xx, yy: grad_cam(start, start_cam_layer, xx, yy), "the start's Grad-CAM")
    drift = explanation_drift(start_maps, maps["gradcam"], top_fraction=0.1)
    metrics["drift_spearman"], metrics["drift_top10"] = drift["spearman"], drift["top_overlap"]
    return metrics, maps["own"]


def gridpg_columns(explainers: dict[str, SaliencyFn], has_own: bool, mosaics: Mosaics | None, device: torch.device
                   ) -> dict[str, float | str]:
    """GridPG mean and standard error of every explainer on ``mosaics`` (own = Grad-CAM without an own one)."""
    nan = float("nan")
    out: dict[str, float | str] = {f"{e}_{m}": nan for e in EXPLAINERS for m in GRIDPG}
    if mosaics is None or len(mosaics) == 0:
        out.update(gridpg_mosaics=0.0, gridpg_qualified=nan if mosaics is None else float(mosaics.qualified),
                   gridpg_reason="no mosaics: fewer than four classes among the correctly classified images")
        return out
    out.update(gridpg_mosaics=float(len(mosaics)), gridpg_qualified=float(mosaics.qualified))
    for name in ("gradcam", "random", "centre", "own"):
        if name == "own" and not has_own:
            out["own_gridpg"], out["own_gridpg_se"] = out["gradcam_gridpg"], out["gradcam_gridpg_se"]
            continue
        try:
            score = grid_pointing_game(explainers[name], mosaics, device=device)
        except Exception as exc:
            if name != "own":
                raise
            out["own_gridpg_reason"] = f"own explanation cannot run on a {tuple(mosaics.images.shape[-2:])} mosaic: " \
                                       f"{type(exc).__name__}: {exc}"[:300]
            continue
        out[f"{name}_gridpg"], out[f"{name}_gridpg_se"] = score.mean, score.se
    return out
