"""DRIB: Interpreting DNN with Dynamic Reasoning and Information Bottleneck (Si et al., ICPCSEE 2022).

Dynamic reasoning decision module: `drib.decision` (Eq. 2-4), attached to a backbone by `drib.network`,
executed with real channel skipping by `drib.sparse_inference`. Information bottleneck verification:
`drib.bottleneck` (per-sample IBA, Schulz et al. 2020) and `drib.verification` (credibility).
"""

from .config import BottleneckConfig, DecisionConfig, DRIBConfig, TrainConfig
from .decision import DecisionGate, gumbel_softmax_select
from .model import DynamicNetwork, default_gate_sites
from .pipeline import load_model, run_method
from .sparse_inference import channel_skipping, sparse_forward

__all__ = [
    "BottleneckConfig",
    "DRIBConfig",
    "DecisionConfig",
    "DecisionGate",
    "DynamicNetwork",
    "TrainConfig",
    "channel_skipping",
    "default_gate_sites",
    "gumbel_softmax_select",
    "load_model",
    "run_method",
    "sparse_forward",
]
