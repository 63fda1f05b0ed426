"""Backbones with one uniform interface: see ``Backbone`` and ``GateSite``."""

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, GateSite, Normalize
from .registry import WeightsError, build_backbone, list_backbones, load_weights, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "GateSite",
    "Normalize",
    "WeightsError",
    "build_backbone",
    "list_backbones",
    "load_weights",
    "read_state_dict",
]
