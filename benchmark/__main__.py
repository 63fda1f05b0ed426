"""python -m benchmark --preset NAME [...]: run a preset's unfinished jobs and write its leaderboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import (
    add_budget_arguments,
    add_common_arguments,
    apply_overrides,
    check_positive,
    main_guard,
    parse_args,
)

from .jobs import Context
from .ladder import LADDERS, run_ladder
from .presets import get_preset, list_presets
from .runner import LAUNCHERS, SUBMITIT_CLUSTERS, failure_summary, plan_jobs, run_preset
from .start import StartError

PROG = "python -m benchmark"
EXIT_JOBS_FAILED = 1


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _csv(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from exc


def _presets_help() -> str:
    """The presets and ladders with their one-line descriptions, for ``--help``."""
    lines = [f"  {name:<20} {get_preset(name).description}" for name in list_presets()]
    lines += [f"  {name:<20} {ladder.description}" for name, ladder in LADDERS.items()]
    return "presets:\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help(),
        description="Run the baseline and the four methods under one budget and write one leaderboard. "
                    "Finished runs are skipped; interrupted ones resume; runs made under another config are "
                    "never reused. Exit status 1 when a job failed (after writing the leaderboard).")
    parser.add_argument("--preset", required=True, choices=[*list_presets(), *LADDERS],
                        help="what to run (presets.py; a ladder runs its base preset at several budgets, ladder.py)")
    parser.add_argument("--data-root", help="dataset root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--download", action="store_true",
                        help="fetch a missing torchvision dataset into the data root (needs internet)")
    parser.add_argument("--weights-dir", help="folder with the pretrained weights (default: $DATA_ROOT/weights)")
    add_common_arguments(parser, seed=False, out=True, overrides=True, val_source=True,
                         out_help="results folder; the preset writes into OUT/PRESET (default: results)")
    add_budget_arguments(parser, epochs=None)
    parser.add_argument("--methods", type=_csv, help="comma-separated subset, e.g. baseline,drib")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--replace-changed", action="store_true",
                        help="re-run (deleting) the runs in OUT/PRESET made under a different config")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: on this machine (see --workers); submitit: one job array (Slurm, or local "
                             "subprocesses)")
    parser.add_argument("--slurm-partition", help="submitit only: Slurm partition")
    parser.add_argument("--submitit-cluster", choices=SUBMITIT_CLUSTERS,
                        help="submitit only: slurm, or local (processes on this machine, every job of the array "
                             "at once); default: slurm when srun exists, else local")
    parser.add_argument("--workers", type=int,
                        help="local launcher: jobs side by side, one single-thread process each (default: one "
                             "per core for CPU presets, else 1; 1: one after another in this process at --threads)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="do not train; rewrite the leaderboard from the finished runs")
    return parser


def _run_ladder(args: argparse.Namespace, out: str) -> int:
    if args.epochs is not None or args.budget_seconds is not None or args.max_batches is not None or args.set:
        raise ValueError(f"--preset {args.preset} is a budget ladder: its budgets are fixed (benchmark/ladder.py); "
                         "drop the budget flags and --set")
    check_positive(args.workers, "--workers")
    workers = 1 if args.workers is None and args.threads is not None else args.workers
    paths = run_ladder(LADDERS[args.preset], out, data_root=args.data_root, weights_dir=args.weights_dir,
                       device=args.device, skip_training=args.aggregate_only, replace_changed=args.replace_changed,
                       val_source=args.val_source, download=args.download, wait=args.wait, workers=workers,
                       threads=args.threads or 1)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run(argv: list[str] | None) -> int:
    args = parse_args(build_parser(), argv)  # seeds, threads, budget/device/--out checks first
    out = args.out or "results"
    if args.preset in LADDERS:
        return _run_ladder(args, out)
    preset = get_preset(args.preset, seconds=args.budget_seconds, epochs=args.epochs,
                        max_batches=args.max_batches, methods=args.methods, seeds=args.seeds)
    preset = apply_overrides(preset, args.set, frozen_keys=("name", "settings", "start"))
    if not preset.seeds or not preset.methods:
        raise ValueError("--seeds and --methods need at least one entry each")
    check_positive(args.workers, "--workers")
    options = {"slurm_partition": args.slurm_partition} if args.slurm_partition else {}
    if args.submitit_cluster:
        options["cluster"] = args.submitit_cluster
    # --threads alone keeps the jobs in this process at that count; beside --workers it is each worker's count
    workers = 1 if args.workers is None and args.threads is not None else args.workers
    paths = run_preset(preset, out, data_root=args.data_root, weights_dir=args.weights_dir,
                       device=args.device, launcher=args.launcher, launcher_options=options,
                       skip_training=args.aggregate_only, replace_changed=args.replace_changed,
                       val_source=args.val_source, download=args.download, wait=args.wait, workers=workers,
                       threads=args.threads or 1)
    if not paths:  # a torchrun rank other than 0
        return 0
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    ctx = Context(preset, Path(out) / preset.name)
    failed = failure_summary(ctx, plan_jobs(preset))
    if failed:
        print(f"{PROG}: {len(failed)} job(s) failed (rows marked failed above):", file=sys.stderr)
        for line in failed:
            print(f"  {line[:300]}", file=sys.stderr)
        return EXIT_JOBS_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(_run, argv, prog=PROG, extra_errors=(StartError,))


if __name__ == "__main__":
    sys.exit(main())
