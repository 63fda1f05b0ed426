"""Small generic pieces every method needs: seeding, device, atomic files, resumable runs, progress."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``deterministic`` also asks cuDNN for repeatable kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds the legacy global RNG that libraries still use)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given ('cpu', 'cuda', 'cuda:1'), else CUDA when present, else CPU."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {preferred!r} requested but CUDA is not available; use --device cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves a half-written checkpoint."""
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); delete it to start that step again") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with a clear error for truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or was written by another program ({exc}); delete it to retrain"
        ) from exc


def check_finite(loss: torch.Tensor, where: str = "training") -> torch.Tensor:
    """Raise a clear error instead of silently training on NaN. Costs one device sync: call it once per
    logging interval, not on every step, when speed matters."""
    if not math.isfinite(float(loss.detach())):
        raise NonFiniteLossError(
            f"{where}: the loss became {float(loss.detach())}; lower the learning rate or check the inputs"
        )
    return loss


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             disable: bool | None = None) -> Iterator[T]:
    """A tqdm bar; silent when ICNN_PROGRESS=0 (tests, CI logs)."""
    if disable is None:
        disable = os.environ.get("ICNN_PROGRESS", "1") == "0"
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True))


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    """What a result depends on besides its config: versions, device and git commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "git_commit": commit,
            "device": str(device) if device is not None else None}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class RunDir:
    """A plain run directory: config.json, metrics.json, model.pt, checkpoint.pt, environment.json, log.txt."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(config, self.config_path)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.json); train into it first")
        return read_json(self.config_path)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(metrics, self.metrics_path)

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_path)

    def write_environment(self, device: torch.device | None = None) -> None:
        atomic_write_json(environment_info(device), self.path / "environment.json")

    def logger(self, name: str = "run") -> logging.Logger:
        """A logger that appends to log.txt in the run directory (and nothing else)."""
        logger = logging.getLogger(f"icnn.{name}.{self.path.resolve()}")
        if not logger.handlers:
            handler = logging.FileHandler(self.path / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        return logger


class Stopwatch:
    """Accumulates wall-clock seconds of the device work it wraps (synchronising CUDA at both ends)."""

    def __init__(self, device: torch.device | None = None, elapsed: float = 0.0):
        self.device = device
        self.elapsed = elapsed
        self._start: float | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        assert self._start is not None
        self.elapsed += time.perf_counter() - self._start
        self._start = None
