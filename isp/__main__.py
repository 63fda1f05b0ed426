"""Command line: ``python -m isp COMMAND``. train, evaluate and explain a run; the studies sweep, blocks, speed,
report and compare (studies.py) measure what isp/README.md reports, each figure with its command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from common.backbones import build_backbone, list_backbones
from common.cli import (
    add_budget_arguments,
    add_common_arguments,
    add_run_arguments,
    apply_overrides,
    budget_from_args,
    check_positive,
    command_scope,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
    retell,
)
from common.data import load_dataset
from common.precision import add_precision_argument
from common.run import RunDir, check_config, pick_device

from .config import IspSettings, read_recipe
from .evaluate import EXPLAINED_IMAGES
from .selector import Selector
from .studies import STUDY_COMMANDS, add_study_commands
from .train import STAGES, Pipeline, StageOrderError, reopen_pipeline

PROG = "python -m isp"
# Without --config (or where the recipe leaves them unset): what --backbone, --dataset and --epochs default to.
DEFAULT_BACKBONE, DEFAULT_DATASET, DEFAULT_EPOCHS = "resnet20", "cifar10", 1.0
FIGURE = "saliency.png"
# config.json keys that may change when a run is resumed; every other key is the run's identity.
NOT_IDENTITY = ("seconds", "data_root")
IDENTITY_FIX = "pass a new --out to keep the old run, or delete it to train this config there"


def _reopened_run_flags(parser: argparse.ArgumentParser) -> None:
    """What --precision, --val-source and --data-root mean on a command that reopens a finished run."""
    parser.set_defaults(precision=None)
    retell(parser, "precision", help="compute precision of this evaluation: auto (bf16 where the device has native "
                                     "bf16, else fp32), fp32 or bf16 (default: the run's own precision setting)")
    retell(parser, "val_source", help="validation split of the reopened run: auto (the one it was trained with, in its "
                                      "config.json), train or test-half (re-split for this command; metrics.json "
                                      "records val_source and split)")
    retell(parser, "data_root", help="dataset root (default: the run's own, else $DATA_ROOT, else ./data)")


def build_parser() -> argparse.ArgumentParser:
    """The full parser: train, evaluate, explain and the study subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    train = sub.add_parser("train", help="run or resume every ISP stage (or one, with --stage) into --out")
    train.add_argument("--config", default=None,
                       help="recipe file, e.g. isp/configs/resnet20_cifar10_cpu.json ({description, backbone, "
                            "dataset, epochs, settings}); the flags given here override it, --set its settings")
    train.add_argument("--backbone", default=None, choices=list_backbones(),
                       help=f"classifier architecture (default: the recipe's, else {DEFAULT_BACKBONE})")
    train.add_argument("--dataset", default=None,
                       help=f"dataset name (common.data), e.g. cifar10, digits (default: the recipe's, else "
                            f"{DEFAULT_DATASET})")
    train.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT, else ./data)")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True)
    add_precision_argument(train, default=None)  # None: the settings' precision (default auto)
    add_budget_arguments(train, epochs=None)  # None: the recipe's epochs, else DEFAULT_EPOCHS
    train.add_argument("--stage", default=None, choices=STAGES, help="run only this stage")
    retell(train, "set", help="override one ISP setting (isp/config.py), e.g. gamma1=0 or target_mac_reduction=0.5; "
                              "repeatable; applied after --config; the value is checked against the setting's type")
    retell(train, "precision", help="compute precision of training and evaluation: auto (bf16 where the device has "
                                    "native bf16, else fp32), fp32 or bf16 (default: the recipe's or --set's precision "
                                    "setting, else auto)")
    retell(train, "epochs", help="budget in passes over the training set, shared 30/10/10/50%% by the predictor, "
                                 "selector, gate search and fine-tuning where no *_epochs setting fixes a stage's "
                                 f"length (default: the recipe's epochs, else {DEFAULT_EPOCHS:g})")
    retell(train, "budget_seconds", help="also stop (resumably) after this many seconds of training, split "
                                         "30/10/10/50%% over the predictor, selector, gate search and fine-tuning")

    evaluate = sub.add_parser("evaluate", help="(re)compute the metrics.json of a finished run")
    add_run_arguments(evaluate, images=EXPLAINED_IMAGES,
                      images_help="test images (a class-interleaved prefix of the reported split) for the "
                                  "explanation distance and the selector's mask fidelity; top-1 is over the "
                                  "whole split",
                      out_help="directory to write metrics.json into (default: --run itself)")
    _reopened_run_flags(evaluate)

    explain = sub.add_parser("explain", help="saliency figure of a finished run: the selector's maps with the "
                                             "original and the pruned network as its encoder")
    add_run_arguments(explain,
                      images_help="test images, drawn at random (seed 0) from the reported split, one figure row "
                                  "each (default: the run's figure_images setting, 6 unless changed)",
                      out_help=f"directory to write {FIGURE} into (default: --run itself)")
    _reopened_run_flags(explain)

    add_study_commands(sub)  # sweep, blocks, speed, report, compare (studies.py)
    return parser


