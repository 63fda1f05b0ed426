"""Tests for common.data: datasets, the validation hold-out, the batch loader and the image-folder cache."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import (
    BatchLoader,
    DatasetNotFoundError,
    DatasetSplits,
    ImageTensors,
    folders,
    list_datasets,
    load_dataset,
    resolve_data_root,
    sources,
)
from common.data.loader import random_crop_flip
from common.data.splits import stratified_split

# --- helpers ------------------------------------------------------------------------------------------------


def _id_split(n: int, h: int = 8, w: int = 8) -> ImageTensors:
    """Images whose pixels all equal their index (mod 256); labels are the index, so batches reveal order."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    return ImageTensors(images, torch.arange(n))


def _coordinate_split(n: int, h: int = 32, w: int = 32) -> ImageTensors:
    """Every pixel stores its own (row + 1, col + 1) and a 255 marker, so a crop or flip can be traced."""
    rows = torch.arange(1, h + 1).view(h, 1).expand(h, w)
    cols = torch.arange(1, w + 1).view(1, w).expand(h, w)
    img = torch.stack([rows, cols, torch.full((h, w), 255)]).to(torch.uint8)
    return ImageTensors(img.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.int64))


def _rows(images: torch.Tensor | np.ndarray) -> list[bytes]:
    """The images as a sorted list of byte strings: a split's multiset of images, whatever its order."""
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return sorted(bytes(r) for r in np.ascontiguousarray(array).reshape(len(array), -1))


def _epoch_labels(loader: BatchLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _data_root(*required: str) -> Path:
    """DATA_ROOT from the environment, or skip when it (or every one of ``required``) is absent."""
    root = os.environ.get("DATA_ROOT")
    if not root or not any(Path(root, r).exists() for r in required):
        pytest.skip(f"needs DATA_ROOT holding one of {required}")
    return Path(root)


# --- digits (embedded) --------------------------------------------------------------------------------------


def test_digits_shapes_dtypes_classes() -> None:
    s = load_dataset("digits")
    assert isinstance(s, DatasetSplits)
    assert s.name == "digits"
    assert s.classes == [str(i) for i in range(10)] and s.num_classes == 10
    assert s.image_size == (32, 32)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.test) == 359  # 20% held out as the test set
    assert len(s.val) == round(0.1 * (1797 - 359))
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert part.images.shape[1:] == (3, 32, 32)
        # Grey replicated: the three channels are identical.
        assert torch.equal(part.images[:, 0], part.images[:, 1])
        assert torch.equal(part.images[:, 0], part.images[:, 2])
    assert int(s.train.images.max()) == 255 and int(s.train.images.min()) == 0
    assert set(s.test.labels.tolist()) == set(range(10))


def test_digits_is_deterministic_and_test_set_ignores_seed() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).images, getattr(b, part).images)
        assert torch.equal(getattr(a, part).labels, getattr(b, part).labels)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.test.images, c.test.images)  # the test set is fixed
    assert not torch.equal(a.val.images, c.val.images)  # the seed moves only the hold-out


# --- validation split ---------------------------------------------------------------------------------------


def test_stratified_split_is_disjoint_stratified_deterministic() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    np.random.RandomState(3).shuffle(labels)
    keep, hold = stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(keep, hold).size == 0
    assert np.array_equal(np.sort(np.concatenate([keep, hold])), np.arange(len(labels)))
    assert np.bincount(labels[hold], minlength=3).tolist() == [5, 3, 2]
    keep2, hold2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(hold, hold2) and np.array_equal(keep, keep2)
    assert not np.array_equal(hold, stratified_split(labels, 0.1, seed=1)[1])


def test_stratified_split_total_matches_fraction() -> None:
    labels = np.array([0] * 7 + [1] * 7 + [2] * 7)
    _, hold = stratified_split(labels, 0.2, seed=0)
    assert len(hold) == round(0.2 * 21)  # not 3 x round(1.4) = 3
    assert np.bincount(labels[hold], minlength=3).max() - np.bincount(labels[hold], minlength=3).min() <= 1


