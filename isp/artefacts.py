"""The run directory's model files, written and read without pickled code: backbones (registry name, kept
channels, state dict), the selector's decoder, and the images as the stages feed them; ``load_run``, the
package's one public loader of a run's trained network. Below both the training stages (train.py) and the
metrics (evaluate.py), so neither has to import the other's internals."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from common.backbones import Backbone, build_backbone, list_backbones
from common.data import ImageTensors
from common.loop import require_finite
from common.run import atomic_torch_save, load_checkpoint, pick_device

from .model import prunable_sites
from .selector import DecoderShape, SelectorDecoder
from .slim import keep_from_json, slim_copy


def images_as_float(split: ImageTensors, device: torch.device) -> Tensor:
    return split.images.to(device).float().div_(255.0)


def identify_backbone(model: Backbone) -> str:
    """The registry name whose architecture has exactly ``model``'s parameter names and shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    num_classes = model.classifier.out_features
    for name in list_backbones():
        candidate = build_backbone(name, num_classes).state_dict()
        if {k: tuple(v.shape) for k, v in candidate.items()} == own:
            return name
    raise ValueError(f"{type(model).__name__} matches no registered backbone; ISP needs one of {list_backbones()}")


def save_backbone(path: Path, name: str, model: Backbone, keep: dict[str, list[int]] | None, *,
                  fix: str = "check the classifier's weights (--weights)") -> None:
    """A (possibly slim) backbone as registry name + kept channels + state dict: rebuildable, no pickled code.
    Non-finite weights are refused (``fix``: the setting to change) and nothing is written."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    require_finite(state, f"isp {path.name}", fix)
    atomic_torch_save({"backbone": name, "num_classes": model.classifier.out_features, "keep": keep,
                       "state_dict": state}, path)


def load_backbone(path: Path, device: torch.device | str = "cpu",
                  input_size: tuple[int, int, int] = (3, 32, 32)) -> Backbone:
    blob = load_checkpoint(path)
    model = build_backbone(blob["backbone"], blob["num_classes"])
    if blob["keep"] is not None:
        model = slim_copy(model, keep_from_json(prunable_sites(model, input_size), blob["keep"]), input_size)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def load_run(path: str | os.PathLike, *, device: torch.device | str | None = None) -> Backbone:
    """The trained network of a run directory written by ``python -m isp train`` or ``run_method``: the slim,
    fine-tuned ``model.pt`` (pixels in [0, 1] -> logits), in eval mode, on ``device`` (None:
    ``common.run.pick_device``'s default), read with ``weights_only=True`` (no pickled code runs)."""
    run = Path(path)
    model = run / "model.pt"
    if not model.is_file():
        what = "is not a run directory" if not run.is_dir() else "holds no trained ISP network (no model.pt)"
        raise FileNotFoundError(f"{run} {what}; train it to the end first: python -m isp train --out {run} ...")
    return load_backbone(model, pick_device(device if device is None else str(device)))


def save_decoder(path: Path, decoder: SelectorDecoder, *, fix: str = "lower --set selector_lr") -> None:
    """The selector's decoder; non-finite weights are refused and nothing is written."""
    state = decoder.state_dict()
    require_finite(state, f"isp {path.name}", fix)
    atomic_torch_save({"kind": decoder.kind, "shape": asdict(decoder.shape),
                       "centre_margin": getattr(decoder.head, "centre_margin", None),
                       "state_dict": state}, path)


def load_decoder(path: Path, device: torch.device | str = "cpu") -> SelectorDecoder:
    blob = load_checkpoint(path)
    shape = blob["shape"]
    shape = DecoderShape(list(shape["stage_channels"]), [tuple(s) for s in shape["stage_sizes"]],
                         tuple(shape["image_size"]), shape["num_classes"])
    decoder = SelectorDecoder(shape, blob["kind"], centre_margin=blob["centre_margin"] or 2.0)
    decoder.load_state_dict(blob["state_dict"])
    return decoder.to(device).eval()


