"""Command line: ``python -m isp train | evaluate | explain``, and the studies ``sweep | blocks | speed | report |
compare`` (studies.py; see isp/README.md)."""

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
    apply_overrides,
    budget_from_args,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
)
from common.data import load_dataset
from common.precision import add_precision_argument
from common.run import RunDir, check_config, pick_device, read_json

from .config import ISPSettings
from .selector import Selector
from .studies import STUDY_COMMANDS, add_study_commands, run_flags
from .train import STAGES, Pipeline, StageOrderError, reopen_pipeline

PROG = "python -m isp"
# config.json keys that may change when a run is resumed; every other key is the run's identity.
NOT_IDENTITY = ("seconds", "data_root")
IDENTITY_FIX = "pass a new --out to keep the old run, or delete it to train this config there"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run or resume every ISP stage (or one, with --stage)")
    train.add_argument("--backbone", default="resnet20", choices=list_backbones(), help="classifier architecture")
    train.add_argument("--dataset", default="cifar10", help="dataset name (common.data), e.g. cifar10, digits")
    train.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT, else ./data)")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True)
    add_precision_argument(train, default=None)  # None: the config's precision setting (default auto)
    add_budget_arguments(train)
    train.add_argument("--seconds", dest="budget_seconds", type=float, help=argparse.SUPPRESS)  # older spelling
    train.add_argument("--config", default=None,
                       help="JSON file of ISP settings, e.g. isp/configs/resnet56_cifar10.json (then --set)")
    train.add_argument("--stage", default=None, choices=STAGES, help="run only this stage")

    evaluate = sub.add_parser("evaluate", help="(re)compute DIR/metrics.json for a finished run")
    run_flags(evaluate)

    explain = sub.add_parser("explain", help="saliency figure: original vs pruned selector")
    run_flags(explain)
    explain.add_argument("--out", required=True, help="PNG file to write")
    explain.add_argument("--images", type=int, default=None, help="number of test images (rows)")

    add_study_commands(sub)  # sweep, blocks, speed, report, compare (studies.py)
    return parser


def _settings(config: str | None) -> dict:
    if config is None:
        return {}
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (configs live in isp/configs/)")
    values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of ISP settings")
    return values


def _train(args: argparse.Namespace) -> None:
    settings = apply_overrides(ISPSettings.from_dict(_settings(args.config)), args.set)
    if args.precision is not None:
        settings = dataclasses.replace(settings, precision=args.precision)
    settings = ISPSettings.from_dict(settings.to_dict())  # validated after the overrides
    device = pick_device(args.device)
    weights = require_weights(args)
    val_source = resolve_val_source(args.val_source, pretrained=weights is not None)
    budget = budget_from_args(args)
    # The run's identity: its artefacts and checkpoint belong to it. A time budget and a data root may change
    # on a resume (a larger time budget continues a stage stopped on time); anything else is refused.
    config = {"method": "isp", "backbone": args.backbone, "dataset": args.dataset, "data_root": args.data_root,
              "weights": args.weights, "val_source": val_source,
              "budget": {"epochs": budget.epochs, "max_batches": budget.max_batches}, "seconds": budget.seconds,
              "seed": args.seed, "settings": settings.to_dict()}
    check_config(args.out, config, what="--out", fix=IDENTITY_FIX, ignore=NOT_IDENTITY)  # before anything is made
    data = load_dataset(args.dataset, args.data_root, val_source=val_source)
    run = RunDir(args.out)
    if (run.path / "classifier.pt").is_file():
        classifier = build_backbone(args.backbone, data.num_classes)
    else:
        classifier = build_backbone(args.backbone, data.num_classes, None if weights is None else str(weights))
    run.claim(config, what="--out", fix=IDENTITY_FIX, ignore=NOT_IDENTITY)
    run.write_environment(device)
    pipeline = Pipeline(run.path, classifier, data, budget, settings, device, args.seed, backbone_name=args.backbone)
    pipeline.run(args.stage)
    if run.metrics_path.is_file():
        m = run.read_metrics()
        print(f"top-1 {m['top1_before']:.2f} -> {m['top1_after']:.2f}, MACs pruned {100 * m['pruned_macs_ratio']:.1f}%"
              f", CPU speedup {m['cpu_speedup']:.2f}x; metrics in {run.metrics_path}")


def _evaluate(args: argparse.Namespace) -> None:
    pipeline = reopen_pipeline(args.run, args.data_root, args.device, args.precision)
    pipeline.run("evaluate")
    print(f"metrics written to {pipeline.run_dir.metrics_path}")


def _explain(args: argparse.Namespace) -> None:
    from .explain import saliency_figure

    pipeline = reopen_pipeline(args.run, args.data_root, args.device, args.precision)
    n = args.images or pipeline.settings.figure_images
    test = pipeline.data.test
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(test), generator=g)[:n]
    images = test.images[idx].float().div(255).to(pipeline.device)
    decoder = pipeline.decoder()
    original = Selector(pipeline.classifier, decoder)
    with torch.no_grad():
        targets = pipeline.classifier(images).argmax(1)
    path = saliency_figure([("original", original), ("pruned", Selector(pipeline.final_model(), decoder))],
                           images, targets, pipeline.data.classes, args.out)
    print(f"figure written to {path}")


def _run(argv: list[str] | None) -> int:
    from common.cli import command_scope

    args = parse_args(_parser(), argv)  # seeds, sets --threads, checks budget / device / --out / --set
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        {"train": _train, "evaluate": _evaluate, "explain": _explain, **STUDY_COMMANDS}[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(_run, argv, prog=PROG, extra_errors=(StageOrderError,))


if __name__ == "__main__":
    sys.exit(main())