def test_val_split_partitions_training_set() -> None:
    full, _, _ = sources.load_digits(Path("."), False, None)
    s = load_dataset("digits", val_fraction=0.25, seed=5)

    # train + val is exactly the training set, each image once.
    assert _rows(torch.cat([s.train.images, s.val.images])) == _rows(full.images)
    counts_full = torch.bincount(full.labels, minlength=10)
    counts_val = torch.bincount(s.val.labels, minlength=10)
    assert torch.all((counts_val - 0.25 * counts_full).abs() <= 1)


def test_val_fraction_zero_gives_empty_val() -> None:
    s = load_dataset("digits", val_fraction=0.0)
    assert len(s.val) == 0 and s.val.images.shape == (0, 3, 32, 32)
    assert len(s.train) == 1797 - 359
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


def test_image_tensors_validates_and_subsets() -> None:
    split = _id_split(10)
    sub = split.subset([3, 1])
    assert sub.labels.tolist() == [3, 1] and int(sub.images[0, 0, 0, 0]) == 3
    assert len(split.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(ValueError):
        ImageTensors(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))  # float images
    with pytest.raises(ValueError):
        ImageTensors(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        ImageTensors(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --- BatchLoader --------------------------------------------------------------------------------------------


def test_loader_yields_float_unit_range_and_labels() -> None:
    s = load_dataset("digits")
    loader = BatchLoader(s.train, 128, train=True)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert x.is_contiguous()


def test_eval_loader_keeps_order_and_last_batch() -> None:
    split = _id_split(105)
    loader = BatchLoader(split, 10, train=False)
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11 and len(batches[-1][1]) == 5
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(105))
    # No augmentation: pixels are exactly uint8 / 255.
    assert torch.equal(torch.cat([x for x, _ in batches]), split.images.float() / 255)
    assert torch.equal(_epoch_labels(loader), torch.arange(105))  # same order every pass


def test_train_loader_drop_last_default() -> None:
    assert len(BatchLoader(_id_split(105), 10, train=True)) == 10
    assert len(list(BatchLoader(_id_split(105), 10, train=True))) == 10
    assert len(BatchLoader(_id_split(105), 10, train=True, drop_last=False)) == 11
    # Never an empty epoch by default, even when the split is smaller than one batch.
    assert len(list(BatchLoader(_id_split(5), 10, train=True))) == 1


def test_train_loader_shuffles_per_epoch_reproducibly() -> None:
    split = _id_split(100)

    def make(seed: int) -> BatchLoader:
        return BatchLoader(split, 10, train=True, augment=False, seed=seed)

    loader = make(0)
    e1, e2 = _epoch_labels(loader), _epoch_labels(loader)
    assert sorted(e1.tolist()) == list(range(100)) and sorted(e2.tolist()) == list(range(100))
    assert not torch.equal(e1, torch.arange(100))
    assert not torch.equal(e1, e2)
    again = make(0)
    assert torch.equal(_epoch_labels(again), e1) and torch.equal(_epoch_labels(again), e2)
    assert not torch.equal(_epoch_labels(make(1)), e1)
    again.set_epoch(1)
    assert torch.equal(_epoch_labels(again), e2)


def test_crop_flip_identity_and_flip() -> None:
    x = _coordinate_split(2).images
    centre = torch.full((2,), 4)
    same = random_crop_flip(x, centre, centre, torch.tensor([False, True]))
    assert torch.equal(same[0], x[0])
    assert torch.equal(same[1], x[1].flip(-1))


def test_augmentation_shifts_at_most_4px_and_flips() -> None:
    n, h, w = 64, 32, 32
    loader = BatchLoader(_coordinate_split(n, h, w), 16, train=True, seed=0)
    assert loader.augment
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (n, 3, h, w)
    v = (xs * 255).round().long()
    r_out = torch.arange(h).view(h, 1).expand(h, w)
    c_out = torch.arange(w).view(1, w).expand(h, w)
    flips, shifts = set(), set()
    for img in v:
        valid = img[2] == 255
        assert torch.all(img[:, ~valid] == 0)  # the rest is zero padding
        src_r, src_c = img[0][valid] - 1, img[1][valid] - 1
        dr = (src_r - r_out[valid]).unique()
        assert len(dr) == 1 and abs(int(dr)) <= 4
        d_plain = (src_c - c_out[valid]).unique()
        d_flip = (src_c + c_out[valid] - (w - 1)).unique()
        flipped = len(d_plain) != 1
        dc = d_flip if flipped else d_plain
        assert len(dc) == 1 and abs(int(dc)) <= 4
        assert int(valid.sum()) == (h - abs(int(dr))) * (w - abs(int(dc)))
        flips.add(flipped)
        shifts.add((int(dr), int(dc)))
    assert flips == {False, True}
    assert len(shifts) > 10


def test_eval_loader_can_augment_and_train_loader_can_skip_it() -> None:
    split = _coordinate_split(8)
    plain = torch.cat([x for x, _ in BatchLoader(split, 8, train=True, augment=False)])
    assert torch.equal(plain, split.images.float() / 255)
    augmented = torch.cat([x for x, _ in BatchLoader(split, 8, train=False, augment=True)])
    assert not torch.equal(augmented, split.images.float() / 255)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu() -> None:
    split = _coordinate_split(50)
    cpu = list(BatchLoader(split, 16, train=True, seed=3))
    gpu = list(BatchLoader(split, 16, train=True, seed=3, device="cuda"))
    assert len(cpu) == len(gpu)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# --- errors and roots ---------------------------------------------------------------------------------------


def test_missing_cifar10_names_paths_layout_and_fixes(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for needle in (
        "'cifar10'",
        str(tmp_path / "cifar-10-batches-py"),
        str(tmp_path / "cifar10" / "train"),
        "<root>/cifar10/train/<class>/*.png",
        "<root>/cifar-10-batches-py/",
        "--data-root",
        "DATA_ROOT",
        "download=True",
    ):
        assert needle in msg


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("mnist", "MNIST/raw"),
        ("svhn", "train_32x32.mat"),
        ("stl10", "stl10_binary"),
        ("cifar100", "cifar100"),
    ],
)
def test_missing_datasets_raise_clear_error(tmp_path: Path, name: str, needle: str) -> None:
    with pytest.raises(DatasetNotFoundError, match=needle) as info:
        load_dataset(name, tmp_path)
    assert str(tmp_path) in str(info.value)


