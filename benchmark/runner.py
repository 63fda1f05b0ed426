"""Expand a preset into independent jobs, run the unfinished ones, write the leaderboard.

Launchers (no home-made scheduler):
    local     jobs one after another in this process (default);
    submitit  one job array through ``submitit.AutoExecutor`` (Slurm when ``srun`` exists, local
              subprocesses otherwise); imported only when asked;
    torchrun  detected from WORLD_SIZE/RANK: each rank takes every WORLD_SIZE-th job on ``cuda:LOCAL_RANK``,
              a gloo barrier waits for all ranks, rank 0 writes the leaderboard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from common.cli import validate_budget
from common.data import DatasetNotFoundError, DatasetSplits
from common.run import CheckpointError, ConfigMismatchError, pick_device, progress, read_json, run_lock

from .jobs import Context, Job, config_mismatch, is_finished, load_data, read_metrics, run_job
from .leaderboard import write_leaderboard
from .presets import COMPRESSING, Preset
from .registry import Registry, default_registry
from .start import StartError, default_weights_dir, prepare_start, weights_file

LAUNCHERS = ("local", "submitit")


class MissingInputsError(FileNotFoundError):
    """Data and/or weights a preset needs are missing; the message lists all of them and how to fetch them."""


class NoRunsError(ValueError):
    """``--aggregate-only`` on a results folder that holds no run of the preset."""


def plan_jobs(preset: Preset) -> list[Job]:
    """Every (method, target, seed) of the preset, method-major so that the baseline rows come first; a row
    that does not compress runs once per seed, a compressing row once per seed and MAC target."""
    return [Job(method, seed, target) for method in preset.methods
            for target in (preset.targets if method in COMPRESSING and preset.targets else (None,))
            for seed in preset.seeds]


def _run_local(jobs: Sequence[Job], ctx: Context, registry: Registry | None,
               data: DatasetSplits | None = None) -> dict[str, str]:
    data = load_data(ctx) if data is None else data  # decoded once for all jobs of this process
    outcome = {}
    for job in progress(jobs, "runs", total=len(jobs), leave=True):
        outcome[job.name] = run_job(job, ctx, registry, data=data)
    return outcome


def _run_submitit(jobs: Sequence[Job], ctx: Context, options: dict | None) -> dict[str, str]:
    try:
        import submitit
    except ImportError as exc:
        raise SystemExit("--launcher submitit needs the submitit package: pip install 'interpretable-cnns"
                         "[launchers]' (or pip install submitit)") from exc
    executor = submitit.AutoExecutor(folder=ctx.results_dir / "submitit" / "%j")
    params = {"timeout_min": 24 * 60, "tasks_per_node": 1, "cpus_per_task": 4, "name": f"bench-{ctx.preset.name}"}
    if ctx.device is None or str(ctx.device).startswith("cuda"):
        params["gpus_per_node"] = 1
    params.update(options or {})
    executor.update_parameters(**params)
    submitted = executor.map_array(run_job, list(jobs), [ctx] * len(jobs))
    outcome = {}
    for job, handle in progress(zip(jobs, submitted), "runs (submitit)", total=len(jobs), leave=True):
        try:
            outcome[job.name] = handle.result()
        except Exception as exc:  # the job itself died (killed, out of memory): its row shows pending/failed
            outcome[job.name] = f"crashed: {exc}"
    return outcome


def _torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) under torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def job_states(ctx: Context, jobs: Sequence[Job]) -> dict[str, list[str]]:
    """Job names by state: finished, failed (error.json, or a corrupt metrics.json), pending."""
    states: dict[str, list[str]] = {"finished": [], "failed": [], "pending": []}
    for job in jobs:
        try:
            finished = read_metrics(ctx, job) is not None
        except CheckpointError:
            states["failed"].append(job.name)
            continue
        if finished:
            states["finished"].append(job.name)
        elif (ctx.run_dir(job) / "error.json").is_file():
            states["failed"].append(job.name)
        else:
            states["pending"].append(job.name)
    return states


def failure_summary(ctx: Context, jobs: Sequence[Job]) -> list[str]:
    """One line per failed job: its name and error (from error.json), or why its metrics are unreadable."""
    lines, failed = [], set(job_states(ctx, jobs)["failed"])
    for job in jobs:
        if job.name not in failed:
            continue
        try:
            read_metrics(ctx, job)
            error = read_json(ctx.run_dir(job) / "error.json").get("error", "failed")
        except CheckpointError as exc:
            error = str(exc)
        lines.append(f"{job.name}: {error}")
    return lines


def _check_identities(ctx: Context, jobs: Sequence[Job], *, replace_changed: bool, aggregate_only: bool) -> None:
    """No run directory written by another config is reused: refuse (naming what differs), or remove it."""
    changed = {job: diff for job in jobs if (diff := config_mismatch(ctx, job))}
    if not changed:
        return
    if replace_changed and not aggregate_only:
        for job in changed:
            shutil.rmtree(ctx.run_dir(job))
        return
    shown = "; ".join(f"{job.name}: {', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}"
                      for job, diff in list(changed.items())[:3])
    more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
    if aggregate_only:
        fix = ("--aggregate-only reads runs as they are: pass the flags they were run with, or point --out at "
               "the results of this config")
    else:
        fix = (f"to keep them, pass a new --out (e.g. --out {ctx.results_dir.parent}-2); to re-run them here, "
               "deleting the old runs, pass --replace-changed")
    raise ConfigMismatchError(f"{len(changed)} run(s) in {ctx.results_dir / 'runs'} were made with a different "
                              f"config: {shown}{more}. {fix}")


def _load_inputs(ctx: Context, weights_dir: str | None) -> DatasetSplits:
    """The data, after checking data and weights together: one message lists everything missing."""
    problems, data = [], None
    try:
        data = load_data(ctx)
    except DatasetNotFoundError as exc:
        problems.append(str(exc))
    if ctx.preset.start.kind == "weights":
        try:
            weights_file(ctx.preset, default_weights_dir(weights_dir))
        except StartError as exc:
            text = str(exc)
            problems.append(text[:1].upper() + text[1:])
    if problems:
        head = f"preset {ctx.preset.name!r} cannot start; {len(problems)} input(s) missing:"
        raise MissingInputsError("\n\n".join([head, *problems]))
    assert data is not None
    return data


def run_preset(preset: Preset, out: str | os.PathLike = "results", *, data_root: str | None = None,
               weights_dir: str | None = None, device: str | None = None, registry: Registry | None = None,
               launcher: str = "local", launcher_options: dict | None = None,
               skip_training: bool = False, replace_changed: bool = False, val_source: str | None = None,
               download: bool = False, wait: bool = False) -> dict[str, Path]:
    """Run every unfinished job of ``preset`` and (re)write its leaderboard; returns the output paths.

    Runs written by a different config are refused (``ConfigMismatchError``), or removed and re-run with
    ``replace_changed``. ``skip_training`` on a folder with no run of the preset is a ``NoRunsError``.
    One training process at a time per ``out/<preset>`` (``common.run.run_lock``): another one holding it
    is a ``RunLockedError`` naming its pid, or with ``wait`` this call waits for it."""
    validate_budget(preset.budget())
    registry_names = list(default_registry() if registry is None else registry)
    unknown = [m for m in preset.methods if m not in registry_names]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(registry_names)}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    ctx = Context(preset, Path(out) / preset.name, data_root, weights_dir, device, val_source, download)
    jobs = plan_jobs(preset)
    if skip_training:
        states = job_states(ctx, jobs)
        if not states["finished"] and not states["failed"]:
            raise NoRunsError(f"--aggregate-only: no run of preset {preset.name!r} under {ctx.results_dir / 'runs'}"
                              f"; check --out (now {out}) and --preset, or run without --aggregate-only first")
    distributed = _torchrun_rank()
    # torchrun's ranks share the folder by design (each takes its own jobs, rank 0 writes the leaderboard);
    # --aggregate-only trains nothing and writes the leaderboard atomically, so it may watch a running preset.
    lock = run_lock(ctx.results_dir, wait=wait, what=f"--out {out} (preset {preset.name})") \
        if distributed is None and not skip_training else contextlib.nullcontext()
    with lock:
        return _run_locked(ctx, jobs, preset, registry, weights_dir=weights_dir, device=device, launcher=launcher,
                           launcher_options=launcher_options, skip_training=skip_training,
                           replace_changed=replace_changed, distributed=distributed)


def _run_locked(ctx: Context, jobs: list[Job], preset: Preset, registry: Registry | None, *, weights_dir: str | None,
                device: str | None, launcher: str, launcher_options: dict | None, skip_training: bool,
                replace_changed: bool, distributed: tuple[int, int, int] | None) -> dict[str, Path]:
    _check_identities(ctx, jobs, replace_changed=replace_changed, aggregate_only=skip_training)
    pending = [job for job in jobs if not is_finished(ctx, job)]
    if pending and not skip_training:
        data = _load_inputs(ctx, weights_dir)  # fail before any job, not once per job
        if preset.start.kind == "scratch":  # train the shared start once, before jobs race for it
            prepare_start(preset, data, ctx.results_dir, weights_dir=weights_dir, device=pick_device(device))
        if distributed is not None:
            rank, world, local_rank = distributed
            if device is None:
                import torch

                ctx = replace(ctx, device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
            _run_local(pending[rank::world], ctx, registry, data)
        elif launcher == "submitit":
            _run_submitit(pending, ctx, launcher_options)
        else:
            _run_local(pending, ctx, registry, data)
    if distributed is not None:
        import torch.distributed as dist

        # Ranks finish their shares at different times: wait up to a week, not gloo's default 30 minutes.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        dist.barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return {}
    return write_leaderboard(ctx, jobs, preset.methods)
