"""One job = (preset, method, seed, MAC target of a compressing row): train through the method's
``run_method``, measure, write metrics last.

Run directory ``<results>/<preset>/runs/<method>[-t<target %>]-seed<k>/``:
    config.json, environment.json, log.txt   written at the start of every attempt
    method/                                  the method's own out_dir (its checkpoints: it resumes there)
    explanations.pt                          the method's maps on the figure images
    metrics.json                             written atomically, last: its presence means "finished"
    error.json                               the last failure (removed when a later attempt starts)

A run's identity is its config.json without the device (preset, budget, settings, metrics, data split,
torch version, results format): a directory written under another identity is never reused or resumed
(``config_mismatch``; the runner refuses, or re-runs it with ``replace_changed``). A corrupt metrics.json
is not "finished": the job runs again (and ``--aggregate-only`` shows it as a failed row).

A method that raises becomes a failed job with its error; ``KeyboardInterrupt``/``SystemExit`` (a kill)
propagate, leaving the directory to be resumed on the next run.
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.data import DatasetSplits, default_val_source, load_dataset
from common.method import MethodResult
from common.run import (
    CheckpointError,
    ConfigMismatchError,
    RunDir,
    atomic_torch_save,
    atomic_write_json,
    config_diff,
    pick_device,
    read_json,
    seed_everything,
)

from .metrics import evaluate_result
from .presets import Preset
from .registry import Registry, default_registry
from .start import prepare_start

SPLIT_SEED = 0  # the validation split never moves with the run's seed: the same hold-out for every job
RESULTS_FORMAT = 3  # bump when what a job measures changes incompatibly: older runs are then not reused
NOT_IDENTITY = ("device",)  # config keys that describe a run but do not change what it measures


@dataclass(frozen=True)
class Job:
    method: str
    seed: int
    target: float | None = None  # target_mac_reduction of a compressing row, None for the others

    @property
    def name(self) -> str:
        at = "" if self.target is None else f"-t{round(100 * self.target):02d}"
        return f"{self.method}{at}-seed{self.seed}"


@dataclass(frozen=True)
class Context:
    """What every job of one preset shares; plain data so that it pickles for submitit."""

    preset: Preset
    results_dir: Path  # <out>/<preset>
    data_root: str | None = None
    weights_dir: str | None = None
    device: str | None = None
    val_source: str | None = None  # None / "auto": test-half from published weights, train from scratch
    download: bool = False
    parallel_jobs: int = 1  # jobs of this run side by side (their load at a job's start is expected, not a warning)

    def run_dir(self, job: Job) -> Path:
        return self.results_dir / "runs" / job.name

    @property
    def resolved_val_source(self) -> str:
        """Where validation comes from (evaluation-protocol.md 1): the published weights saw the whole
        training set, so their runs validate on a fixed half of the test set and report the other half."""
        if self.val_source in (None, "auto"):
            return default_val_source(self.preset.start.kind == "weights")
        return self.val_source


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_machine_warning(threads: int, siblings: int = 0) -> str | None:
    """Why this job's timings will be slow, when other processes hold the cores at its start, else None.

    Busy means the 1-minute load, less the ``siblings`` single-thread jobs of this same run, exceeds the cores
    left once this job's ``threads`` are counted: beside another torch process OpenMP threads oversubscribe
    the cores and small-op training slows down several times (the figures stay the same, the seconds do not)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return None
    cores = usable_cores()
    if load - siblings <= cores - threads:
        return None
    ours = f" ({siblings} of it expected from this run's other jobs)" if siblings else ""
    return (f"machine busy at job start: 1-minute load {load:.2f} on {cores} core(s){ours}, this job uses "
            f"{threads} thread(s); its train and latency seconds will be slower than on an idle machine")


def read_metrics(ctx: Context, job: Job) -> dict[str, Any] | None:
    """The job's metrics when it finished, None when not; a corrupt file raises ``CheckpointError``."""
    path = ctx.run_dir(job) / "metrics.json"
    if not path.is_file():
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict) or metrics.get("status") != "finished" or "top1" not in metrics:
        raise CheckpointError(f"{path} is not a finished job's metrics; delete it to run the job again")
    top1 = metrics["top1"]
    if isinstance(top1, bool) or not isinstance(top1, int | float) or not math.isfinite(top1):
        # NaN (or null: how atomic_write_json writes NaN) is a failed job, never a finished "–" row
        raise CheckpointError(f"{path}: top1 is {top1!r}, not a finite accuracy; the job failed (delete the file "
                              "to run the job again)")
    return metrics


def is_finished(ctx: Context, job: Job) -> bool:
    try:
        return read_metrics(ctx, job) is not None
    except CheckpointError:
        return False


