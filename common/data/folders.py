"""Image folders (``<split>/<class>/*.png|jpg``) decoded once into a cached uint8 array.

Decoding 50,000 PNGs costs tens of seconds; the cache turns every later load into a memory-mapped read.
The cache key covers the resolved folder path, the class names and a SHA-256 of every file's class, name,
size and bytes, so a folder whose contents changed in any way (a file swapped between two classes with the
same names, counts and sizes included) gets a fresh cache instead of a stale one. Hashing reads every file:
CIFAR-10's 60,000 PNGs (136 MB) hash in about 0.4 s from the page cache and 4 s from a cold disk, against
tens of seconds for a decode.

Class names are the folder names as text; bytes that are not UTF-8 show as U+FFFD (replacement
characters), so that every name can be printed, written to JSON and drawn by matplotlib.

A file that does not decode (corrupt or truncated, or text named ``.jpg``), or one whose size differs from
the size most files share, never kills the decode: it is skipped with one warning that names every skipped
file and counts them, or, with ``strict=True`` (or
``ICNN_STRICT_IMAGES=1``), the load fails with one ``BadImageError`` naming every bad file.

torchvision's ``ImageFolder(is_valid_file=...)`` was considered: its check sees only a path, so telling a
truncated PNG from a good one would mean decoding every file twice, and it decodes per item on access
where this module decodes once into an array.
"""

from __future__ import annotations

import functools
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

from ..run import _file_mode, progress
from .containers import ImageTensors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 3  # bump when the cached array layout changes (2: skipped files recorded; 3: content digest)
STRICT_ENV = "ICNN_STRICT_IMAGES"  # "1": an unreadable image is an error instead of a skipped file
_WARN_NAMES = 20  # a warning names at most this many files (the strict error names all of them)


class BadImageError(ValueError):
    """Image files that cannot be decoded (strict mode); the message names every one of them."""


