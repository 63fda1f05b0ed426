"""Saliency maps and the interpretability metrics the benchmark applies to every model.

All functions are batched torch, work on the model's device, run the model in eval mode (restoring every
module's training flag) and never write `.grad` on parameters. Images are float B x 3 x H x W in [0, 1];
models return logits (see common/README.md).
"""

from .degradation import DegradationCurves, degradation_test, scaled_tile
from .gradcam import grad_cam
from .localisation import bbox_score, pointing_game
from .maps import saliency_to_unit
from .mis import mis, mutual_information_matrix, pooled_activations
from .perturbation import PerturbationCurves, deletion_curve, insertion_curve, make_baseline
from .smoothgrad import smooth_grad

__all__ = [
    "DegradationCurves",
    "PerturbationCurves",
    "bbox_score",
    "degradation_test",
    "deletion_curve",
    "grad_cam",
    "insertion_curve",
    "make_baseline",
    "mis",
    "mutual_information_matrix",
    "pointing_game",
    "pooled_activations",
    "saliency_to_unit",
    "scaled_tile",
    "smooth_grad",
]
