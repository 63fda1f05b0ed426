"""Method registry: name -> a loader that imports the method's ``run_method`` only when its job runs.

A package that is missing, fails to import or exposes no ``run_method`` raises ``MethodUnavailableError``
inside its job, which the job records as a failed row; the other methods go on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from common.method import MethodResult

RunMethod = Callable[..., MethodResult]
MethodLoader = Callable[[], RunMethod]
Registry = dict[str, MethodLoader]


class MethodUnavailableError(ImportError):
    """A method package cannot be imported or does not expose ``run_method``."""


def package_entry(package: str) -> MethodLoader:
    """A loader for ``<package>.run_method``, imported on first use."""

    def load() -> RunMethod:
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise MethodUnavailableError(f"cannot import method package {package!r}: {exc}") from exc
        entry = getattr(module, "run_method", None)
        if not callable(entry):
            raise MethodUnavailableError(f"package {package!r} does not expose run_method(...) in __init__.py")
        return entry

    return load


def _baseline() -> RunMethod:
    from .baseline import run_method

    return run_method


def _reference(name: str) -> MethodLoader:
    def load() -> RunMethod:
        from . import reference_pruning

        return {"l1-prune": reference_pruning.l1_run_method, "random-prune": reference_pruning.random_run_method}[name]

    return load


def default_registry() -> Registry:
    """The leaderboard rows, baseline first (control rows run their method's package)."""
    from .presets import METHODS, REFERENCES, package_of

    return {"baseline": _baseline, **{name: _reference(name) if name in REFERENCES else package_entry(package_of(name))
                                      for name in METHODS if name != "baseline"}}
