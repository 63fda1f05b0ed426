"""Where data and caches live, and the one error raised when data is missing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATA_ROOT = "./data"
DEFAULT_CACHE_DIR = "~/.cache/interpretable-cnns"


# Where each file comes from, and the command that fetches it on a machine with internet ({root}: the data
# root). Every source is the data set's official archive (or what torchvision downloads, for MNIST).
DATASET_SOURCES: dict[str, tuple[str, str]] = {
    "cifar10": ("the official CIFAR-10 python archive (www.cs.toronto.edu/~kriz/cifar.html)",
                "mkdir -p {root} && curl -L https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
                "| tar -xz -C {root}"),
    "cifar100": ("the official CIFAR-100 python archive (www.cs.toronto.edu/~kriz/cifar.html)",
                 "mkdir -p {root} && curl -L https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
                 "| tar -xz -C {root}"),
    "mnist": ("the MNIST database's four IDX files (the mirror torchvision downloads from)",
              "python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\""),
    "svhn": ("the official SVHN cropped-digits files (ufldl.stanford.edu/housenumbers)",
             "mkdir -p {root}/svhn && curl -L -o {root}/svhn/train_32x32.mat "
             "http://ufldl.stanford.edu/housenumbers/train_32x32.mat && curl -L -o {root}/svhn/test_32x32.mat "
             "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"),
    "stl10": ("the official STL-10 binary archive (cs.stanford.edu/~acoates/stl10)",
              "mkdir -p {root} && curl -L http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz "
              "| tar -xz -C {root}"),
}
# The published CIFAR ResNets (akamaster/pytorch_resnet_cifar10, BSD-2-Clause; the name carries the first 8
# hex digits of the file's SHA-256).
WEIGHTS_SOURCE = "https://github.com/akamaster/pytorch_resnet_cifar10 (folder pretrained_models/)"
WEIGHTS_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for (and were not downloaded)."""


def dataset_hint(name: str, root: str | os.PathLike) -> str | None:
    """Where ``name`` comes from and the exact command that fetches it into ``root`` (None: unknown)."""
    if name not in DATASET_SOURCES:
        return None
    source, command = DATASET_SOURCES[name]
    return f"it comes from {source}; with internet: {command.format(root=root)}"


def weights_hint(file: str, folder: str | os.PathLike) -> str:
    """Where a published weights file comes from and the exact command that fetches it into ``folder``."""
    url = WEIGHTS_URL.format(file=file)
    return (f"{file} comes from {WEIGHTS_SOURCE}; with internet: "
            f"mkdir -p {folder} && curl -L -o {Path(folder) / file} {url}")


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The dataset root: ``root`` if given, else ``$DATA_ROOT``, else ``./data`` (made absolute)."""
    chosen = root if root is not None else os.environ.get("DATA_ROOT") or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser().absolute()


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The decode cache: ``cache_dir``, else ``$ICNN_CACHE``, else ``~/.cache/interpretable-cnns``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("ICNN_CACHE") or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser().absolute()


def not_found(
    name: str,
    root: Path,
    searched: Sequence[Path],
    layouts: Sequence[str],
    *,
    downloadable: bool = True,
    cause: str | None = None,
) -> DatasetNotFoundError:
    """Build the single, complete message a user needs to fix a missing dataset."""
    lines = [f"Dataset {name!r} not found under data root {root}.", "Searched:"]
    lines += [f"  {p}" for p in searched]
    lines.append("Expected layout:" if len(layouts) == 1 else "Expected layout (either):")
    lines += [f"  {layout}" for layout in layouts]
    lines.append("Set the root with --data-root or the DATA_ROOT environment variable (default ./data).")
    if downloadable:
        hint = dataset_hint(name, root)
        if hint:
            lines.append(f"Get it: {hint}")
        lines.append(f"Or let torchvision fetch it: --download where a CLI offers it, "
                     f"load_dataset({name!r}, download=True) in Python.")
    if cause:
        lines.append(f"Cause: {cause}")
    return DatasetNotFoundError("\n".join(lines))
