"""``load_dataset``: one entry point from a dataset name to train / val / test tensors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import sources
from .containers import DatasetSplits, ImageTensors
from .paths import resolve_cache_dir, resolve_data_root
from .splits import class_interleaved_order, stratified_split

IMAGEFOLDER_PREFIX = "imagefolder:"

# Where the validation split comes from. "train": a class-stratified hold-out of the training set (runs
# that start from a network we trained on train minus val). "test-half": for runs that start from the
# published weights, which saw all 50,000 training images: validation is a fixed, class-stratified half of
# the test set and the reported test split is the other half (evaluation-protocol.md, section 1).
VAL_SOURCES = ("train", "test-half")
TEST_HALF_SEED = 0  # fixed: the two halves must not move with a run's seed
# Every split comes class-interleaved (splits.class_interleaved_order), so that split[:N] mixes the classes.
# Fixed, like TEST_HALF_SEED: the order of the test split must be the same for every run and method.
SPLIT_ORDER_SEED = 0

_SOURCES: dict[str, Callable[[Path, bool, Path | None], sources.Loaded]] = {
    "cifar10": sources.load_cifar10,
    "cifar100": sources.load_cifar100,
    "digits": sources.load_digits,
    "mnist": sources.load_mnist,
    "stl10": sources.load_stl10,
    "svhn": sources.load_svhn,
}


def list_datasets() -> list[str]:
    """The built-in dataset names; user folders are loaded as ``imagefolder:<path>`` on top of these."""
    return sorted(_SOURCES)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    val_source: str = "train",
) -> DatasetSplits:
    """Load ``name`` as uint8 tensors, with ``val`` a class-stratified hold-out of the training set.

    ``val_source="test-half"`` (for runs from published weights trained on the whole training set) instead
    keeps the whole training set as ``train``, takes ``val`` as a fixed class-stratified half of the test
    set (seed ``TEST_HALF_SEED``, independent of ``seed``) and leaves the other half as ``test``;
    ``val_fraction`` is then unused.

    Every split comes in a fixed class-interleaved order (``splits.class_interleaved_order``, seed
    ``SPLIT_ORDER_SEED``): any prefix ``split.images[:N]`` holds each class within one image of its share.
    The order changes no split's membership.

    ``root`` defaults to ``$DATA_ROOT``, else ``./data``; ``cache_dir`` (decoded image folders) defaults
    to ``$ICNN_CACHE``, else ``~/.cache/interpretable-cnns``. ``val_fraction`` of every class is held out
    with ``numpy.random.RandomState(seed)``, so the same arguments always give the same split.
    Raises ``DatasetNotFoundError`` when the files are missing and ``ValueError`` for an unknown name.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_source not in VAL_SOURCES:
        raise ValueError(f"val_source must be one of {', '.join(VAL_SOURCES)}, got {val_source!r}")
    data_root = resolve_data_root(root)
    cache = resolve_cache_dir(cache_dir)
    if name.startswith(IMAGEFOLDER_PREFIX):
        full, test, classes = sources.load_imagefolder(name[len(IMAGEFOLDER_PREFIX) :], data_root, cache)
    elif name.lower() in _SOURCES:
        full, test, classes = _SOURCES[name.lower()](data_root, download, cache)
    else:
        known = ", ".join(list_datasets())
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}, or {IMAGEFOLDER_PREFIX}<path>")
    if val_source == "test-half":
        test_idx, val_idx = stratified_split(test.labels.numpy(), 0.5, TEST_HALF_SEED)
        return DatasetSplits(name=name, train=_interleaved(full), val=_interleaved(test, val_idx),
                             test=_interleaved(test, test_idx), classes=list(classes), val_source=val_source)
    train_idx, val_idx = stratified_split(full.labels.numpy(), val_fraction, seed)
    return DatasetSplits(name=name, train=_interleaved(full, train_idx), val=_interleaved(full, val_idx),
                         test=_interleaved(test), classes=list(classes))


def _interleaved(split: ImageTensors, indices: np.ndarray | None = None) -> ImageTensors:
    """``split`` restricted to ``indices`` (all when None), in class-interleaved order: one gather."""
    idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    return split.subset(idx[class_interleaved_order(split.labels.numpy()[idx], SPLIT_ORDER_SEED)])


def default_val_source(pretrained: bool) -> str:
    """The split rule of evaluation-protocol.md: ``test-half`` for a published start, ``train`` otherwise."""
    return "test-half" if pretrained else "train"
