"""Command line: ``python -m decoupling {train,evaluate,explain} ...`` (see decoupling/README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.backbones import WeightsError
from common.run import CheckpointError, NonFiniteLossError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decoupling", description=(
        "Interpretable Neural Network Decoupling (Li et al., ECCV 2020): architecture controlling modules "
        "with Improved SemHash select a calculation path of filters for every input."))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a pretrained backbone into a decoupled network")
    train.add_argument("--backbone", help="resnet20/32/44/56/110, resnet18 or vgg16 (default: from --config)")
    train.add_argument("--dataset", help="digits, cifar10, cifar100, ... (default: from --config)")
    train.add_argument("--data-root", help="data directory (default: $DATA_ROOT, else ./data)")
    train.add_argument("--weights", help="pretrained backbone weights to start from (.th/.pt)")
    train.add_argument("--epochs", type=float, help="training epochs, may be fractional (default: config)")
    train.add_argument("--seconds", type=float, help="stop training after this much measured time")
    train.add_argument("--max-batches", type=int, help="cap every epoch at this many batches")
    train.add_argument("--val-source", choices=("auto", "train", "test-half"), default="auto",
                       help="validation split: auto = test-half for a published start (--weights), else a "
                            "hold-out of the training set (evaluation-protocol.md)")
    train.add_argument("--out", required=True, help="run directory (resumes from its checkpoint.pt)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--config", help="JSON recipe: backbone, dataset, epochs, settings {lr, lambda_s, ...}")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set lambda_s=0.01 (repeatable)")

    evaluate = sub.add_parser("evaluate", help="measure a trained run; writes RUN/metrics.json")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--data-root", help="data directory (default: the one used for training)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="report on the test split (default; the held-out half for a published start) "
                               "or on the validation split only (recipe selection)")
    evaluate.add_argument("--calibration-images", type=int, default=2000,
                          help="training images whose paths freeze the filter states for deployment (default 2000)")
    evaluate.add_argument("--probe-fit-images", type=int, default=5000,
                          help="training images the linear probes are fitted on (default 5000)")
    evaluate.add_argument("--seeds", type=int, default=3, help="shuffles / draws of the controls (default 3)")
    evaluate.add_argument("--latency-images", type=int, default=256,
                          help="class-mixed images timed at batch 1 and 128 (default 256; 0 skips timing)")
    evaluate.add_argument("--speed-repeats", type=int, default=21, help="timed repetitions per batch size")
    evaluate.add_argument("--adv-runs", type=int, default=3,
                          help="runs of the adversarial detection (paper: 5; 0 skips it)")
    evaluate.add_argument("--adv-shots", default="1,5,10",
                          help="training images per class for the detector, comma-separated (default 1,5,10)")
    evaluate.add_argument("--adv-test-per-class", type=int, default=10, help="held-out images per class for the AUC")
    evaluate.add_argument("--adv-classifiers", default="random_forest,adaboost,gradient_boosting",
                          help="detectors, comma-separated")

    explain = sub.add_parser("explain", help="figures of filter states, calculation paths and an occlusion")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--out", required=True, help="PNG to write (paths.npz and decision_tree.txt go next to it)")
    explain.add_argument("--data-root", help="data directory (default: the one used for training)")
    explain.add_argument("--device", help="cpu, cuda or cuda:N")
    explain.add_argument("--per-class", type=int, default=50, help="test images per class for the paths (default 50)")
    explain.add_argument("--seed", type=int, default=0, help="random seed for t-SNE and the image choice")
    return parser


def _load_run(args: argparse.Namespace):
    import torch

    from common.backbones import build_backbone
    from common.data import load_dataset
    from common.run import RunDir, pick_device

    from .model import load_decoupled

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    run = RunDir(args.run)
    config = run.read_config()
    if not run.model_path.is_file():
        raise FileNotFoundError(f"{run.model_path} does not exist; train into {run.path} first")
    device = pick_device(args.device)
    model, meta = load_decoupled(run.model_path, device)
    data = load_dataset(config["dataset"], args.data_root or config.get("data_root"),
                        val_source=config.get("val_source", "train"))
    dense = build_backbone(meta["backbone"], meta["num_classes"], config.get("weights"))  # the start (control)
    return run, model.to(device), dense, data, device


def evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    run, model, dense, data, device = _load_run(args)
    try:
        shots = tuple(int(k) for k in args.adv_shots.split(","))
    except ValueError:
        raise ValueError(f"--adv-shots expects comma-separated integers, got {args.adv_shots!r}") from None
    metrics = evaluate_run(model, dense, data, device, calibration_images=args.calibration_images,
                           report_split=args.split, probe_fit_images=args.probe_fit_images, seeds=args.seeds,
                           adv_runs=args.adv_runs, adv_shots=shots, adv_test_per_class=args.adv_test_per_class,
                           adv_classifiers=args.adv_classifiers.split(","), latency_images=args.latency_images,
                           speed_repeats=args.speed_repeats)
    from common.run import atomic_write_json

    name = "metrics.json" if args.split == "test" else "metrics_val.json"  # selection never overwrites
    atomic_write_json(metrics, run.path / name)
    keys = ("top1", "val_top1", "mac_reduction", "val_mac_reduction", "dynamic_filters")
    print(" ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))
    print(f"metrics in {run.path / name}")
    return 0


def explain(args: argparse.Namespace) -> int:
    from .explain import explain_run

    _run, model, _dense, data, device = _load_run(args)
    out = Path(args.out)
    print(explain_run(model, data, device, out, args.per_class, args.seed))
    print(f"figure in {out}; paths and decision tree next to it")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import load_recipe, parse_overrides
    from .train import train_command

    try:
        if args.command == "train":
            return train_command(args, load_recipe(args.config), parse_overrides(args.set))
        if args.command == "evaluate":
            return evaluate(args)
        return explain(args)
    except (FileNotFoundError, CheckpointError, NonFiniteLossError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
