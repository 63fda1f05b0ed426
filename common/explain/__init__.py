"""Saliency maps and the interpretability metrics the benchmark applies to every model.

All functions are batched torch, work on the model's device, run the model in eval mode (restoring every
module's training flag) and never write `.grad` on parameters. Images are float B x 3 x H x W in [0, 1];
models return logits (see common/README.md).
"""

from .controls import (
    RESETS,
    SanityResult,
    SanityTest,
    cascading_randomisation,
    centre_map,
    centre_saliency,
    explanation_drift,
    gradcam_saliency,
    linear_probe,
    random_saliency,
    randomisation_sanity,
    rank_correlation,
    top_overlap,
)
from .degradation import DegradationCurves, degradation_test, scaled_tile
from .faithfulness import (
    RoadCurves,
    TileGameCurves,
    default_tile,
    noisy_linear_imputation,
    road,
    tile_deletion_insertion,
)
from .gradcam import grad_cam
from .gridpg import GridPGScore, Mosaics, build_mosaics, cell_masks, grid_pointing_game, tile_mosaic
from .localisation import bbox_score, pointing_game
from .maps import saliency_to_unit
from .mis import mis, mutual_information_matrix, pooled_activations
from .perturbation import PerturbationCurves, deletion_curve, insertion_curve, make_baseline
from .smoothgrad import smooth_grad

__all__ = [
    "RESETS",
    "DegradationCurves",
    "GridPGScore",
    "Mosaics",
    "PerturbationCurves",
    "RoadCurves",
    "SanityResult",
    "SanityTest",
    "TileGameCurves",
    "bbox_score",
    "build_mosaics",
    "cascading_randomisation",
    "cell_masks",
    "centre_map",
    "centre_saliency",
    "default_tile",
    "degradation_test",
    "deletion_curve",
    "explanation_drift",
    "grad_cam",
    "gradcam_saliency",
    "grid_pointing_game",
    "insertion_curve",
    "linear_probe",
    "make_baseline",
    "mis",
    "mutual_information_matrix",
    "noisy_linear_imputation",
    "pointing_game",
    "pooled_activations",
    "random_saliency",
    "randomisation_sanity",
    "rank_correlation",
    "road",
    "saliency_to_unit",
    "scaled_tile",
    "smooth_grad",
    "tile_deletion_insertion",
    "tile_mosaic",
    "top_overlap",
]
