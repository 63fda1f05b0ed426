"""One leaderboard for the baseline and the four methods under identical budgets.

    python -m benchmark --preset smoke
    from benchmark import get_preset, run_preset; run_preset(get_preset("smoke"), "results")
"""

from .jobs import Context, Job, run_job
from .metrics import COLUMNS, evaluate_result
from .presets import METHODS, MetricSpec, Preset, StartSpec, get_preset, list_presets
from .registry import MethodUnavailableError, default_registry, package_entry
from .runner import plan_jobs, run_preset

__all__ = [
    "COLUMNS",
    "METHODS",
    "Context",
    "Job",
    "MethodUnavailableError",
    "MetricSpec",
    "Preset",
    "StartSpec",
    "default_registry",
    "evaluate_result",
    "get_preset",
    "list_presets",
    "package_entry",
    "plan_jobs",
    "run_job",
    "run_preset",
]
