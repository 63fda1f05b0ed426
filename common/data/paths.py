"""Where data and caches live, and the one error raised when data is missing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATA_ROOT = "./data"
DEFAULT_CACHE_DIR = "~/.cache/interpretable-cnns"


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for (and were not downloaded)."""


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
        lines.append(f"With a network, load_dataset({name!r}, download=True) fetches it into the root.")
    if cause:
        lines.append(f"Cause: {cause}")
    return DatasetNotFoundError("\n".join(lines))