def strict_default() -> bool:
    """The strict mode when a caller does not choose: ``$ICNN_STRICT_IMAGES`` set to 1/true/yes."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FolderListing:
    """What an image folder holds, in a fixed order: classes sorted by name, files sorted within a class."""

    folder: Path
    classes: list[str]
    files: list[str]
    labels: np.ndarray
    total_bytes: int

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 over every file's path below the folder, size and bytes, in listing order: any change of
        content, name or class (a file moved or swapped between classes) changes it."""
        digest = hashlib.sha256()
        prefix = len(os.path.join(str(self.folder), ""))  # files are listed as folder/<class>/<name>
        for path in progress(self.files, f"hashing {self.folder}", total=len(self.files)):
            with open(path, "rb") as handle:
                data = handle.read()
            name = os.fsencode(path[prefix:])
            digest.update(len(name).to_bytes(4, "little") + name + len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()

    def cache_key(self) -> str:
        ident = json.dumps([CACHE_VERSION, str(self.folder), self.classes, len(self.files), self.total_bytes,
                            self.digest])
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
        classes.append(display_name(class_dir.name))
        for e in entries:
            files.append(e.path)
            labels.append(label)
            total += e.stat().st_size
    if not files:
        raise ValueError(f"{folder} holds no images: expected {folder}/<class>/*.png|jpg")
    if len(set(classes)) < len(classes):
        raise ValueError(f"{folder}: class folders {sorted({c for c in classes if classes.count(c) > 1})} differ "
                         "only in bytes that are not UTF-8; rename them")
    return FolderListing(folder, classes, files, np.asarray(labels, dtype=np.int64), total)


def display_name(name: str) -> str:
    """``name`` (a file system name, undecodable bytes held as surrogates) as printable text: bytes that are
    not UTF-8 become U+FFFD."""
    return os.fsencode(name).decode("utf-8", errors="replace")


def check_training_classes(classes: list[str], labels: np.ndarray, folder: str | os.PathLike) -> None:
    """A training split needs two classes or more, each with at least one image: one ``ValueError`` naming
    the problem otherwise (a classifier of one class, or with a class it never sees, trains to nonsense)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    if len(classes) < 2:
        raise ValueError(f"{folder} holds {len(classes)} class folder ({', '.join(classes)}); a classifier needs "
                         f"at least 2: expected {folder}/<class>/*.png|jpg with one folder per class")
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise ValueError(f"{folder}: class folder(s) {', '.join(empty)} hold no readable training image; add images "
                         "or remove the folder(s)")


def _sizes(files: list[str]) -> list[tuple[int, int] | None]:
    """Every file's (width, height) from its header (cheap: nothing is decoded); None when unreadable."""
    sizes: list[tuple[int, int] | None] = []
    for path in files:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except Exception:  # reported by the decode pass, with its reason
            sizes.append(None)
    return sizes


def _common_size(files: list[str], sizes: list[tuple[int, int] | None]) -> tuple[int, int] | None:
    """The size most files share; a ``ValueError`` when no size holds more than half of the readable files
    (a folder of mixed sizes, not a few odd files)."""
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        if size is not None:
            counts[size] = counts.get(size, 0) + 1
    if not counts:
        return None
    size, count = max(counts.items(), key=lambda item: item[1])
    if len(counts) > 1 and 2 * count <= sum(counts.values()):
        examples = {s: files[sizes.index(s)] for s in counts}
        shown = "; ".join(f"{n} at {w}x{h} (e.g. {examples[(w, h)]})" for (w, h), n in
                          sorted(counts.items(), key=lambda item: -item[1])[:4])
        raise ValueError(f"the images are of {len(counts)} sizes and none is the majority ({shown}); every "
                         "image of an image folder must have the same size (resize them first)")
    return size


def decode_images(files: list[str], desc: str = "decoding", *, strict: bool | None = None,
                  skipped: list[int] | None = None) -> np.ndarray:
    """Decode same-sized images into one uint8 ``N x 3 x H x W`` array (grey and RGBA become RGB).

    A file that does not decode, or whose size differs from the one most files share, is left out of the
    array; its index goes into ``skipped`` (when given) and one warning names the skipped files. ``strict``
    (default: ``$ICNN_STRICT_IMAGES``) raises one ``BadImageError`` naming every bad file instead, after
    trying them all. A folder with no majority size is a ``ValueError`` (resize the images first)."""
    strict = strict_default() if strict is None else strict
    sizes = _sizes(files)
    size = _common_size(files, sizes)
    bad: list[tuple[int, str]] = []
    out = np.empty((len(files), 3, size[1], size[0]), dtype=np.uint8) if size is not None else None
    kept = 0
    for i, path in enumerate(progress(files, desc, total=len(files))):
        if sizes[i] is not None and sizes[i] != size:
            w, h = sizes[i]  # type: ignore[misc]
            bad.append((i, f"{path} (is {w}x{h} pixels; the folder's images are {size[0]}x{size[1]})"))
            continue
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            bad.append((i, f"{path} ({type(err).__name__}: {err})"))
            continue
        assert out is not None and rgb.shape[:2] == out.shape[2:]
        out[kept] = rgb.transpose(2, 0, 1)
        kept += 1
    if bad:
        _report_bad(bad, len(files), strict)
        if skipped is not None:
            skipped.extend(i for i, _ in bad)
    if out is None or kept == 0:
        raise BadImageError(f"none of the {len(files)} images decodes ({bad[0][1]}, ...)")
    return out[:kept]


def _report_bad(bad: list[tuple[int, str]], total: int, strict: bool) -> None:
    if strict:
        raise BadImageError(f"{len(bad)} of {total} image files cannot be decoded or are not the folder's size: "
                            + "; ".join(reason for _, reason in bad)
                            + f" (unset {STRICT_ENV} to skip them with a warning)")
    names = "; ".join(reason for _, reason in bad[:_WARN_NAMES])
    more = f"; and {len(bad) - _WARN_NAMES} more" if len(bad) > _WARN_NAMES else ""
    warnings.warn(f"skipped {len(bad)} of {total} image files that cannot be decoded or are not the folder's "
                  f"size: {names}{more} "
                  f"(set {STRICT_ENV}=1 to make this an error)", stacklevel=3)


def load_image_folder(folder: str | os.PathLike, cache_dir: str | os.PathLike | None, *,
                      strict: bool | None = None) -> tuple[ImageTensors, list[str]]:
    """Load one split folder, from the cache when it is current, else decode it and write the cache.

    ``cache_dir`` is the cache folder itself; ``None`` here means "decode without caching" (``load_dataset``
    resolves its own ``cache_dir=None`` to the default cache, ``$ICNN_CACHE`` or ``~/.cache/...``, before
    calling this). An unwritable cache only costs a warning. Unreadable files are skipped with a warning,
    or with ``strict`` (default ``$ICNN_STRICT_IMAGES``) are one ``BadImageError`` (see ``decode_images``);
    a cached folder repeats the warning (or the error) for the files it skipped.
    """
    listing = scan_folder(folder)
    desc = f"decoding {listing.folder}"
    if cache_dir is None:
        skipped: list[int] = []
        images = decode_images(listing.files, desc=desc, strict=strict, skipped=skipped)
        return _to_split(images, _kept(listing.labels, skipped)), listing.classes

    stem = Path(cache_dir) / _cache_stem(listing)
    paths = {kind: stem.with_name(f"{stem.name}.{kind}") for kind in ("images.npy", "labels.npy", "json")}
    cached = _read_cache(paths, listing)
    if cached is not None:
        split, skipped = cached
        if skipped:
            _report_bad([(i, f"{listing.files[i]} (skipped when the cache was built)") for i in skipped],
                        len(listing.files), strict_default() if strict is None else strict)
        return split, listing.classes

    skipped = []
    images = decode_images(listing.files, desc=desc, strict=strict, skipped=skipped)
    labels = _kept(listing.labels, skipped)
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write(paths["images.npy"], lambda f: np.save(f, images))
        _atomic_write(paths["labels.npy"], lambda f: np.save(f, labels))
        meta = {
            "version": CACHE_VERSION,
            "folder": str(listing.folder),
            "classes": listing.classes,
            "count": len(listing.files),
            "bytes": listing.total_bytes,
            "digest": listing.digest,
            "shape": list(images.shape),
            "skipped": [int(i) for i in skipped],
        }
        # The metadata goes last: its presence marks a complete cache entry.
        _atomic_write(paths["json"], lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:
        warnings.warn(f"could not write the image cache in {cache_dir} ({err}); decoding again next time", stacklevel=2)
    return _to_split(images, labels), listing.classes


def _kept(labels: np.ndarray, skipped: list[int]) -> np.ndarray:
    return np.delete(labels, skipped) if skipped else labels


def _cache_stem(listing: FolderListing) -> str:
    readable = f"{listing.folder.parent.name}-{listing.folder.name}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', readable)}-{listing.cache_key()}"


def _read_cache(paths: dict[str, Path], listing: FolderListing) -> tuple[ImageTensors, list[int]] | None:
    """The cached split and the indices of the files skipped when it was built; None when not current."""
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        meta = json.loads(paths["json"].read_text())
        images = np.load(paths["images.npy"], mmap_mode="r")
        labels = np.load(paths["labels.npy"])
        skipped = [int(i) for i in meta.get("skipped", [])]
    except (OSError, ValueError, TypeError):
        return None  # a damaged entry is rebuilt, never trusted
    n = len(listing.files)
    if (meta.get("version") != CACHE_VERSION or meta.get("classes") != listing.classes or meta.get("count") != n
            or meta.get("digest") != listing.digest or any(not 0 <= i < n for i in skipped)):
        return None
    expected = _kept(listing.labels, skipped)
    if images.shape[0] != len(expected) or not np.array_equal(labels, expected):
        return None
    # Copy out of the read-only map: tensors must be writable and must outlive a later cache rewrite.
    return _to_split(np.array(images), labels), skipped


def _to_split(images: np.ndarray, labels: np.ndarray) -> ImageTensors:
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; like run files: what the umask gives any new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
