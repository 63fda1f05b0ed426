"""Small generic pieces every method needs: seeding, device, atomic files, resumable runs, progress."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


class DeviceError(ValueError):
    """A requested device is malformed or not available on this machine."""


class ConfigMismatchError(ValueError):
    """A run directory holds results or checkpoints written under a different config."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). ``deterministic`` also asks cuDNN for repeatable kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds the legacy global RNG that libraries still use)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def pick_device(preferred: str | None = None, flag: str = "--device") -> torch.device:
    """``preferred`` if given ('cpu', 'cuda', 'cuda:1', 'mps'), else CUDA when present, else CPU.

    A malformed or unavailable device is a one-line ``DeviceError`` naming ``flag``."""
    if not preferred:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(preferred).strip())
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{flag} {preferred!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{flag} {preferred!r}: CUDA is not available on this machine; use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{flag} {preferred!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"{flag} {preferred!r}: MPS is not available on this machine; use {flag} cpu")
    elif device.type != "cpu":
        raise DeviceError(f"{flag} {preferred!r} is not supported; use cpu, cuda or cuda:N")
    return device


def _file_mode() -> int:
    """The mode an ordinary new file gets (0666 minus the umask): mkstemp alone would make it 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
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


PLAIN_PROGRESS_SECONDS = 30.0  # a plain progress line at most this often (ICNN_PROGRESS_INTERVAL overrides)


def progress_mode() -> str:
    """"off", "bar" or "plain". ``ICNN_PROGRESS``: 0 silences every loop (tests), ``plain`` / ``bar`` force a
    style; otherwise a tqdm bar on a terminal and plain lines when stderr is not one (CI, nox logs)."""
    value = os.environ.get("ICNN_PROGRESS", "").strip().lower()
    if value in ("0", "off", "no", "false", "none"):
        return "off"
    if value in ("plain", "bar"):
        return value
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "plain"


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             disable: bool | None = None) -> Iterator[T]:
    """Progress over ``iterable``: a tqdm bar on a terminal, plain lines otherwise, nothing when
    ICNN_PROGRESS=0 (see ``progress_mode``). ``disable`` overrides the environment either way."""
    mode = progress_mode()
    if disable is True:
        mode = "off"
    elif disable is False and mode == "off":
        mode = "bar" if sys.stderr.isatty() else "plain"
    if mode == "off":
        return iter(iterable)
    if mode == "plain":
        return _plain_progress(iterable, desc, total, leave)
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True))


def _plain_progress(iterable: Iterable[T], desc: str, total: int | None, leave: bool) -> Iterator[T]:
    """One line per interval on stderr (no carriage returns, no escape codes), and a last line when the
    loop printed any or ``leave`` is set."""
    try:
        interval = float(os.environ.get("ICNN_PROGRESS_INTERVAL", PLAIN_PROGRESS_SECONDS))
    except ValueError:
        interval = PLAIN_PROGRESS_SECONDS
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    began = last = time.monotonic()
    done, printed = 0, False

    def line(now: float, final: bool = False) -> str:
        elapsed = now - began
        if final:
            return f"{desc}: done, {done} in {elapsed:.0f} s"
        if total:
            left = elapsed / done * (total - done) if done else float("nan")
            eta = f", about {left:.0f} s left" if done and math.isfinite(left) else ""
            return f"{desc}: {done}/{total} ({100 * done / total:.0f}%), {elapsed:.0f} s{eta}"
        return f"{desc}: {done}, {elapsed:.0f} s"

    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval and (total is None or done < total):
            print(line(now), file=sys.stderr, flush=True)
            last, printed = now, True
    if printed or leave:
        print(line(time.monotonic(), final=True), file=sys.stderr, flush=True)


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


_MISSING = "(absent)"


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key whose value differs, as ``"budget.epochs: 1 -> 3"`` (nested dicts compared key by key;
    values compared as JSON would store them, so a tuple equals the list it was read back as)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, prefix=f"{name}.")
        elif _as_json(a) != _as_json(b):
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _as_json(value: Any) -> Any:
    if value is _MISSING:
        return value
    return json.loads(json.dumps(value, default=_json_default))


def _short(value: Any, width: int = 60) -> str:
    text = value if value is _MISSING else json.dumps(value, default=_json_default)
    return text if len(text) <= width else text[: width - 1] + "…"


def check_config(path: str | os.PathLike, config: Mapping[str, Any], *, what: str = "this run directory",
                 fix: str = "pass a new --out to keep the old run, or delete it",
                 ignore: Sequence[str] = ()) -> None:
    """``ConfigMismatchError`` when run directory ``path`` holds a config.json that differs from ``config``
    (top-level keys in ``ignore`` aside); nothing when it holds none. Creates nothing, so a CLI can check
    before it loads data and leave no folder behind when it fails."""
    stored_path = Path(path) / "config.json"
    if not stored_path.is_file():
        return
    stored = read_json(stored_path)
    if not isinstance(stored, Mapping):
        raise ConfigMismatchError(f"{what} ({path}): config.json is not a config; {fix}")
    differences = config_diff({k: v for k, v in stored.items() if k not in ignore},
                              {k: v for k, v in config.items() if k not in ignore})
    if differences:
        raise ConfigMismatchError(f"{what} ({path}) was written by a different config ({'; '.join(differences)}); "
                                  f"{fix}")


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

    def claim(self, config: dict[str, Any], *, what: str = "this run directory",
              fix: str = "pass a new --out to keep the old run, or delete it", ignore: Sequence[str] = ()) -> None:
        """Write ``config`` as this run's identity, or check it against the one already there.

        A directory that holds a config.json from a different config is never resumed or overwritten
        silently: ``ConfigMismatchError`` names every key that differs (its checkpoints belong to the old
        config). The same config (a resumed run) leaves the file as it is. ``ignore``: top-level keys that
        describe a run without changing what it computes (a device, a data root, a resumable time limit);
        they may differ, and the file then records the new values."""
        check_config(self.path, config, what=what, fix=fix, ignore=ignore)
        if not self.config_path.is_file() or (ignore and read_json(self.config_path) != _as_json(config)):
            self.write_config(config)

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
