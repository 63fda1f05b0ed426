"""Expand a preset into independent jobs, run the unfinished ones, write the leaderboard.

Launchers (no home-made scheduler):
    local     jobs one after another in this process, or with ``workers`` > 1 (CPU presets: one per core)
              side by side in spawned single-thread worker processes (``concurrent.futures``);
    submitit  one job array through ``submitit.AutoExecutor`` (Slurm when ``srun`` exists, local
              subprocesses otherwise, or the cluster named in the launcher options); imported only when asked;
    torchrun  detected from WORLD_SIZE/RANK: each rank takes every WORLD_SIZE-th job on ``cuda:LOCAL_RANK``,
              a gloo barrier waits for all ranks, rank 0 writes the leaderboard.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from common.cli import validate_budget
from common.data import DatasetNotFoundError, DatasetSplits
from common.run import (
    CheckpointError,
    ConfigMismatchError,
    pick_device,
    progress,
    progress_mode,
    read_json,
    run_lock,
)

from .jobs import Context, Job, config_mismatch, is_finished, load_data, read_metrics, run_job, usable_cores
from .leaderboard import write_leaderboard
from .presets import COMPRESSING, PER_CORE, Preset
from .registry import Registry, default_registry
from .start import StartError, default_weights_dir, prepare_start, weights_file

LAUNCHERS = ("local", "submitit")
SUBMITIT_CLUSTERS = ("slurm", "local")
# Read by OpenMP / MKL / OpenBLAS when torch loads: set for spawned workers before they import it.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def resolve_workers(preset: Preset, workers: int | None, device: str | None) -> int:
    """Worker processes asked for: ``workers``, else the preset's (``PER_CORE``: one per usable core on a CPU
    device, 1 on another device). 1 means the jobs run one after another in this process."""
    wanted = preset.workers if workers is None else workers
    if wanted == PER_CORE:
        return usable_cores() if pick_device(device).type == "cpu" else 1
    if wanted < 1:
        raise ValueError(f"workers must be a positive number (or {PER_CORE}: one per core), got {wanted}")
    return wanted


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _worker_environment(threads: int) -> Iterator[None]:
    """While workers spawn: the thread variables they read before torch loads, and their loops silent (they
    would interleave; this process reports each finished job)."""
    values = {**{name: str(threads) for name in THREAD_ENV}, "ICNN_PROGRESS": "0"}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_WORKER_DATA: dict[str, DatasetSplits] = {}  # in a worker process: the data, decoded once for all its jobs


def _worker_start(ctx: Context, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the environment already pinned OpenMP; this pins torch's own pool
    _WORKER_DATA["data"] = load_data(ctx)


def _worker_job(job: Job, ctx: Context) -> str:
    return run_job(job, ctx, None, data=_WORKER_DATA.get("data"))


def _run_workers(jobs: Sequence[Job], ctx: Context, workers: int, threads: int) -> dict[str, str]:
    """The jobs on ``workers`` spawned processes of ``threads`` torch threads each (``_run_worker_pairs``)."""
    return _run_worker_pairs([(job, ctx) for job in jobs], workers, threads)


def _run_worker_pairs(pairs: Sequence[tuple[Job, Context]], workers: int, threads: int) -> dict[str, str]:
    """(job, context) pairs on ``workers`` spawned processes of ``threads`` torch threads each (spawned, not
    forked: a forked OpenMP runtime can hang, and each worker must load torch with its thread count already
    set). The contexts may differ (a budget ladder's rungs) but share one dataset, decoded once per worker.
    Methods come from the default registry, which each worker builds for itself."""
    count = min(workers, len(pairs))
    pairs = [(job, replace(ctx, parallel_jobs=count)) for job, ctx in pairs]
    shown = progress_mode() != "off"
    outcome = {}
    with _worker_environment(threads):  # workers spawn on first submit, inside this block
        pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_start, initargs=(pairs[0][1], threads))
        try:
            futures = {pool.submit(_worker_job, job, ctx): (job, ctx) for job, ctx in pairs}
            for future in progress(as_completed(futures), f"runs ({count} workers)", total=len(pairs), leave=True,
                                   disable=not shown):
                job, ctx = futures[future]
                key = f"{ctx.preset.name}/{job.name}" if len({c.preset.name for _, c in pairs}) > 1 else job.name
                try:
                    outcome[key] = future.result()
                except BrokenProcessPool as exc:  # a worker was killed (out of memory): its rows stay pending
                    outcome[key] = f"crashed: {exc}"
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return outcome


def _run_submitit(jobs: Sequence[Job], ctx: Context, options: dict | None) -> dict[str, str]:
    try:
        import submitit
    except ImportError as exc:
        raise SystemExit("--launcher submitit needs the submitit package: pip install 'interpretable-cnns"
                         "[launchers]' (or pip install submitit)") from exc
    options = dict(options or {})
    cluster = options.pop("cluster", None)  # None: Slurm when srun exists, else local processes
    if cluster is not None and cluster not in SUBMITIT_CLUSTERS:
        raise ValueError(f"unknown submitit cluster {cluster!r}; choose one of {', '.join(SUBMITIT_CLUSTERS)}")
    ctx = replace(ctx, results_dir=ctx.results_dir.resolve())  # the jobs may start in another folder
    where = {"cluster": cluster} if cluster else {}
    executor = submitit.AutoExecutor(folder=ctx.results_dir / "submitit" / "%j", **where)
    params = {"timeout_min": 24 * 60, "tasks_per_node": 1, "cpus_per_task": 4, "name": f"bench-{ctx.preset.name}"}
    if ctx.device is None or str(ctx.device).startswith("cuda"):
        params["gpus_per_node"] = 1
    params.update(options)
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
               download: bool = False, wait: bool = False, workers: int | None = None,
               threads: int = 1) -> dict[str, Path]:
    """Run every unfinished job of ``preset`` and (re)write its leaderboard; returns the output paths.

    Runs written by a different config are refused (``ConfigMismatchError``), or removed and re-run with
    ``replace_changed``. ``skip_training`` on a folder with no run of the preset is a ``NoRunsError``.
    One training process at a time per ``out/<preset>`` (``common.run.run_lock``): another one holding it
    is a ``RunLockedError`` naming its pid, or with ``wait`` this call waits for it.
    ``workers`` (default: the preset's) > 1 runs the local launcher's jobs side by side in spawned processes of
    ``threads`` torch threads each, the scratch start trained first here at that count; a ``registry`` passed in
    runs in this process (its loaders need not pickle)."""
    validate_budget(preset.budget())
    registry_names = list(default_registry() if registry is None else registry)
    unknown = [m for m in preset.methods if m not in registry_names]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(registry_names)}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    ctx = Context(preset, Path(out) / preset.name, data_root, weights_dir, device, val_source, download)
    jobs = plan_jobs(preset)
    parallel = resolve_workers(preset, workers, device) if launcher == "local" else 1
    if parallel > 1 and registry is not None:
        if workers is not None:
            raise ValueError("workers > 1 build the default registry in each process; run a registry passed in "
                             "with workers=1")
        parallel = 1
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
                           replace_changed=replace_changed, distributed=distributed, workers=parallel,
                           threads=threads)


def _run_locked(ctx: Context, jobs: list[Job], preset: Preset, registry: Registry | None, *, weights_dir: str | None,
                device: str | None, launcher: str, launcher_options: dict | None, skip_training: bool,
                replace_changed: bool, distributed: tuple[int, int, int] | None, workers: int = 1,
                threads: int = 1) -> dict[str, Path]:
    _check_identities(ctx, jobs, replace_changed=replace_changed, aggregate_only=skip_training)
    pending = [job for job in jobs if not is_finished(ctx, job)]
    if pending and not skip_training:
        data = _load_inputs(ctx, weights_dir)  # fail before any job, not once per job
        workers = 1 if distributed is not None else workers
        if preset.start.kind == "scratch":  # train the shared start once, before jobs race for it
            # at the workers' thread count: the start (and all after it) is then that of a serial run at it
            with _torch_threads(threads) if workers > 1 else contextlib.nullcontext():
                prepare_start(preset, data, ctx.results_dir, weights_dir=weights_dir, device=pick_device(device))
        if distributed is not None:
            rank, world, local_rank = distributed
            if device is None:
                import torch

                ctx = replace(ctx, device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
            _run_local(pending[rank::world], ctx, registry, data)
        elif launcher == "submitit":
            _run_submitit(pending, ctx, launcher_options)
        elif workers > 1:
            _run_workers(pending, ctx, workers, threads)
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
