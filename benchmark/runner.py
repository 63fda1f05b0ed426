"""Expand a preset into independent jobs, run the unfinished ones, write the leaderboard.

Launchers (no home-made scheduler):
    local     jobs one after another in this process (default);
    submitit  one job array through ``submitit.AutoExecutor`` (Slurm when ``srun`` exists, local
              subprocesses otherwise); imported only when asked;
    torchrun  detected from WORLD_SIZE/RANK: each rank takes every WORLD_SIZE-th job on ``cuda:LOCAL_RANK``,
              a gloo barrier waits for all ranks, rank 0 writes the leaderboard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from common.run import pick_device, progress

from .jobs import Context, Job, is_finished, load_data, run_job
from .leaderboard import write_leaderboard
from .presets import Preset
from .registry import Registry, default_registry
from .start import default_weights_dir, prepare_start, weights_file

LAUNCHERS = ("local", "submitit")


def plan_jobs(preset: Preset) -> list[Job]:
    """Every (method, seed) of the preset, method-major so that the baseline rows come first."""
    return [Job(method, seed) for method in preset.methods for seed in preset.seeds]


def _run_local(jobs: Sequence[Job], ctx: Context, registry: Registry | None) -> dict[str, str]:
    data = load_data(ctx)  # decoded once for all jobs of this process
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


def run_preset(preset: Preset, out: str | os.PathLike = "results", *, data_root: str | None = None,
               weights_dir: str | None = None, device: str | None = None, registry: Registry | None = None,
               launcher: str = "local", launcher_options: dict | None = None,
               skip_training: bool = False) -> dict[str, Path]:
    """Run every unfinished job of ``preset`` and (re)write its leaderboard; returns the output paths."""
    registry_names = list(default_registry() if registry is None else registry)
    unknown = [m for m in preset.methods if m not in registry_names]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(registry_names)}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    ctx = Context(preset, Path(out) / preset.name, data_root, weights_dir, device)
    jobs = plan_jobs(preset)
    pending = [job for job in jobs if not is_finished(ctx, job)]
    distributed = _torchrun_rank()
    if pending and not skip_training and preset.start.kind == "weights":
        weights_file(preset, default_weights_dir(weights_dir))  # fail before any job, not once per job
    if pending and not skip_training:
        if preset.start.kind == "scratch":  # train the shared start once, before jobs race for it
            prepare_start(preset, load_data(ctx), ctx.results_dir, weights_dir=weights_dir,
                          device=pick_device(device))
        if distributed is not None:
            rank, world, local_rank = distributed
            if device is None:
                import torch

                ctx = replace(ctx, device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
            _run_local(pending[rank::world], ctx, registry)
        elif launcher == "submitit":
            _run_submitit(pending, ctx, launcher_options)
        else:
            _run_local(pending, ctx, registry)
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
