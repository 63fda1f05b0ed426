"""The CLI: python -m drib {train, evaluate, explain}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.backbones import build_backbone, list_backbones
from common.cli import (
    add_budget_arguments,
    add_common_arguments,
    apply_overrides,
    budget_from_args,
    gather_inputs,
    main_guard,
    parse_args,
    require_weights,
)
from common.data import default_val_source, load_dataset
from common.precision import add_precision_argument
from common.run import RunDir, check_config, pick_device, read_json

from .config import NOT_IDENTITY, DRIBConfig, run_identity

TRAIN_FIX = "pass a new --out to keep the old run, or delete it to train this config there"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m drib", description=(
        "DRIB: dynamic reasoning (per-sample channel selection) + information bottleneck verification."))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="gate a pretrained backbone and train the decision modules")
    train.add_argument("--backbone", default="resnet20", choices=list_backbones(), help="backbone architecture")
    train.add_argument("--dataset", default="cifar10", help="dataset name (see common.data.list_datasets)")
    train.add_argument("--config", default=None, help="JSON config, e.g. drib/configs/resnet56_cifar10.json")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True, data=True,
                         out_help="run directory (resumes if it holds checkpoint.pt)")
    add_budget_arguments(train)
    add_precision_argument(train, default=None)  # None: the config's train.precision (default auto)

    evaluate = sub.add_parser("evaluate", help="write RUN/metrics.json (accuracy, MACs, credibility, AUCs)")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--subset", type=int, default=200,
                          help="test images for the per-sample IBA metrics (0 skips them)")
    evaluate.add_argument("--no-compare", action="store_true",
                          help="skip the controls (Grad-CAM, random and centre maps)")
    evaluate.add_argument("--degradation-points", type=int, default=20,
                          help="points on each MoRF/LeRF curve of the degradation test (0 skips it)")
    evaluate.add_argument("--betas", default=None,
                          help="comma-separated beta sweep for credibility and its controls (default: config beta)")
    evaluate.add_argument("--thresholds", default=None,
                          help="comma-separated credibility thresholds for the in-the-loop verification "
                          "(default: bottleneck.verify_threshold, else 0.5,0.6)")
    evaluate.add_argument("--no-attribution", action="store_true",
                          help="skip the saliency metrics (credibility and its controls only)")
    evaluate.add_argument("--speed", action="store_true",
                          help="also time channel skipping against the dense start (batch 1 and 128)")
    evaluate.add_argument("--speed-repeats", type=int, default=20, help="timed rounds per form (median)")
    add_common_arguments(evaluate, val_source=True, data=True)

    explain = sub.add_parser("explain", help="save input | IB heatmap | selected channels as a PNG")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--index", type=int, default=0, help="test image index")
    explain.add_argument("--out", dest="png", required=True, help="output PNG")
    add_common_arguments(explain, threads=False, seed=False, val_source=True, data=True)
    return parser


def resolve_val_source(choice: str, pretrained: bool) -> str:
    """`--val-source auto` -> common.data.default_val_source(pretrained)."""
    return default_val_source(pretrained) if choice == "auto" else choice


def _run_dataset(trained, args: argparse.Namespace):
    """The dataset split of a trained run (its recorded val source unless --val-source overrides it)."""
    recorded = trained.meta.get("val_source") or default_val_source(bool(trained.meta.get("pretrained", True)))
    source = recorded if args.val_source == "auto" else args.val_source
    return load_dataset(trained.meta["dataset"], args.data_root, val_source=source)


def _config(path: str | None) -> DRIBConfig:
    if path is None:
        return DRIBConfig()
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist (see drib/configs/)")
    return DRIBConfig.from_dict(read_json(path))


def cmd_train(args: argparse.Namespace) -> None:
    from .train import train_run

    config = apply_overrides(_config(args.config), args.set)
    if args.precision is not None:
        config.train.precision = args.precision
    config.validate()
    budget = budget_from_args(args)
    val_source = resolve_val_source(args.val_source, args.weights is not None)
    identity = run_identity(args.backbone, args.dataset, val_source, args.seed, budget, config,
                            weights=args.weights)
    # Before anything is loaded or created: a resume never carries on under other settings, and a finished
    # run is never overwritten by another config (the keys that differ are named).
    check_config(args.out, identity, what="--out", fix=TRAIN_FIX, ignore=NOT_IDENTITY)
    device = pick_device(args.device)
    weights, data = gather_inputs(
        lambda: require_weights(args),
        lambda: load_dataset(args.dataset, args.data_root, download=args.download, val_source=val_source),
        what="python -m drib train")
    backbone = build_backbone(args.backbone, num_classes=data.num_classes,
                              weights=None if weights is None else str(weights))
    run = RunDir(args.out)
    run.claim(identity, what="--out", fix=TRAIN_FIX, ignore=NOT_IDENTITY)
    run.write_environment(device)
    trained, seconds = train_run(backbone, args.backbone, data, budget, run.path, config, device, args.seed)
    print(f"trained {trained.meta['steps']} steps in {seconds:.0f} s; val top-1 {trained.meta['val_top1']:.2f}%, "
          f"val MAC fraction {trained.meta['val_mac_fraction']:.3f}; model at {run.model_path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, write_metrics
    from .train import load_model

    device = pick_device(args.device)
    trained = load_model(args.run, device)
    data = _run_dataset(trained, args)
    betas = None if args.betas is None else [float(b) for b in args.betas.split(",") if b.strip()]
    metrics = evaluate(trained, data, device, subset=args.subset, seed=args.seed, compare=not args.no_compare,
                       degradation_points=args.degradation_points, betas=betas, speed=args.speed,
                       thresholds=None if args.thresholds is None else
                       [float(t) for t in args.thresholds.split(",") if t.strip()],
                       attribution=not args.no_attribution, speed_repeats=args.speed_repeats)
    write_metrics(Path(args.run), metrics)
    print(f"{metrics['test_split']}: top-1 {metrics['top1']:.2f}%  MACs {metrics['macs_mean'] / 1e6:.2f}M of "
          f"{metrics['macs_dense'] / 1e6:.2f}M ({100 * metrics['mac_reduction']:.1f}% fewer)"
          + (f"  credibility {metrics['credibility_own']:.3f} (random {metrics['credibility_random']:.3f}, "
             f"oracle {metrics['credibility_oracle']:.3f}; accepted: {metrics['credibility_accepted']})"
             if "credibility_own" in metrics else ""))


def cmd_explain(args: argparse.Namespace) -> None:
    from .explain import explain_figure
    from .train import load_model

    device = pick_device(args.device)
    trained = load_model(args.run, device)
    data = _run_dataset(trained, args)
    shown = explain_figure(trained, data, args.index, Path(args.png), device)
    print(f"wrote {args.png}: {shown}")


def _run(argv: list[str] | None) -> None:
    from common.cli import command_scope

    args = parse_args(_parser(), argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain}
    with command_scope(args, "python -m drib"):  # train: one process per --out; run files name their rebuild
        commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    return main_guard(_run, argv, prog="python -m drib")


if __name__ == "__main__":
    sys.exit(main())
