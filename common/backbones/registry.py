"""Build any backbone by name; load weights with clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .base import Backbone
from .cifar_resnet import CifarResNet
from .mobilenetv2 import MobileNetV2
from .resnet18 import ResNet18
from .vgg import VGG

_BUILDERS: dict[str, Callable[[int], Backbone]] = {
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet32": lambda k: CifarResNet(32, k),
    "resnet44": lambda k: CifarResNet(44, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "resnet110": lambda k: CifarResNet(110, k),
    "resnet18": ResNet18,
    "vgg16": lambda k: VGG(num_classes=k),
    "mobilenetv2": MobileNetV2,
}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or belongs to another architecture."""


def list_backbones() -> list[str]:
    return sorted(_BUILDERS)


def build_backbone(name: str, num_classes: int = 10, weights: str | os.PathLike | None = None) -> Backbone:
    """Build ``name`` for ``num_classes`` classes, optionally loading a weights file."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}")
    model = _BUILDERS[name](num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain state dict, a {'state_dict': ...} / {'model': ...} checkpoint, or a
    DataParallel save (``module.`` prefixes are stripped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise WeightsError(f"cannot read weights file {path}: it is corrupt or not a torch file ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def model_classes(model: nn.Module) -> int | str:
    """Output classes of ``model``'s last linear layer ("?" when it has none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else "?"


def load_weights(model: Backbone, path: str | os.PathLike) -> Backbone:
    """Load ``path`` into ``model``. Files without normalisation buffers (such as the pretrained CIFAR
    ResNets) keep the model's default statistics, which are the ones those weights were trained with."""
    state = read_state_dict(path)
    own = model.state_dict()
    # Old checkpoints lack normalisation buffers and BN step counters; neither changes the function.
    missing = [k for k in own if k not in state and not k.startswith("normalize.")
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path} does not fit backbone {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}. "
            f"The file must hold the weights of {type(model).__name__} with {model_classes(model)} output classes "
            "(the dataset's class count): check --backbone and --dataset against it."
        )
    model.load_state_dict(state, strict=False)
    return model