def _train(args: argparse.Namespace) -> None:
    recipe = read_recipe(args.config) if args.config is not None else {}
    backbone = args.backbone or recipe.get("backbone") or DEFAULT_BACKBONE
    dataset = args.dataset or recipe.get("dataset") or DEFAULT_DATASET
    if args.epochs is None:
        args.epochs = recipe.get("epochs") or DEFAULT_EPOCHS
    settings = apply_overrides(IspSettings.from_dict(recipe.get("settings")), args.set)
    if args.precision is not None:
        settings = dataclasses.replace(settings, precision=args.precision)
    settings = IspSettings.from_dict(settings.to_dict())  # validated after the overrides
    device = pick_device(args.device)
    weights = require_weights(args)
    val_source = resolve_val_source(args.val_source, pretrained=weights is not None)
    budget = budget_from_args(args)
    # The run's identity: its artefacts and checkpoint belong to it. A time budget and a data root may change
    # on a resume (a larger time budget continues a stage stopped on time); anything else is refused.
    config = {"method": "isp", "backbone": backbone, "dataset": dataset, "data_root": args.data_root,
              "weights": args.weights, "val_source": val_source,
              "budget": {"epochs": budget.epochs, "max_batches": budget.max_batches}, "seconds": budget.seconds,
              "seed": args.seed, "settings": settings.to_dict()}
    check_config(args.out, config, what="--out", fix=IDENTITY_FIX, ignore=NOT_IDENTITY)  # before anything is made
    data = load_dataset(dataset, args.data_root, val_source=val_source)
    run = RunDir(args.out)
    if (run.path / "classifier.pt").is_file():
        classifier = build_backbone(backbone, data.num_classes)
    else:
        classifier = build_backbone(backbone, data.num_classes, None if weights is None else str(weights))
    run.claim(config, what="--out", fix=IDENTITY_FIX, ignore=NOT_IDENTITY)
    run.write_environment(device)
    pipeline = Pipeline(run.path, classifier, data, budget, settings, device, args.seed, backbone_name=backbone)
    pipeline.run(args.stage)
    if run.metrics_path.is_file():
        m = run.read_metrics()
        print(f"top-1 {m['top1_before']:.2f} -> {m['top1']:.2f} on the {m['split']}, MACs pruned "
              f"{100 * m['mac_reduction']:.1f}%, CPU speedup {m['cpu_speedup']:.2f}x; metrics in {run.metrics_path}")


def _reopen(args: argparse.Namespace) -> Pipeline:
    check_positive(args.images, "--images")
    return reopen_pipeline(args.run, args.data_root, args.device, args.precision, val_source=args.val_source,
                           download=args.download)


def _evaluate(args: argparse.Namespace) -> None:
    pipeline = _reopen(args)
    run = RunDir(args.out) if args.out is not None else pipeline.run_dir
    run.write_metrics(pipeline.evaluate(args.images))
    print(f"metrics written to {run.metrics_path}")


def _explain(args: argparse.Namespace) -> None:
    from .explain import saliency_figure

    pipeline = _reopen(args)
    n = args.images or pipeline.settings.figure_images
    test = pipeline.data.test
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(test), generator=g)[:n]
    images = test.images[idx].float().div(255).to(pipeline.device)
    decoder = pipeline.decoder()
    original = Selector(pipeline.classifier, decoder)
    with torch.no_grad():
        targets = pipeline.classifier(images).argmax(1)
    out = Path(args.out) if args.out is not None else pipeline.run_dir.path
    path = saliency_figure([("original", original), ("pruned", Selector(pipeline.final_model(), decoder))],
                           images, targets, pipeline.data.classes, out / FIGURE)
    print(f"figure written to {path}")


def _run(argv: list[str] | None) -> int:
    args = parse_args(build_parser(), argv)  # seeds, sets --threads, checks budget / device / --out / --set
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        {"train": _train, "evaluate": _evaluate, "explain": _explain, **STUDY_COMMANDS}[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; known errors are one line on stderr (exit 2), Ctrl-C one line (exit 130)."""
    return main_guard(_run, argv, prog=PROG, extra_errors=(StageOrderError,))


if __name__ == "__main__":
    sys.exit(main())
