"""Command line: ``python -m isp train | evaluate | explain`` (see isp/README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.backbones import WeightsError, build_backbone, list_backbones
from common.data import DatasetNotFoundError, load_dataset
from common.method import Budget
from common.run import CheckpointError, NonFiniteLossError, RunDir, pick_device, read_json

from .pipeline import STAGES, Pipeline, StageOrderError
from .selector import Selector
from .settings import ISPSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m isp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run or resume every ISP stage (or one, with --stage)")
    train.add_argument("--backbone", default="resnet20", choices=list_backbones(), help="classifier architecture")
    train.add_argument("--dataset", default="cifar10", help="dataset name (common.data), e.g. cifar10, digits")
    train.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT, else ./data)")
    train.add_argument("--weights", default=None,
                       help="pretrained classifier weights, e.g. ../shared/data/weights/resnet20-12fca82f.th")
    train.add_argument("--epochs", type=float, default=1.0,
                       help="budget in epochs of the training set, shared over the stages unless the config "
                            "fixes them")
    train.add_argument("--seconds", type=float, default=None, help="optional wall-clock budget of all stages")
    train.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch (smoke runs)")
    train.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    train.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--config", default=None,
                       help="JSON file of ISP settings, e.g. isp/configs/resnet56_cifar10.json")
    train.add_argument("--stage", default=None, choices=STAGES, help="run only this stage")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    evaluate = sub.add_parser("evaluate", help="(re)compute DIR/metrics.json for a finished run")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--data-root", default=None, help="override the dataset root stored in the run")
    evaluate.add_argument("--device", default=None)

    explain = sub.add_parser("explain", help="saliency figure: original vs pruned selector")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--out", required=True, help="PNG file to write")
    explain.add_argument("--images", type=int, default=None, help="number of test images (rows)")
    explain.add_argument("--data-root", default=None, help="override the dataset root stored in the run")
    explain.add_argument("--device", default=None)
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


def _reopen(run_path: str, data_root: str | None, device_name: str | None) -> Pipeline:
    if not (Path(run_path) / "config.json").is_file():
        raise FileNotFoundError(f"{run_path} is not a run directory (no config.json); train into it first")
    run = RunDir(run_path)
    config = run.read_config()
    device = pick_device(device_name)
    root = data_root if data_root is not None else config.get("data_root")
    data = load_dataset(config["dataset"], root)
    budget = Budget(**config["budget"])
    classifier = build_backbone(config["backbone"], data.num_classes)
    # The run's classifier.pt is the source of truth; this instance only supplies the architecture.
    return Pipeline(run.path, classifier, data, budget, ISPSettings.from_dict(config["settings"]), device,
                    config.get("seed", 0), backbone_name=config["backbone"])


def _train(args: argparse.Namespace) -> None:
    settings = ISPSettings.from_dict(_settings(args.config))
    device = pick_device(args.device)
    data = load_dataset(args.dataset, args.data_root)
    run = RunDir(args.out)
    if (run.path / "classifier.pt").is_file():
        classifier = build_backbone(args.backbone, data.num_classes)
    else:
        if args.weights is None:
            print("warning: no --weights given; pruning an untrained classifier", file=sys.stderr)
        classifier = build_backbone(args.backbone, data.num_classes, args.weights)
    budget = Budget(args.epochs, args.seconds, args.max_batches)
    run.write_config({"method": "isp", "backbone": args.backbone, "dataset": args.dataset,
                      "data_root": args.data_root, "weights": args.weights,
                      "budget": {"epochs": budget.epochs, "seconds": budget.seconds,
                                 "max_batches": budget.max_batches},
                      "seed": args.seed, "settings": settings.to_dict()})
    run.write_environment(device)
    pipeline = Pipeline(run.path, classifier, data, budget, settings, device, args.seed, backbone_name=args.backbone)
    pipeline.run(args.stage)
    if run.metrics_path.is_file():
        m = run.read_metrics()
        print(f"top-1 {m['top1_before']:.2f} -> {m['top1_after']:.2f}, MACs pruned {100 * m['pruned_macs_ratio']:.1f}%"
              f", CPU speedup {m['cpu_speedup']:.2f}x; metrics in {run.metrics_path}")


def _evaluate(args: argparse.Namespace) -> None:
    pipeline = _reopen(args.run, args.data_root, args.device)
    pipeline.run("evaluate")
    print(f"metrics written to {pipeline.run_dir.metrics_path}")


def _explain(args: argparse.Namespace) -> None:
    from .figures import saliency_figure

    pipeline = _reopen(args.run, args.data_root, args.device)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        {"train": _train, "evaluate": _evaluate, "explain": _explain}[args.command](args)
    except (DatasetNotFoundError, WeightsError, CheckpointError, StageOrderError, NonFiniteLossError,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
