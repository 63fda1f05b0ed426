"""Small generic pieces every method needs: seeding, device, atomic files, resumable runs, progress."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


class UnsafeFileError(CheckpointError):
    """A run file holds pickled objects other than tensors and plain data: refused unread (it could run code)."""


class MalformedFileError(CheckpointError, KeyError):
    """A run file loads but lacks an entry its reader needs (truncated by hand, an older layout, another file)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DiskFullError(OSError):
    """A write failed because the file system is full; the message names the path and the free space."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


class RunLockedError(RuntimeError):
    """Another live process holds the lock of a run directory (or results folder)."""


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


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    """Write through a uniquely named temporary file beside ``path``, then rename: readers never see half a
    file, concurrent writers never share a temporary, and a failed write removes its temporary and leaves
    the previous file as it was. A full disk is one ``DiskFullError`` naming the path and the free space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and _disk_full(exc):
            raise DiskFullError(errno.ENOSPC, f"no space left to write {path}: {_free_space(path.parent)} free "
                                f"on its file system; free some space (or write elsewhere) and run the command "
                                f"again") from exc
        raise


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it was raised from is ENOSPC / EDQUOT (torch wraps the OSError of a failed
    write in its own RuntimeError, keeping the OSError as the context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} GiB"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves a half-written checkpoint."""
    _atomic_write(Path(path), lambda handle: torch.save(_plain(obj), handle))


def _plain(obj: Any) -> Any:
    """``obj`` with every ``RunFile`` (what ``load_checkpoint`` returns) back to a plain dict, so that saving
    something loaded never writes a class that ``weights_only`` loading would refuse."""
    if isinstance(obj, RunFile) or type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """A text file (UTF-8), written like every other output: unique temporary, rename, no partial file."""
    data = text.encode()
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> None:
    """``fig.savefig`` (matplotlib) through a unique temporary file and a rename; the format follows the
    suffix of ``path``. The figure is closed afterwards, also when the write fails."""
    path = Path(path)
    try:
        _atomic_write(path, lambda handle: fig.savefig(handle, format=path.suffix.lstrip(".") or "png", **savefig))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """JSON through a temporary file and a rename. A non-finite number (NaN, inf) is written as ``null``,
    never as the ``NaN`` that JSON does not have; a value that is undefined should say why under a
    ``<key>_reason`` key beside it."""
    text = json.dumps(_finite_json(obj), indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def _finite_json(value: Any) -> Any:
    """``value`` with tensors, arrays and numpy scalars as plain values and every non-finite float as None."""
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); delete it to start that step again") from exc


# --- reading the files a run wrote ------------------------------------------------------------------------------

_REBUILD: contextvars.ContextVar[str | None] = contextvars.ContextVar("icnn_rebuild_hint", default=None)
_DEFAULT_REBUILD = "delete it and run the command that wrote it again"


@contextlib.contextmanager
def rebuild_hint(text: str) -> Iterator[None]:
    """What an unreadable run file's error tells the user to do, for every ``load_checkpoint`` inside the
    block that does not pass its own ``rebuild`` (a CLI sets it once: ``"rebuild it with python -m drib train
    --out RUN"``)."""
    token = _REBUILD.set(text)
    try:
        yield
    finally:
        _REBUILD.reset(token)


def _hint(rebuild: str | None) -> str:
    return rebuild or _REBUILD.get() or _DEFAULT_REBUILD


class RunFile(dict):
    """A loaded run file: a plain dict whose missing entry is one ``MalformedFileError`` naming the file and
    the command that rebuilds it, instead of a bare ``KeyError`` deep inside a reader."""

    def __init__(self, data: Mapping[Any, Any] = (), path: Path | None = None, rebuild: str | None = None):
        super().__init__(data)
        self.path, self.rebuild = path, rebuild

    def __missing__(self, key: Any) -> Any:
        raise MalformedFileError(f"{self.path} has no {key!r} entry: it is truncated, of an older layout or not "
                                 f"this kind of file; {self.rebuild}")