def load_data(ctx: Context) -> DatasetSplits:
    return load_dataset(ctx.preset.dataset, ctx.data_root, val_fraction=ctx.preset.val_fraction, seed=SPLIT_SEED,
                        download=ctx.download, val_source=ctx.resolved_val_source)


def job_config(ctx: Context, job: Job) -> dict[str, Any]:
    """Everything the job's result depends on (its identity), plus the requested device."""
    preset = ctx.preset
    return {"preset": preset.name, "method": job.method, "seed": job.seed, "dataset": preset.dataset,
            "backbone": preset.backbone, "start": asdict(preset.start), "budget": asdict(preset.budget()),
            "batch_size": preset.batch_size, "target_mac_reduction": job.target,
            "settings": preset.method_settings(job.method, job.target),
            "metrics": asdict(preset.metrics), "val_fraction": preset.val_fraction, "split_seed": SPLIT_SEED,
            "val_source": ctx.resolved_val_source,
            "versions": {"results_format": RESULTS_FORMAT, "torch": torch.__version__},
            "device": ctx.device}


def identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


def config_mismatch(ctx: Context, job: Job) -> list[str]:
    """What differs between the config that wrote the job's directory and this one ([] when the directory
    is new or was written by the same config)."""
    path = ctx.run_dir(job) / "config.json"
    if not path.is_file():
        return []
    try:
        stored = read_json(path)
    except CheckpointError:
        return ["config.json is unreadable"]
    if not isinstance(stored, dict):
        return ["config.json is not a config"]
    return config_diff(identity(stored), identity(job_config(ctx, job)))



def run_job(job: Job, ctx: Context, registry: Registry | None = None,
            data: DatasetSplits | None = None) -> str:
    """Run one job unless finished. Returns "skipped", "finished" or "failed".

    A directory written by a different config raises ``ConfigMismatchError`` (its checkpoints are never
    resumed into this one); a corrupt metrics.json is set aside as metrics.json.corrupt and the job runs."""
    differences = config_mismatch(ctx, job)
    if differences:
        raise ConfigMismatchError(f"{ctx.run_dir(job)} was run with a different config ({'; '.join(differences)})"
                                  "; pass a new --out to keep it, or --replace-changed to re-run it")
    run = RunDir(ctx.run_dir(job))
    if is_finished(ctx, job):
        return "skipped"
    if run.metrics_path.is_file():
        run.metrics_path.replace(run.path / "metrics.json.corrupt")
    (run.path / "error.json").unlink(missing_ok=True)
    registry = default_registry() if registry is None else registry
    device = pick_device(ctx.device)
    seed_everything(job.seed)
    run.write_config(job_config(ctx, job))
    run.write_environment(device)
    log = run.logger("benchmark")
    threads = torch.get_num_threads()
    log.info("job %s of preset %s on %s (pid %d, %d torch thread(s))", job.name, ctx.preset.name, device,
             os.getpid(), threads)
    busy = busy_machine_warning(threads, siblings=(ctx.parallel_jobs - 1) * threads)
    if busy:
        log.warning(busy)
    began = time.perf_counter()
    try:
        if job.method not in registry:
            raise KeyError(f"method {job.method!r} is not in the registry ({', '.join(registry)})")
        data = load_data(ctx) if data is None else data
        start = prepare_start(ctx.preset, data, ctx.results_dir, weights_dir=ctx.weights_dir, device=device)
        entry = registry[job.method]()
        seed_everything(job.seed)
        result = entry(copy.deepcopy(start).to(device), data, ctx.preset.budget(), run.path / "method",
                       device=device, seed=job.seed, settings=ctx.preset.method_settings(job.method, job.target))
        if not isinstance(result, MethodResult):
            raise TypeError(f"run_method returned {type(result).__name__}, expected common.method.MethodResult")
        log.info("trained in %.1f s of device time; measuring", result.train_seconds)
        evaluation = evaluate_result(result, start.to(device), data, ctx.preset.metrics, device=device,
                                     batch_size=max(ctx.preset.batch_size, 256))
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".strip()
        log.error("failed: %s\n%s", message, traceback.format_exc())
        atomic_write_json({"status": "failed", "method": job.method, "seed": job.seed,
                           "target_mac_reduction": job.target, "error": message,
                           "traceback": traceback.format_exc()}, run.path / "error.json")
        return "failed"
    atomic_torch_save(evaluation.explanations, run.path / "explanations.pt")
    metrics = {"status": "finished", "method": job.method, "seed": job.seed, "target_mac_reduction": job.target,
               **evaluation.metrics,
               "wall_seconds": time.perf_counter() - began, "device": str(device),
               "torch_threads": torch.get_num_threads()}
    run.write_metrics(metrics)
    log.info("finished: top-1 %.2f%%, mean MACs %.1fM", metrics["top1"], metrics["mean_macs"] / 1e6)
    return "finished"
