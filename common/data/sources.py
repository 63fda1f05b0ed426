"""One loader per dataset, each returning ``(full training split, test split, class names)``.

Every loader yields uint8 ``N x 3 x H x W`` images; the hold-out of the validation split happens later,
in :func:`common.data.registry.load_dataset`, identically for all of them.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .containers import ImageTensors
from .folders import check_training_classes, load_image_folder
from .paths import not_found
from .splits import stratified_split

Loaded = tuple[ImageTensors, ImageTensors, list[str]]

DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed: the test set must not move with the run's seed
# Failed downloads raise OSError (URLError, HTTPError); torchvision's own file checks raise RuntimeError.
_LOAD_ERRORS = (RuntimeError, OSError)


def _split(images: np.ndarray, labels: np.ndarray | list[int]) -> ImageTensors:
    # Contiguous and writable (IDX buffers are read-only): torch tensors must own writable memory.
    images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    labels = torch.from_numpy(np.array(labels, dtype=np.int64))
    return ImageTensors(images, labels)


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    """``N x H x W`` grey to ``N x 3 x H x W`` by replicating the channel."""
    return np.repeat(images[:, None], 3, axis=1)


# --- digits: embedded in scikit-learn, needs no files -------------------------------------------------------


def load_digits(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    """scikit-learn's 8x8 digits (0..16 grey), rescaled to 0..255 and bilinearly resized to 32x32."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    grey = np.round(bunch.images * (255.0 / 16.0))  # N x 8 x 8, exact 0..255 integers
    big = F.interpolate(
        torch.from_numpy(grey)[:, None].float(),
        size=(DIGITS_SIZE, DIGITS_SIZE),
        mode="bilinear",
        align_corners=False,
    )
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    full = ImageTensors(images, labels)
    train_idx, test_idx = stratified_split(bunch.target, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return full.subset(train_idx), full.subset(test_idx), [str(int(c)) for c in bunch.target_names]


# --- CIFAR-10 / CIFAR-100: torchvision batches or PNG folders -----------------------------------------------


_CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python")}


def _load_cifar(name: str, root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    tv_name, tv_folder = _CIFAR[name]
    tv_dir = root / tv_folder
    png_dir = root / name
    png_ready = (png_dir / "train").is_dir() and (png_dir / "test").is_dir()
    layouts = [
        f"<root>/{tv_folder}/   (torchvision's python batches)",
        f"<root>/{name}/train/<class>/*.png and <root>/{name}/test/<class>/*.png",
    ]
    searched = [tv_dir, png_dir / "train", png_dir / "test"]

    # The torchvision batches are preferred when present: one pickle read, no decode cache needed.
    if tv_dir.is_dir() or (download and not png_ready):
        from torchvision import datasets  # imported only here: it costs seconds the PNG path does not need

        tv_cls = getattr(datasets, tv_name)
        try:
            train = tv_cls(str(root), train=True, download=download)
            test = tv_cls(str(root), train=False, download=download)
        except _LOAD_ERRORS as err:
            raise not_found(name, root, searched, layouts, cause=f"{type(err).__name__}: {err}") from err
        # torchvision keeps CIFAR as N x H x W x C.
        return (
            _split(train.data.transpose(0, 3, 1, 2), train.targets),
            _split(test.data.transpose(0, 3, 1, 2), test.targets),
            list(train.classes),
        )
    if png_ready:
        return _load_split_folders(png_dir, cache_dir)
    raise not_found(name, root, searched, layouts)


def load_cifar10(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    return _load_cifar("cifar10", root, download, cache_dir)


def load_cifar100(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    return _load_cifar("cifar100", root, download, cache_dir)


# --- MNIST: the IDX files, gzipped or not -------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 IDX file (the MNIST format), gzipped or not."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    flat = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if flat.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {flat.size} values")
    return flat.reshape(shape)


def load_mnist(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    """MNIST from ``<root>/MNIST/raw/`` (torchvision's layout), 28x28 zero-padded to 32x32.

    The IDX files are read here rather than through ``torchvision.datasets.MNIST``, because torchvision
    only accepts the decompressed files and would try to unpack the ``.gz`` next to them (read-only roots).
    """
    raw = root / "MNIST" / "raw"

    def find() -> list[Path | None]:
        return [next((p for p in (raw / f, raw / f"{f}.gz") if p.is_file()), None) for f in _MNIST_FILES]

    paths = find()
    layouts = ["<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (all four; or decompressed)"]
    searched = [raw / f"{f}[.gz]" for f in _MNIST_FILES]
    if None in paths and download:
        from torchvision import datasets

        try:
            datasets.MNIST(str(root), train=True, download=True)
        except _LOAD_ERRORS as err:
            raise not_found("mnist", root, searched, layouts, cause=f"{type(err).__name__}: {err}") from err
        paths = find()
    if None in paths:
        missing = [f for f, p in zip(_MNIST_FILES, paths) if p is None]
        partial = f"only some files are there; missing {', '.join(missing)}" if len(missing) < 4 else None
        raise not_found("mnist", root, searched, layouts, cause=partial)
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    pad = ((0, 0), (2, 2), (2, 2))
    return (
        _split(_grey_to_rgb(np.pad(train_x, pad)), train_y),
        _split(_grey_to_rgb(np.pad(test_x, pad)), test_y),
        [str(i) for i in range(10)],
    )


# --- SVHN and STL-10: through torchvision -------------------------------------------------------------------


def load_svhn(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    """SVHN's cropped digits (``train_32x32.mat``, ``test_32x32.mat``) in ``<root>/svhn/`` or ``<root>/``."""
    from torchvision import datasets

    names = ("train_32x32.mat", "test_32x32.mat")
    candidates = [root / "svhn", root]
    folder = next((d for d in candidates if all((d / n).is_file() for n in names)), None)
    layouts = ["<root>/svhn/train_32x32.mat and <root>/svhn/test_32x32.mat (or directly under <root>)"]
    searched = [d / n for d in candidates for n in names]
    if folder is None and not download:
        raise not_found("svhn", root, searched, layouts)
    folder = folder or candidates[0]
    try:
        train = datasets.SVHN(str(folder), split="train", download=download)
        test = datasets.SVHN(str(folder), split="test", download=download)
    except _LOAD_ERRORS as err:
        raise not_found("svhn", root, searched, layouts, cause=f"{type(err).__name__}: {err}") from err
    return _split(train.data, train.labels), _split(test.data, test.labels), [str(i) for i in range(10)]


def load_stl10(root: Path, download: bool, cache_dir: Path | None) -> Loaded:
    """STL-10's labelled 96x96 splits (5,000 train, 8,000 test) from ``<root>/stl10_binary/``."""
    from torchvision import datasets

    folder = root / datasets.STL10.base_folder
    layouts = ["<root>/stl10_binary/{train,test}_{X,y}.bin and class_names.txt"]
    if not folder.is_dir() and not download:
        raise not_found("stl10", root, [folder], layouts)
    try:
        train = datasets.STL10(str(root), split="train", download=download)
        test = datasets.STL10(str(root), split="test", download=download)
    except _LOAD_ERRORS as err:
        raise not_found("stl10", root, [folder], layouts, cause=f"{type(err).__name__}: {err}") from err
    return _split(train.data, train.labels), _split(test.data, test.labels), list(train.classes)


# --- user image folders -------------------------------------------------------------------------------------


def _load_split_folders(folder: Path, cache_dir: Path | None) -> Loaded:
    """``folder/train/<class>/*`` and ``folder/test/<class>/*``; labels follow the sorted training classes."""
    train, classes = load_image_folder(folder / "train", cache_dir)
    check_training_classes(classes, train.labels.numpy(), folder / "train")  # one class, or an empty one
    test, test_classes = load_image_folder(folder / "test", cache_dir)
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise ValueError(f"{folder / 'test'} has classes missing from {folder / 'train'}: {unknown}")
    if len(train) and len(test) and train.images.shape[2:] != test.images.shape[2:]:
        raise ValueError(
            f"{folder}: train images are {tuple(train.images.shape[2:])} but test images are "
            f"{tuple(test.images.shape[2:])} (H, W)"
        )
    # A test folder may lack some classes; map its own indices onto the training class indices.
    remap = torch.tensor([classes.index(c) for c in test_classes], dtype=torch.int64)
    return train, ImageTensors(test.images, remap[test.labels]), classes


def load_imagefolder(spec: str, root: Path, cache_dir: Path | None) -> Loaded:
    """``imagefolder:<path>``: ``<path>`` as given (relative to the working directory), else in the root."""
    given = Path(spec).expanduser()
    candidates = [given.absolute()] if given.is_absolute() else [given.absolute(), root / given]
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return _load_split_folders(folder, cache_dir)
    searched = [d / s for d in candidates for s in ("train", "test")]
    layouts = ["<path>/train/<class>/*.png|jpg and <path>/test/<class>/*.png|jpg (class index = sorted names)"]
    raise not_found(f"imagefolder:{spec}", root, searched, layouts, downloadable=False)
