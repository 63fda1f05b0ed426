"""Shared command-line pieces: the same flags, the same checks and the same one-line errors in every CLI.

    parser = argparse.ArgumentParser(prog="python -m mymethod")
    add_common_arguments(parser, weights=True, out=True, overrides=True, val_source=True)
    add_budget_arguments(parser)

    def run(argv):
        args = parse_args(parser, argv)              # seeds, sets threads, validates budget/device/out
        device = pick_device(args.device)
        weights = require_weights(args)              # one policy for a missing --weights
        config = apply_overrides(MyConfig(), args.set)   # --set key=value, type-checked
        val_source = resolve_val_source(args.val_source, pretrained=weights is not None)
        budget = budget_from_args(args)

    def main(argv=None) -> int:
        return main_guard(run, argv, prog="python -m mymethod")

Every check raises ``CLIError`` (a ``ValueError``) whose message names the flag; ``main_guard`` prints
known errors and Ctrl-C as one line (``ICNN_TRACEBACK=1`` shows the traceback) and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union

import torch

from .method import Budget
from .run import pick_device, rebuild_hint, run_lock, seed_everything

T = TypeVar("T")

DEFAULT_SEED = 0
VAL_SOURCE_CHOICES = ("auto", "train", "test-half")
EXIT_ERROR = 2  # a known, explained error (bad input, missing data)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class CLIError(ValueError):
    """A bad command-line value; the message names the flag and is printed as one line."""


class MissingWeightsError(CLIError, FileNotFoundError):
    """A ``--weights`` file that does not exist; the message says where it comes from and how to fetch it."""


class MissingInputsError(FileNotFoundError):
    """Several inputs (data, weights) are missing: one message lists every one with its fetch command."""


# --- the shared flags ---------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, device: bool = True, threads: bool = True,
                         seed: bool = True, weights: bool = False, out: bool = False, overrides: bool = False,
                         val_source: bool = False, precision: bool = False, out_help: str | None = None,
                         data: bool = False) -> None:
    """Add the flags every entry point spells the same way (each switchable off where it means nothing).

    ``data`` adds ``--data-root`` and ``--download`` (fetch a missing torchvision dataset; needs internet)."""
    if device:
        parser.add_argument("--device", default=None,
                            help="cpu, cuda or cuda:N (default: CUDA when available, else CPU)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    if seed:
        parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    if weights:
        parser.add_argument("--weights", default=None,
                            help="pretrained backbone weights (.th/.pt); required unless --from-scratch")
        parser.add_argument("--from-scratch", action="store_true",
                            help="start from random weights instead of --weights")
    if out:
        parser.add_argument("--out", required=out_help is None, default=None,
                            help=out_help or "run directory (an interrupted run resumes there)")
        parser.add_argument("--wait", action="store_true",
                            help="when another process is using --out, wait for it to finish instead of "
                                 "exiting with an error naming its pid")
    if overrides:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override one setting, KEY=VALUE (a dotted key reaches into a nested section, "
                                 "where the settings have one); repeatable; the value is checked against the key's "
                                 "type")
    if val_source:
        parser.add_argument("--val-source", choices=VAL_SOURCE_CHOICES, default="auto",
                            help="validation split: train (hold-out of the training set), test-half (half of "
                                 "the test set; the other half is reported), auto (test-half from --weights, "
                                 "else train)")
    if data:
        parser.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT, else ./data)")
        parser.add_argument("--download", action="store_true",
                            help="fetch a missing dataset from its official source into the data root (needs "
                                 "internet; cifar10, cifar100, mnist, svhn, stl10)")
    if precision:
        try:
            from .precision import add_precision_argument  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            add_precision_argument(parser)


def add_run_arguments(parser: argparse.ArgumentParser, *, images: int | None = None,
                      images_help: str = "test images to use (a class-interleaved prefix of the reported split)",
                      out_help: str = "where to write the outputs (default: inside --run)") -> None:
    """The flags of every ``evaluate`` and ``explain`` command, spelled alike in all four packages: ``--run``,
    ``--out``, ``--images``, ``--device``, ``--threads``, ``--precision``, ``--data-root`` (with ``--download``)
    and ``--val-source``."""
    parser.add_argument("--run", required=True, help="a run directory written by this package's train command")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--images", type=int, default=images,
                        help=images_help + (f" (default {images})" if images is not None else ""))
    add_common_arguments(parser, seed=False, precision=True, data=True)
    parser.add_argument("--val-source", choices=VAL_SOURCE_CHOICES, default="auto",
                        help="where the validation split comes from: auto (the split the run recorded), train "
                             "(hold-out of the training set) or test-half (half of the test set; the other half "
                             "is reported)")


def retell(parser: argparse.ArgumentParser, dest: str, **attributes: Any) -> None:
    """Give a shared flag (by ``dest``) the help or default that is true for this command, e.g.
    ``retell(evaluate, "precision", default=None, help="...")``; a flag the parser lacks is a ``KeyError``."""
    for action in parser._actions:
        if action.dest == dest:
            for key, value in attributes.items():
                setattr(action, key, value)
            return
    raise KeyError(f"{parser.prog} has no flag with dest {dest!r}")


def add_budget_arguments(parser: argparse.ArgumentParser, *, epochs: float | None = 1.0) -> None:
    """``--epochs``, ``--max-batches`` and ``--budget-seconds``: the one spelling of each budget flag."""
    parser.add_argument("--epochs", type=float, default=epochs,
                        help="passes over the training set" + (f" (default {epochs:g})" if epochs else ""))
    parser.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch")
    parser.add_argument("--budget-seconds", dest="budget_seconds", type=float, default=None,
                        help="also stop (resumably) after this many seconds of training")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, then at once seed everything (``--seed``), set ``--threads`` and check the budget, device and
    ``--out`` flags that are present: nothing random or slow happens before these checks."""
    args = parser.parse_args(argv)
    seed_everything(getattr(args, "seed", None) if getattr(args, "seed", None) is not None else DEFAULT_SEED)
    threads = getattr(args, "threads", None)
    if threads is not None:
        check_positive(threads, "--threads")
        torch.set_num_threads(threads)
    check_budget(epochs=getattr(args, "epochs", None), max_batches=getattr(args, "max_batches", None),
                 seconds=getattr(args, "budget_seconds", None))
    if getattr(args, "device", None):
        pick_device(args.device)  # a one-line DeviceError now, not a traceback after the data loaded
    if getattr(args, "out", None):
        check_out_dir(args.out)
    if getattr(args, "set", None):
        parse_overrides(args.set)
    return args


