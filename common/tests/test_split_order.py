"""Every split of common.data comes class-interleaved: every prefix mixes the classes, membership unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import DatasetSplits, ImageTensors, load_dataset, sources
from common.data.registry import TEST_HALF_SEED
from common.data.splits import class_interleaved_order, stratified_split

# A planted image folder, class-sorted on disk and unbalanced, so a sorted prefix would hold one class.
PLANTED_TRAIN = {"ant": 60, "bee": 90, "cow": 24}
PLANTED_TEST = {"ant": 20, "bee": 12, "cow": 28}


def _prefix_deviation(labels: torch.Tensor | np.ndarray, num_classes: int, start: int) -> float:
    """The largest |count of class c in the first n - n * share of c| over classes and prefixes n >= start
    (0 when the split is shorter than ``start``). Share = the class's fraction of the whole split."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < start:
        return 0.0
    onehot = np.eye(num_classes, dtype=np.int64)[labels]  # N x K
    counts = np.cumsum(onehot, axis=0)
    share = np.arange(1, n + 1)[:, None] * (counts[-1] / n)[None, :]
    return float(np.abs(counts - share)[start - 1 :].max())


def _assert_every_prefix_mixed(splits: DatasetSplits) -> None:
    k = splits.num_classes
    for part in ("train", "val", "test"):
        split = getattr(splits, part)
        worst = _prefix_deviation(split.labels, k, 10 * k)
        assert worst <= 1 + 1e-9, f"{splits.name} {part}: a prefix is {worst:.2f} images off a class's share"


def _plant_folder(root: Path) -> Path:
    rng = np.random.RandomState(4)
    for part, sizes in (("train", PLANTED_TRAIN), ("test", PLANTED_TEST)):
        for cls, count in sizes.items():
            (root / part / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.randint(0, 256, (4, 4, 3), dtype=np.uint8)).save(root / part / cls / f"{i}.png")
    return root


def _labelled_rows(images: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    """A split as the sorted multiset of (label, image bytes): equal exactly when membership is."""
    return sorted(bytes([int(y)]) + bytes(x) for x, y in zip(images.reshape(len(images), -1).numpy(), labels))


# --- the order itself ---------------------------------------------------------------------------------------


def test_order_is_a_seeded_permutation_dealt_round_robin_when_balanced() -> None:
    labels = np.repeat(np.arange(5), 8)  # class-sorted, like an image folder
    order = class_interleaved_order(labels, seed=0)
    assert np.array_equal(np.sort(order), np.arange(40))
    assert np.array_equal(order, class_interleaved_order(labels, seed=0))
    assert not np.array_equal(order, class_interleaved_order(labels, seed=1))
    dealt = labels[order].reshape(8, 5)
    assert all(sorted(row) == list(range(5)) for row in dealt)  # each round holds every class once
    assert len({tuple(row) for row in dealt}) > 1  # and rounds deal the classes in varying orders
    within = order[labels[order] == 0]
    assert not np.array_equal(within, np.sort(within))  # images of a class come in a seeded random order
    assert class_interleaved_order(np.empty(0, dtype=np.int64), 0).shape == (0,)


def test_every_prefix_is_within_one_image_of_its_share_for_unbalanced_classes() -> None:
    rng = np.random.RandomState(0)
    for trial in range(60):
        k = rng.randint(1, 12)
        counts = rng.randint(1, rng.choice([4, 40, 400]), size=k)
        labels = rng.permutation(np.repeat(np.arange(k), counts))
        order = class_interleaved_order(labels, seed=trial)
        assert np.array_equal(np.sort(order), np.arange(len(labels)))
        assert _prefix_deviation(labels[order], k, 1) <= 1 + 1e-9, counts
    # Sorting by a per-class stride ((rank + 1/2) / class count) drifts 2.4 images off one class's share on
    # nine small classes and one large one; the deadline order stays within one.
    counts = [10] * 9 + [100]
    labels = np.repeat(np.arange(10), counts)
    stride = labels[np.argsort(np.concatenate([(np.arange(m) + 0.5) / m for m in counts]), kind="stable")]
    assert _prefix_deviation(stride, 10, 100) > 2
    assert _prefix_deviation(labels[class_interleaved_order(labels, 3)], 10, 1) <= 1 + 1e-9
    assert _prefix_deviation(labels, 10, 100) > 1  # the class-sorted split fails the same check


# --- every split load_dataset returns -----------------------------------------------------------------------


@pytest.mark.parametrize("val_source", ["train", "test-half"])
def test_every_prefix_of_every_digits_split_is_class_mixed(val_source: str) -> None:
    _assert_every_prefix_mixed(load_dataset("digits", val_source=val_source))


@pytest.mark.parametrize("val_source", ["train", "test-half"])
def test_every_prefix_of_a_planted_image_folder_is_class_mixed(tmp_path: Path, val_source: str) -> None:
    name = f"imagefolder:{_plant_folder(tmp_path / 'planted')}"
    splits = load_dataset(name, val_fraction=0.2, seed=1, cache_dir=tmp_path / "cache", val_source=val_source)
    _assert_every_prefix_mixed(splits)
    assert len(set(splits.test.labels[:30].tolist())) == 3  # on disk the first 30 test images are all "ant"


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("val_source", ["train", "test-half"])
def test_every_prefix_of_every_cifar10_split_is_class_mixed(val_source: str) -> None:
    root = os.environ.get("DATA_ROOT")
    if not root or not any(Path(root, p).exists() for p in ("cifar10/train", "cifar-10-batches-py")):
        pytest.skip("needs DATA_ROOT holding CIFAR-10")
    splits = load_dataset("cifar10", root, val_source=val_source)
    _assert_every_prefix_mixed(splits)
    assert torch.bincount(splits.test.labels[:100], minlength=10).tolist() == [10] * 10


# --- membership is what it was before the order -------------------------------------------------------------


def _old_splits(full: ImageTensors, test: ImageTensors, val_fraction: float, seed: int,
                val_source: str) -> tuple[ImageTensors, ImageTensors, ImageTensors]:
    """What load_dataset returned before the interleaving: stratified_split's sorted indices, nothing else."""
    if val_source == "test-half":
        test_idx, val_idx = stratified_split(test.labels.numpy(), 0.5, TEST_HALF_SEED)
        return full, test.subset(val_idx), test.subset(test_idx)
    train_idx, val_idx = stratified_split(full.labels.numpy(), val_fraction, seed)
    return full.subset(train_idx), full.subset(val_idx), test


@pytest.mark.parametrize("val_source", ["train", "test-half"])
def test_membership_of_every_split_is_unchanged(tmp_path: Path, val_source: str) -> None:
    folder = _plant_folder(tmp_path / "planted")
    cases = [
        (f"imagefolder:{folder}", sources.load_imagefolder(str(folder), tmp_path, None), 0.2, 1),
        ("digits", sources.load_digits(tmp_path, False, None), 0.1, 3),
    ]
    for name, (full, test, _), fraction, seed in cases:
        new = load_dataset(name, val_fraction=fraction, seed=seed, cache_dir=tmp_path / "cache", val_source=val_source)
        for part, old in zip(("train", "val", "test"), _old_splits(full, test, fraction, seed, val_source)):
            got = getattr(new, part)
            assert _labelled_rows(got.images, got.labels) == _labelled_rows(old.images, old.labels), (name, part)
