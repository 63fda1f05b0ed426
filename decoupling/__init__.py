"""Interpretable Neural Network Decoupling (Li, Ji, Lin, Zhang, Yan, Wu, Huang, Shao; ECCV 2020).

Every gated conv gets an architecture controlling module (Eq. 2, ``controller.py``) that looks at the
layer's input and selects the filters to compute through Improved SemHash (Eq. 3-5, ``semhash.py``). The
network is trained with Eq. 12 (``losses.py``): cross-entropy + lambda_m L_mi (paths informative of the
class) + lambda_k L_kl (filter outputs aligned with the selection) + lambda_s L_s (sparse paths). At
inference only the selected filters run (``GatedConvBN`` gathered execution), and the calculation paths
are the objects of interpretation (``analysis.py``, ``adversarial.py``).
"""

from .analysis import collect_paths, decision_tree, filter_states, hopkins_statistic, occlusion_analysis
from .controller import ArchitectureController, GatedConvBN
from .entry import run_method
from .losses import DecouplingObjective, kl_divergence_loss, mutual_information_loss, sparsity_loss
from .model import DecoupledNet, load_decoupled
from .semhash import improved_semhash, saturating_sigmoid

__all__ = [
    "ArchitectureController",
    "DecoupledNet",
    "DecouplingObjective",
    "GatedConvBN",
    "collect_paths",
    "decision_tree",
    "filter_states",
    "hopkins_statistic",
    "improved_semhash",
    "kl_divergence_loss",
    "load_decoupled",
    "mutual_information_loss",
    "occlusion_analysis",
    "run_method",
    "saturating_sigmoid",
    "sparsity_loss",
]
