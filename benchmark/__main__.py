"""python -m benchmark --preset NAME [...]: run a preset's unfinished jobs and write its leaderboard."""

from __future__ import annotations

import argparse
import sys

from common.backbones import WeightsError
from common.data import DatasetNotFoundError

from .presets import get_preset, list_presets
from .runner import LAUNCHERS, run_preset
from .start import StartError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _csv(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark",
        description="Run the baseline and the four methods under one budget and write one leaderboard. "
                    "Finished runs are skipped; interrupted ones resume.")
    parser.add_argument("--preset", required=True, choices=list_presets(), help="what to run (see presets.py)")
    parser.add_argument("--data-root", help="dataset root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--weights-dir", help="folder with the pretrained weights (default: $DATA_ROOT/weights)")
    parser.add_argument("--out", default="results", help="results folder; the preset writes into OUT/PRESET")
    parser.add_argument("--budget-seconds", type=float,
                        help="also stop every method after this many seconds of training")
    parser.add_argument("--epochs", type=float, help="override the preset's epoch budget (all methods)")
    parser.add_argument("--max-batches", type=int, help="override the preset's batches-per-epoch cap")
    parser.add_argument("--methods", type=_csv, help="comma-separated subset, e.g. baseline,drib")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: in this process; submitit: one job array (Slurm, or local subprocesses)")
    parser.add_argument("--slurm-partition", help="submitit only: Slurm partition")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="do not train; rewrite the leaderboard from the finished runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset, seconds=args.budget_seconds, epochs=args.epochs,
                        max_batches=args.max_batches, methods=args.methods, seeds=args.seeds)
    options = {"slurm_partition": args.slurm_partition} if args.slurm_partition else None
    try:
        paths = run_preset(preset, args.out, data_root=args.data_root, weights_dir=args.weights_dir,
                           device=args.device, launcher=args.launcher, launcher_options=options,
                           skip_training=args.aggregate_only)
    except (DatasetNotFoundError, StartError, WeightsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if paths:
        print(paths["md"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
