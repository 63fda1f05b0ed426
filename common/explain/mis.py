"""Filter-class mutual information and the MIS score (Liang et al., CSG, ECCV 2020; PICNN, AAAI 2024)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from sklearn.feature_selection import mutual_info_classif
from torch import Tensor, nn

from ..run import progress
from ._utils import eval_mode, model_device

POOLS = ("mean", "sum", "max")


def _split_batch(batch: object) -> tuple[Tensor, Tensor | None]:
    """(images, labels or None) from a tensor, an (images, labels, ...) sequence or a mapping."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        images = batch.get("images", batch.get("image"))
        labels = batch.get("labels", batch.get("label"))
        if images is None:
            raise ValueError("a mapping batch needs an 'images' (or 'image') entry")
        return images, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


def pooled_activations(
    model: nn.Module,
    layer: nn.Module,
    loader_or_images: Tensor | Iterable[object],
    *,
    pool: str = "mean",
    max_batches: int | None = None,
    batch_size: int = 256,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Spatially pooled output of `layer` for every image: N x C float32 on the CPU.

    The layer output (B x C x ...) is reduced over all dimensions after the channel one with `pool`
    ("mean", "sum" or "max"); a B x C output is taken as is. Pooling happens inside the forward hook, before
    any later in-place op can modify the map. The model runs under no_grad in eval mode (training flags
    restored). The result lives on the CPU because it can be dataset-sized and feeds sklearn.

    `loader_or_images` is either an N x 3 x H x W tensor (split into chunks of `batch_size`) or an iterable
    of batches, each a tensor, an (images, labels, ...) sequence or a mapping with 'images' / 'labels'.
    `max_batches` stops after that many batches (chunks). With `return_labels=True` the labels read from the
    same batches are returned too, as an N long tensor, so that activations and labels stay aligned even
    with a shuffling loader.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    batches: Iterable[object] = (
        loader_or_images.split(batch_size) if isinstance(loader_or_images, Tensor) else loader_or_images
    )
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        flat = output.detach().flatten(2) if output.dim() > 2 else output.detach()[:, :, None]
        if pool == "mean":
            reduced = flat.mean(dim=2)
        elif pool == "sum":
            reduced = flat.sum(dim=2)
        else:
            reduced = flat.amax(dim=2)
        captured[:] = [reduced.float().cpu()]

    features: list[Tensor] = []
    labels: list[Tensor] = []
    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            device = model_device(model, torch.device("cpu"))
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                images, batch_labels = _split_batch(batch)
                captured.clear()
                model(images.to(device))
                if not captured:
                    raise RuntimeError("`layer` was not called during the forward pass")
                features.append(captured[0])
                if return_labels:
                    if batch_labels is None:
                        raise ValueError("return_labels=True but the batches carry no labels")
                    labels.append(torch.as_tensor(batch_labels).long().cpu().reshape(-1))
    finally:
        handle.remove()
    if not features:
        raise ValueError("no batches were read")
    activations = torch.cat(features)
    return (activations, torch.cat(labels)) if return_labels else activations


def _to_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


def mutual_information_matrix(
    activations: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    num_classes: int | None = None,
    *,
    random_state: int = 0,
    n_neighbors: int = 3,
) -> np.ndarray:
    """MI (nats) between each filter's pooled activation and each one-vs-rest class indicator: C x K.

    Entry [c, k] = `sklearn.feature_selection.mutual_info_classif(X[:, [c]], labels == k,
    discrete_features=False, n_neighbors=n_neighbors, random_state=random_state)`, computed for all filters
    of class k in one call, as PICNN's evaluation code does: the Kraskov / Ross k-NN estimator for a
    continuous variable against a discrete one, no binning. sklearn scales each feature to unit variance and
    adds tiny seeded noise, so mean versus sum pooling gives the same matrix. For a balanced K-class problem
    each entry is bounded by the indicator's entropy (H(0.1) = 0.325 nats for K = 10).

    `activations` is N x C (see `pooled_activations`), `labels` is [N] in 0..K-1. K = `num_classes` or
    max(labels) + 1; a class with no samples has an all-False indicator and gets MI 0.
    """
    x = _to_numpy(activations).astype(np.float64)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"activations must be N x C with N = len(labels); got {x.shape} and {y.shape}")
    k_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    matrix = np.zeros((x.shape[1], k_classes))
    for k in progress(range(k_classes), "MIS (k-NN MI per class)", total=k_classes):
        indicator = y == k
        if indicator.all() or not indicator.any():
            continue  # a constant indicator carries no information (and the estimator needs two classes)
        matrix[:, k] = mutual_info_classif(
            x, indicator, discrete_features=False, n_neighbors=n_neighbors, random_state=random_state
        )
    return matrix


def mis(
    activations: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    num_classes: int | None = None,
    *,
    random_state: int = 0,
    n_neighbors: int = 3,
) -> float:
    """Mutual Information Score: mean over filters of the max over classes of MI(filter, class indicator).

    MIS = (1/C) * sum_c max_k M[c, k] with M = `mutual_information_matrix(...)` (nats). Higher means each
    filter is more informative about (at least) one class; CSG and PICNN report it on the pooled output of
    the last conv layer over the test set.
    """
    matrix = mutual_information_matrix(
        activations, labels, num_classes, random_state=random_state, n_neighbors=n_neighbors
    )
    return float(matrix.max(axis=1).mean())