# --- checks ----------------------------------------------------------------------------------------------------


def check_positive(value: float | int | None, flag: str) -> None:
    """``value`` must be a finite number above 0 (None passes: the flag was not given)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value != value \
            or value == float("inf"):
        raise CLIError(f"{flag} must be a positive number, got {value!r}")


def check_budget(epochs: float | None = None, max_batches: int | None = None, seconds: float | None = None, *,
                 flags: tuple[str, str, str] = ("--epochs", "--max-batches", "--budget-seconds")) -> None:
    """Non-positive (or non-finite) epochs, batches and seconds are one-line errors naming their flag."""
    for value, flag in zip((epochs, max_batches, seconds), flags):
        check_positive(value, flag)


def validate_budget(budget: Budget) -> Budget:
    """``check_budget`` for a ``Budget`` built in code (the benchmark's presets); returns it unchanged."""
    check_budget(budget.epochs, budget.max_batches, budget.seconds)
    return budget


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The checked ``Budget`` of ``add_budget_arguments``' flags."""
    budget = Budget(epochs=args.epochs, seconds=args.budget_seconds, max_batches=args.max_batches)
    return validate_budget(budget)


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` may be a directory or not exist yet, never a file (nor below one)."""
    path = Path(path).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"is below {candidate}, which is"
                raise CLIError(f"{flag} {path} {where} a file, not a directory; choose another {flag}")
            if not os.access(candidate, os.W_OK):
                raise CLIError(f"{flag} {path}: {candidate} is not writable")
            break
    return path


def out_lock(args: argparse.Namespace, path: str | os.PathLike | None = None, flag: str = "--out"
             ) -> contextlib.AbstractContextManager[Path]:
    """The lock of the run directory ``path`` (default ``args.out``) for a command that writes into it: one
    process per folder; a second exits with an error naming the holder's pid, or waits with ``--wait``."""
    target = Path(path if path is not None else args.out)
    return run_lock(target, wait=bool(getattr(args, "wait", False)), what=f"{flag} {target}")


@contextlib.contextmanager
def command_scope(args: argparse.Namespace, prog: str) -> Iterator[None]:
    """Around one CLI command: the lock of its ``--out`` run directory when the parser has the shared
    ``--out`` (``add_common_arguments(out=True)``, which adds ``--wait``), and the hint an unreadable run
    file gives (``common.run.rebuild_hint``): train the ``--run`` directory again, or re-run the command."""
    command = getattr(args, "command", None)
    run, out = getattr(args, "run", None), getattr(args, "out", None) if hasattr(args, "wait") else None
    if isinstance(run, list | tuple):  # a command comparing several runs (--run given more than once)
        run = run[0] if len(run) == 1 else None
    if run is not None:
        hint = (f"delete it and train the run again ({prog} train --out {run}, with the flags recorded in "
                f"{Path(run) / 'config.json'})")
    elif out is not None:
        hint = f"delete it and run {prog}{f' {command}' if command else ''} --out {out} again"
    else:
        hint = "delete it and run the command that wrote it again"
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(out_lock(args))
        stack.enter_context(rebuild_hint(hint))
        yield


def resolve_val_source(choice: str | None, pretrained: bool) -> str:
    """``--val-source``: "auto" (or None) follows ``common.data.default_val_source(pretrained)``."""
    from .data import VAL_SOURCES, default_val_source

    if choice in (None, "auto"):
        return default_val_source(pretrained)
    if choice not in VAL_SOURCES:
        raise CLIError(f"--val-source must be one of {', '.join(VAL_SOURCE_CHOICES)}, got {choice!r}")
    return choice


def require_weights(args: argparse.Namespace, flag: str = "--weights", *, must_exist: bool = True) -> Path | None:
    """The one policy for ``--weights``: required unless ``--from-scratch``; the two exclude each other; a
    given file must exist (``MissingWeightsError`` with its source and fetch command; ``must_exist=False``
    leaves that check to a later ``gather_inputs``). Returns the path, or None for random weights."""
    weights, scratch = getattr(args, "weights", None), getattr(args, "from_scratch", False)
    if weights is None:
        if scratch:
            return None
        raise CLIError(f"{flag} PATH is required: every method starts from a pretrained backbone (e.g. the "
                       f"published resnet20-12fca82f.th); pass --from-scratch to start from random weights")
    if scratch:
        raise CLIError(f"{flag} and --from-scratch exclude each other; give one")
    path = Path(weights).expanduser()
    if must_exist and not path.is_file():
        from .data.paths import weights_hint

        raise MissingWeightsError(f"{flag} {path} does not exist; {weights_hint(path.name, path.parent)}")
    return path


def gather_inputs(*loaders: Callable[[], Any], what: str = "this command") -> list[Any]:
    """Call every loader (e.g. ``require_weights``, ``load_dataset``) even when an earlier one finds its input
    missing; then either return their results in order or raise one ``MissingInputsError`` that lists every
    missing input with where it comes from and the command that fetches it."""
    from .data import DatasetNotFoundError

    results, problems = [], []
    for load in loaders:
        try:
            results.append(load())
        except (DatasetNotFoundError, MissingWeightsError) as exc:
            results.append(None)
            problems.append(str(exc).strip())
    if len(problems) == 1:
        raise MissingInputsError(problems[0])
    if problems:
        raise MissingInputsError("\n\n".join([f"{what} cannot start; {len(problems)} inputs are missing:",
                                               *problems]))
    return results


# --- --set key=value -------------------------------------------------------------------------------------------


def parse_overrides(pairs: Sequence[str], flag: str = "--set") -> list[tuple[list[str], str]]:
    """``["train.lr=0.1"]`` -> ``[(["train", "lr"], "0.1")]``; a pair without ``=`` or key is an error."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise CLIError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} lr=0.05")
        out.append(([p.strip() for p in parts], value.strip()))
    return out


def apply_overrides(config: T, pairs: Sequence[str], flag: str = "--set", *, frozen_keys: Sequence[str] = ()) -> T:
    """A copy of ``config`` (a dataclass, nested dataclasses, or a dict) with every ``KEY=VALUE`` applied.

    Dataclass fields convert the text to the field's annotated type (int, float, bool, str, None,
    Literal, unions, tuples, lists, dicts); dict entries to the type of the value already there (JSON for
    new keys). An unknown key or a value of the wrong type is a ``CLIError`` naming ``flag`` and the key.
    ``frozen_keys`` (top-level names) are refused."""
    for parts, text in parse_overrides(pairs, flag):
        dotted = ".".join(parts)
        if parts[0] in frozen_keys:
            raise CLIError(f"{flag} {dotted}: {parts[0]} cannot be set from the command line")
        config = _set_path(config, parts, text, f"{flag} {dotted}={text}")
    return config


def _set_path(node: Any, parts: list[str], text: str, where: str) -> Any:
    key, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        names = [f.name for f in dataclasses.fields(node)]
        if key not in names:
            raise CLIError(f"{where}: unknown key {key!r}; known: {', '.join(names)}")
        hints = typing.get_type_hints(type(node))
        current = getattr(node, key)
        value = _set_path(current, rest, text, where) if rest else _convert(text, hints.get(key, Any), current, where)
        try:
            return dataclasses.replace(node, **{key: value})
        except (TypeError, ValueError) as exc:
            raise CLIError(f"{where}: {exc}") from None
    if isinstance(node, dict):
        out = dict(node)
        if rest:
            child = node.get(key, {})
            if not isinstance(child, dict) and not dataclasses.is_dataclass(child):
                raise CLIError(f"{where}: {key!r} is a value, not a section")
            out[key] = _set_path(child, rest, text, where)
        else:
            out[key] = _convert(text, type(node[key]) if key in node and node[key] is not None else Any,
                                node.get(key), where)
        return out
    raise CLIError(f"{where}: {key!r} is below a value, not a section")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(text: str, hint: Any, current: Any, where: str) -> Any:
    """``text`` as a value of type ``hint``, or a CLIError that says which type was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if origin in (Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(text, option, current, where)
            except CLIError:
                continue
        raise CLIError(f"{where}: expected {_type_name(hint)}, got {text!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise CLIError(f"{where}: expected one of {', '.join(map(str, args))}, got {text!r}")
    if hint is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise CLIError(f"{where}: expected none, got {text!r}")
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise CLIError(f"{where}: expected true or false, got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise CLIError(f"{where}: expected an integer, got {text!r}") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise CLIError(f"{where}: expected a number, got {text!r}") from None
        return value
    if hint is str:
        return text
    if origin in (tuple, list) or hint in (tuple, list):
        items = _json_or_csv(text)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise CLIError(f"{where}: expected {len(args)} comma-separated values, got {len(items)}")
            kinds = list(args)
        else:
            kinds = [args[0] if args else Any] * len(items)
        values = [_convert(str(i) if not isinstance(i, str) else i, k, None, where) for i, k in zip(items, kinds)]
        return tuple(values) if (origin or hint) is tuple else values
    if origin is dict or hint is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise CLIError(f"{where}: expected a JSON object, got {text!r}")
        return value
    if dataclasses.is_dataclass(hint):
        raise CLIError(f"{where}: is a section; set one of its keys (e.g. KEY.FIELD=VALUE)")
    raise CLIError(f"{where}: values of type {_type_name(hint)} cannot be set from the command line")


def _json_or_csv(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list):
        return value
    return [item.strip() for item in text.split(",") if item.strip()]


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "text",
            type(None): "none"}.get(hint, getattr(hint, "__name__", str(hint)))


# --- one line per known error ----------------------------------------------------------------------------------


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment, not a bug: printed as one line."""
    from .backbones import WeightsError
    from .data import DatasetNotFoundError
    from .run import CheckpointError, NonFiniteLossError

    return (CLIError, MissingInputsError, DatasetNotFoundError, WeightsError, CheckpointError, NonFiniteLossError,
            ValueError,
            FileNotFoundError, NotADirectoryError, PermissionError, OSError, RuntimeError)


def main_guard(fn: Callable[..., int | None], *args: Any, prog: str,
               extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run ``fn(*args)`` seeded from its first line; known errors become ``prog: error: <message>`` on
    stderr (exit 2), Ctrl-C becomes one line (exit 130). ``ICNN_TRACEBACK=1`` re-raises instead."""
    seed_everything(DEFAULT_SEED)
    show = os.environ.get("ICNN_TRACEBACK", "0") not in ("", "0")
    try:
        code = fn(*args)
    except KeyboardInterrupt:
        if show:
            raise
        print(f"\n{prog}: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*extra_errors, *known_errors()) as exc:
        if show:
            raise
        hint = " (ICNN_TRACEBACK=1 shows where)" if type(exc) in (RuntimeError, OSError) else ""
        print(f"{prog}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_ERROR
    return 0 if code is None else int(code)


def _one_line(exc: BaseException) -> str:
    """The message as raised (a missing-data report keeps its lines); a bare exception gets its type name."""
    return str(exc).strip() or type(exc).__name__