def require_keys(blob: Any, keys: Sequence[str], path: str | os.PathLike, rebuild: str | None = None) -> Any:
    """``blob`` unchanged when it is a dict holding every key in ``keys``; otherwise one
    ``MalformedFileError`` naming ``path``, what is missing and the command that rebuilds it."""
    hint = _hint(rebuild)
    if not isinstance(blob, Mapping):
        raise MalformedFileError(f"{path} holds a {type(blob).__name__}, not the dict of entries a run file "
                                 f"holds; {hint}")
    missing = [k for k in keys if k not in blob]
    if missing:
        raise MalformedFileError(f"{path} lacks {', '.join(map(repr, missing))}: it is truncated, of an older "
                                 f"layout or not this kind of file; {hint}")
    return blob


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    keys: Sequence[str] = (), rebuild: str | None = None) -> Any:
    """A run file (checkpoint, model, cache, explanations) as written by ``atomic_torch_save``.

    Loaded with ``weights_only=True``: only tensors and plain data (dicts, lists, numbers, strings) are
    accepted, so a crafted file cannot run code; it is refused (``UnsafeFileError``) before anything in it
    is built. Every failure is one ``CheckpointError`` line naming the file and what rebuilds it
    (``rebuild``, else the enclosing ``rebuild_hint``): a truncated or foreign file, a file that is not a
    dict, or one that lacks any of ``keys``. The dict comes back as a ``RunFile``: an entry a reader asks
    for that is missing is the same kind of one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    hint = _hint(rebuild)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights only load failed" in text.lower() or "weights_only" in text:
            raise UnsafeFileError(f"{path} holds pickled objects other than tensors and plain data "
                                  f"({_unsafe_reason(text)}); refused unread, since loading it could run code "
                                  f"(this project never writes such files); {hint}") from None
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or was written by another program "
                              f"({_first_line(text)}); {hint}") from exc
    require_keys(blob, keys, path, hint)
    return RunFile(blob, path, hint)


def _first_line(text: str, width: int = 160) -> str:
    """The first sentence of an error message (torch's go on for lines of advice)."""
    line = text.strip().splitlines()[0].split(". ")[0] if text.strip() else "unreadable"
    return line if len(line) <= width else line[: width - 1] + "…"


def _unsafe_reason(text: str) -> str:
    """The line of torch's weights-only refusal that names what was refused (e.g. "Unsupported global:
    GLOBAL builtins.open")."""
    for line in text.splitlines():
        if "Unsupported" in line or "GLOBAL" in line:
            line = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return _first_line(line.split(" was not an allowed global")[0])
    return "not tensors or plain data"


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


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, *, wait: bool = False, what: str | None = None) -> Iterator[Path]:
    """Hold the lock of run directory (or results folder) ``path`` for the block.

    An OS file lock (``fcntl.flock`` on ``path/.lock``): the kernel releases it when the holder exits or is
    killed, so a crash never leaves a stale lock. Held by another process: one ``RunLockedError`` naming its
    pid, or with ``wait`` a line on stderr and a wait until it is free. The lock file records the holder's
    pid; a folder the lock had to create and that holds nothing else when the block ends (a start that
    failed its checks) is removed again. Without ``fcntl`` (Windows) a warning says that nothing prevents a
    concurrent start, and the block runs unlocked. ``what`` names the folder in messages (e.g. "--out X")."""
    directory = Path(path)
    label = what or str(directory)
    try:
        import fcntl
    except ImportError:
        warnings.warn(f"{label}: this platform has no fcntl file locks, so nothing stops a second process from "
                      "using the same folder at once; start one run per folder", stacklevel=3)
        yield directory / LOCK_NAME
        return
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = _acquire(lock_path, fcntl, wait, label)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        try:
            if created and {e.name for e in os.scandir(directory)} <= {LOCK_NAME}:
                lock_path.unlink(missing_ok=True)  # a waiter then finds another inode and retries (_acquire)
                for folder in created:  # deepest first; stops at the first that holds something else
                    try:
                        folder.rmdir()
                    except OSError:
                        break
        finally:
            os.close(fd)  # releases the lock


def _acquire(lock_path: Path, fcntl: Any, wait: bool, label: str) -> int:
    """An fd of ``lock_path`` holding the exclusive flock; retried when the file was replaced or removed
    while waiting for it (so two processes never hold locks on two different inodes of one path)."""
    told = False
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(lock_path)
                if not wait:
                    raise RunLockedError(f"{label} is in use by another process ({holder} holds {lock_path}); "
                                         "wait for it to finish, or pass --wait to start when it does") from None
                if not told:
                    print(f"{label}: waiting for {holder} to finish (it holds {lock_path})", file=sys.stderr,
                          flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _lock_holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


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

    def lock(self, wait: bool = False, what: str | None = None) -> contextlib.AbstractContextManager[Path]:
        """``run_lock`` of this directory: ``with run.lock(): ...`` (one process per run directory)."""
        return run_lock(self.path, wait=wait, what=what)

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
