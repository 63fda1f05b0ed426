"""Image folders (``<split>/<class>/*.png|jpg``) decoded once into a cached uint8 array.

Decoding 50,000 PNGs costs tens of seconds; the cache turns every later load into a memory-mapped read.
The cache key covers the resolved folder path, the class names, the file count and their total bytes, so a
folder whose contents changed gets a fresh cache instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .containers import ImageTensors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1  # bump when the cached array layout changes


@dataclass(frozen=True)
class FolderListing:
    """What an image folder holds, in a fixed order: classes sorted by name, files sorted within a class."""

    folder: Path
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    total_bytes: int

    def cache_key(self) -> str:
        ident = json.dumps([CACHE_VERSION, str(self.folder), self.classes, len(self.files), self.total_bytes])
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


def scan_folder(folder: str | os.PathLike) -> FolderListing:
    """List ``folder/<class>/<image>`` files; hidden entries and other extensions are ignored."""
    folder = Path(folder).resolve()
    class_dirs = sorted(
        (e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name
    )
    classes, files, labels, total = [], [], [], 0
    for class_dir in class_dirs:
        entries = sorted(
            (
                e
                for e in os.scandir(class_dir.path)
                if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
            ),
            key=lambda e: e.name,
        )
        # An empty class folder still takes its index: class index = position among the sorted folder names.
        label = len(classes)
        classes.append(class_dir.name)
        for e in entries:
            files.append(e.path)
            labels.append(label)
            total += e.stat().st_size
    if not files:
        raise ValueError(f"{folder} holds no images: expected {folder}/<class>/*.png|jpg")
    return FolderListing(folder, classes, files, np.asarray(labels, dtype=np.int64), total)


def decode_images(files: list[str], desc: str = "decoding") -> np.ndarray:
    """Decode same-sized images into one uint8 ``N x 3 x H x W`` array (grey and RGBA become RGB)."""
    out: np.ndarray | None = None
    quiet = os.environ.get("ICNN_PROGRESS", "1") == "0"  # the project-wide switch for bars (tests, CI logs)
    for i, path in enumerate(tqdm(files, desc=desc, unit="img", mininterval=1.0, disable=quiet)):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        if out is None:
            out = np.empty((len(files), 3, *rgb.shape[:2]), dtype=np.uint8)
        elif rgb.shape[:2] != out.shape[2:]:
            raise ValueError(
                f"{path} is {rgb.shape[1]}x{rgb.shape[0]} pixels but {files[0]} is "
                f"{out.shape[3]}x{out.shape[2]}; "
                "every image of an image folder must have the same size (resize them first)"
            )
        out[i] = rgb.transpose(2, 0, 1)
    assert out is not None  # scan_folder never returns an empty listing
    return out


def load_image_folder(folder: str | os.PathLike, cache_dir: str | os.PathLike | None) -> tuple[ImageTensors, list[str]]:
    """Load one split folder, from the cache when it is current, else decode it and write the cache.

    ``cache_dir=None`` decodes without caching. An unwritable cache only costs a warning.
    """
    listing = scan_folder(folder)
    if cache_dir is None:
        images = decode_images(listing.files, desc=f"decoding {listing.folder}")
        return _to_split(images, listing.labels), listing.classes

    stem = Path(cache_dir) / _cache_stem(listing)
    paths = {kind: stem.with_name(f"{stem.name}.{kind}") for kind in ("images.npy", "labels.npy", "json")}
    cached = _read_cache(paths, listing)
    if cached is not None:
        return cached, listing.classes

    images = decode_images(listing.files, desc=f"decoding {listing.folder}")
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write(paths["images.npy"], lambda f: np.save(f, images))
        _atomic_write(paths["labels.npy"], lambda f: np.save(f, listing.labels))
        meta = {
            "version": CACHE_VERSION,
            "folder": str(listing.folder),
            "classes": listing.classes,
            "count": len(listing.files),
            "bytes": listing.total_bytes,
            "shape": list(images.shape),
        }
        # The metadata goes last: its presence marks a complete cache entry.
        _atomic_write(paths["json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:
        warnings.warn(f"could not write the image cache in {cache_dir} ({err}); decoding again next time", stacklevel=2)
    return _to_split(images, listing.labels), listing.classes


def _cache_stem(listing: FolderListing) -> str:
    readable = f"{listing.folder.parent.name}-{listing.folder.name}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', readable)}-{listing.cache_key()}"


def _read_cache(paths: dict[str, Path], listing: FolderListing) -> ImageTensors | None:
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        meta = json.loads(paths["json"].read_text())
        images = np.load(paths["images.npy"], mmap_mode="r")
        labels = np.load(paths["labels.npy"])
    except (OSError, ValueError):
        return None  # a damaged entry is rebuilt, never trusted
    n = len(listing.files)
    if meta.get("classes") != listing.classes or images.shape[0] != n or not np.array_equal(labels, listing.labels):
        return None
    # Copy out of the read-only map: tensors must be writable and must outlive a later cache rewrite.
    return _to_split(np.array(images), labels)


def _to_split(images: np.ndarray, labels: np.ndarray) -> ImageTensors:
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