def test_root_comes_from_argument_then_env_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATA_ROOT", raising=False)
    assert resolve_data_root() == Path("./data").absolute()
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "env")):
        load_dataset("mnist")


def test_unknown_name_lists_known_datasets() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet-9000")
    msg = str(info.value)
    assert "imagenet-9000" in msg and "imagefolder:" in msg
    assert set(list_datasets()) == {"cifar10", "cifar100", "digits", "mnist", "stl10", "svhn"}
    for name in list_datasets():
        assert name in msg


def test_failed_download_becomes_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    class OfflineCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            raise URLError("no network here")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=True)
    assert "no network here" in str(info.value) and str(tmp_path / "cifar-10-batches-py") in str(info.value)


# --- CIFAR: torchvision form preferred over PNG folders -----------------------------------------------------


def test_cifar10_prefers_torchvision_batches_over_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    class FakeCIFAR10:
        base_folder = "cifar-10-batches-py"

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            n = 10 if train else 4
            self.data = (np.arange(n * 32 * 32 * 3) % 251).astype(np.uint8).reshape(n, 32, 32, 3)
            self.targets = [i % 2 for i in range(n)]
            self.classes = ["tv_a", "tv_b"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    for split in ("train", "test"):
        for cls in ("png_a", "png_b"):
            _write_png(tmp_path / "cifar10" / split / cls / "0.png", np.zeros((32, 32, 3), np.uint8))
    cache = tmp_path / "cache"

    png = load_dataset("cifar10", tmp_path, val_fraction=0, cache_dir=cache)
    assert png.classes == ["png_a", "png_b"] and len(png.train) == 2

    (tmp_path / "cifar-10-batches-py").mkdir()
    tv = load_dataset("cifar10", tmp_path, val_fraction=0, cache_dir=cache)
    assert tv.classes == ["tv_a", "tv_b"] and len(tv.train) == 10 and len(tv.test) == 4
    expected = FakeCIFAR10(str(tmp_path)).data.transpose(0, 3, 1, 2)
    assert _rows(tv.train.images) == _rows(expected)  # the same images, in class-interleaved order


# --- MNIST from IDX files -----------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_gz_and_pads_to_32(tmp_path: Path) -> None:
    rng = np.random.RandomState(0)
    raw = tmp_path / "MNIST" / "raw"
    train_x = rng.randint(1, 256, size=(20, 28, 28)).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.randint(0, 256, size=(5, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    s = load_dataset("mnist", tmp_path, val_fraction=0)
    assert s.image_size == (32, 32) and len(s.train) == 20 and len(s.test) == 5
    img = s.train.images
    assert torch.equal(img[:, 0], img[:, 2])
    assert _rows(img[:, 0, 2:30, 2:30]) == _rows(train_x)  # the split is reordered, never changed
    assert int(img[:, :, :2].sum()) == 0 and int(img[:, :, :, -2:].sum()) == 0  # zero padding
    # Image i has label i % 10 in the files: every image keeps its own label through the reordering.
    by_image = {bytes(x): i % 10 for i, x in enumerate(train_x.reshape(20, -1))}
    assert [by_image[bytes(x)] for x in img[:, 0, 2:30, 2:30].reshape(20, -1).numpy()] == s.train.labels.tolist()


# --- image folders and their cache --------------------------------------------------------------------------


def _make_user_folder(root: Path) -> dict[str, list[np.ndarray]]:
    rng = np.random.RandomState(1)
    expected: dict[str, list[np.ndarray]] = {"cat": [], "dog": []}
    for i in range(3):
        rgb = rng.randint(0, 256, size=(6, 5, 3)).astype(np.uint8)
        _write_png(root / "train" / "cat" / f"c{i}.png", rgb)
        expected["cat"].append(rgb)
    for i in range(2):
        grey = rng.randint(0, 256, size=(6, 5)).astype(np.uint8)
        _write_png(root / "train" / "dog" / f"d{i}.png", grey)
        expected["dog"].append(np.repeat(grey[:, :, None], 3, axis=2))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _write_png(root / "test" / "dog" / "t0.png", rng.randint(0, 256, size=(6, 5, 3)).astype(np.uint8))
    return expected


def test_imagefolder_loads_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user, cache = tmp_path / "user", tmp_path / "cache"
    expected = _make_user_folder(user)
    name = f"imagefolder:{user}"
    s = load_dataset(name, val_fraction=0, cache_dir=cache)
    assert s.classes == ["cat", "dog"] and s.image_size == (6, 5)
    assert sorted(s.train.labels.tolist()) == [0, 0, 0, 1, 1]
    for label, kind in enumerate(("cat", "dog")):  # the same images, each under its class, interleaved
        want = [a.transpose(2, 0, 1) for a in expected[kind]]
        assert _rows(s.train.images[s.train.labels == label]) == _rows(np.stack(want))
    assert s.test.labels.tolist() == [1]  # test has only "dog": mapped onto the training class index

    assert len(list(cache.glob("*.images.npy"))) == 2 and len(list(cache.glob("*.json"))) == 2
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))

    calls = []
    real_decode = folders.decode_images

    def counting_decode(files: list[str], desc: str = "", **options: object) -> np.ndarray:
        calls.append(len(files))
        return real_decode(files, desc, **options)

    monkeypatch.setattr(folders, "decode_images", counting_decode)
    again = load_dataset(name, val_fraction=0, cache_dir=cache)
    assert calls == []  # served from the cache
    assert torch.equal(again.train.images, s.train.images) and torch.equal(again.test.images, s.test.images)
    assert torch.equal(again.train.labels, s.train.labels)

    # A changed folder must not reuse the stale cache.
    _write_png(user / "train" / "cat" / "c9.png", np.zeros((6, 5, 3), np.uint8))
    changed = load_dataset(name, val_fraction=0, cache_dir=cache)
    assert calls == [6] and len(changed.train) == 6
    assert len(list(cache.glob("*.images.npy"))) == 3


def test_imagefolder_relative_to_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_user_folder(tmp_path / "root" / "mine")
    monkeypatch.chdir(tmp_path)
    s = load_dataset("imagefolder:mine", tmp_path / "root", val_fraction=0, cache_dir=None)
    assert len(s.train) == 5


def test_imagefolder_mixed_sizes_and_missing(tmp_path: Path) -> None:
    _write_png(tmp_path / "odd" / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _write_png(tmp_path / "odd" / "train" / "a" / "1.png", np.zeros((5, 4, 3), np.uint8))
    _write_png(tmp_path / "odd" / "test" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="same size"):
        load_dataset(f"imagefolder:{tmp_path / 'odd'}", cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nothing" / "train")):
        load_dataset(f"imagefolder:{tmp_path / 'nothing'}", cache_dir=tmp_path / "cache")


# --- real data (DATA_ROOT) ----------------------------------------------------------------------------------

CIFAR10_TRAIN_SUMS = (6_415_714_204, 6_295_060_180, 5_829_907_619)  # integer pixel sums, published stats
CIFAR10_TRAIN_MEAN = (0.49139968, 0.48215841, 0.44653091)


@pytest.mark.data
def test_cifar10_from_data_root() -> None:
    root = _data_root("cifar10/train", "cifar-10-batches-py")
    s = load_dataset("cifar10", root, val_fraction=0.1)
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.image_size == (32, 32) and s.num_classes == 10 and s.classes[0] == "airplane"
    assert torch.bincount(s.val.labels).tolist() == [500] * 10
    sums = np.zeros(3, dtype=np.int64)
    for part in (s.train, s.val):
        for chunk in part.images.split(5000):
            sums += chunk.sum(dim=(0, 2, 3), dtype=torch.int64).numpy()
    assert tuple(sums.tolist()) == CIFAR10_TRAIN_SUMS
    mean = sums.astype(np.float64) / (50000 * 32 * 32 * 255)
    assert np.allclose(mean, CIFAR10_TRAIN_MEAN, rtol=0, atol=1e-6)


@pytest.mark.data
def test_mnist_from_data_root() -> None:
    root = _data_root("MNIST/raw")
    s = load_dataset("mnist", root)
    assert len(s.train) + len(s.val) == 60000 and len(s.test) == 10000
    assert s.image_size == (32, 32)
    counts = torch.bincount(torch.cat([s.train.labels, s.val.labels])).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_test_half_split_partitions_test_set_fixed_and_stratified() -> None:
    plain = load_dataset("digits", val_fraction=0.1, seed=3)
    a = load_dataset("digits", seed=3, val_source="test-half")
    b = load_dataset("digits", seed=7, val_source="test-half")
    assert a.val_source == "test-half" and plain.val_source == "train"
    # The training set is whole; val and test halves partition the original test set, each image once.
    assert len(a.train) == len(plain.train) + len(plain.val)
    assert _rows(torch.cat([a.val.images, a.test.images])) == _rows(plain.test.images)
    assert abs(len(a.val) - len(a.test)) <= 1
    # Stratified: every class is split in half to within one image, and the seed does not move the halves.
    counts_all = torch.bincount(plain.test.labels, minlength=10)
    assert torch.all((torch.bincount(a.val.labels, minlength=10) - counts_all / 2).abs() <= 1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.images, b.test.images)
    assert a.test_split_name.startswith("held-out test half")
    with pytest.raises(ValueError, match="val_source"):
        load_dataset("digits", val_source="test")
