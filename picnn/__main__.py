"""Command line: python -m picnn {train, evaluate, explain, overhead} (see picnn/README.md)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.backbones import WeightsError, list_backbones
from common.data import VAL_SOURCES, BatchLoader, DatasetNotFoundError, default_val_source, load_dataset
from common.method import Budget
from common.precision import add_precision_argument
from common.run import (
    CheckpointError,
    NonFiniteLossError,
    RunDir,
    atomic_write_json,
    pick_device,
    read_json,
    seed_everything,
)

from .config import PicnnSettings
from .evaluate import evaluate_picnn
from .explain import save_explanation_figure
from .train import build_picnn, load_model, save_model, step_overhead, train_picnn

# Command-line flag -> PicnnSettings field, for the settings that are worth a flag.
SETTING_FLAGS = {"lam": float, "assignment": str, "cluster_index": str, "lr": float, "p_lr": float,
                 "backbone_lr_scale": float, "batch_size": int, "filters": int, "mis_samples": int,
                 "precision": str}
RUN_KEYS = ("backbone", "dataset", "epochs", "max_batches", "seconds", "weights", "val_fraction", "val_source")
# A resumed run must agree with the saved one on these (the budget may grow).
IDENTITY_KEYS = ("backbone", "dataset", "seed", "val_fraction", "val_source", "settings")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m picnn", description="PICNN: class-specific filter clusters.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train PICNN (resumes from OUT/checkpoint.pt)")
    train.add_argument("--config", help="JSON recipe (see picnn/configs); flags given here override it")
    train.add_argument("--backbone", help=f"one of {', '.join(list_backbones())} (default resnet20)")
    train.add_argument("--dataset", help="dataset name for common.data (default cifar10)")
    train.add_argument("--data-root", help="dataset root (default: $DATA_ROOT, else ./data)")
    train.add_argument("--weights",
                       help="pretrained backbone weights, e.g. ../shared/data/weights/resnet20-12fca82f.th")
    train.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    train.add_argument("--max-batches", type=int, help="cap on batches per epoch (short runs)")
    train.add_argument("--seconds", type=float, help="stop after this much training time (resumable)")
    train.add_argument("--val-fraction", type=float,
                       help="share of the training set held out when --val-source is train (default 0.1)")
    train.add_argument("--val-source", choices=("auto", *VAL_SOURCES),
                       help="validation split: train (a hold-out of the training set) or test-half (half of the "
                            "test set; the other half is reported); auto (default) = test-half with --weights")
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    train.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    train.add_argument("--lam", type=float, help="lambda of Eq. 3 (default 2; 0 = the plain STD model)")
    train.add_argument("--assignment", choices=("bernoulli", "gumbel"), help="filter-cluster sampler")
    train.add_argument("--cluster-index", choices=("pseudo", "label"),
                       help="index P with the pseudo-label (Eq. 8-10) or the true label (trivial solution)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    train.add_argument("--p-lr", type=float, help="learning rate of P (default: --lr)")
    train.add_argument("--backbone-lr-scale", type=float, help="backbone lr = lr * this (default 1)")
    train.add_argument("--batch-size", type=int, help="batch size (default 128)")
    train.add_argument("--filters", type=int,
                       help="target-layer filters N; default: the backbone's last stage (no added layer) when it "
                            "has >= K channels; any other N adds a 3x3 conv of N filters (MACs in metrics.json)")
    train.add_argument("--mis-samples", type=int, help="test images used for MIS (default all)")
    add_precision_argument(train, default=None)  # None: the config's settings.precision (default auto)

    evaluate = sub.add_parser("evaluate", help="ACC1/ACC2/ACC3, MIS, MACs and params on the test set")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--data-root", help="dataset root (default: the one used for training)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N")
    evaluate.add_argument("--draws", type=int, help="Bernoulli draws averaged for ACC2/ACC3 (default 5)")
    evaluate.add_argument("--mis-samples", type=int, help="test images used for MIS (default: the run's setting)")
    add_precision_argument(evaluate, default=None)  # None: the run's settings.precision

    explain = sub.add_parser("explain", help="class-cluster Grad-CAM (Fig. 7) and the heatmap of P (Fig. 1)")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--out", required=True, help="output .png")
    explain.add_argument("--data-root", help="dataset root (default: the one used for training)")
    explain.add_argument("--device", help="cpu, cuda or cuda:N")
    explain.add_argument("--images", type=int, default=5, help="test images shown, one per class (default 5)")
    overhead = sub.add_parser("overhead", help="seconds per training step, PICNN vs the plain backbone, "
                                               "timed side by side in one process")
    overhead.add_argument("--config", help="JSON recipe (see picnn/configs); flags given here override it")
    overhead.add_argument("--backbone", help="backbone name (default resnet20)")
    overhead.add_argument("--dataset", help="dataset name (default cifar10)")
    overhead.add_argument("--data-root", help="dataset root (default: $DATA_ROOT, else ./data)")
    overhead.add_argument("--weights", help="pretrained backbone weights")
    overhead.add_argument("--lam", type=float, help="lambda of Eq. 3 (default 2)")
    overhead.add_argument("--filters", type=int, help="target-layer filters N (default: the backbone's last stage)")
    overhead.add_argument("--batch-size", type=int, help="batch size (default 128)")
    overhead.add_argument("--steps", type=int, default=30, help="timed steps of each model (default 30)")
    overhead.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps of each (default 3)")
    overhead.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    overhead.add_argument("--device", help="cpu, cuda or cuda:N")
    overhead.add_argument("--out", help="write the result to this .json file too")
    add_precision_argument(overhead, default=None)
    for command in (train, evaluate, explain, overhead):
        command.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return parser


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < --config file < explicit flags."""
    config: dict[str, Any] = {"backbone": "resnet20", "dataset": "cifar10", "epochs": 1.0, "max_batches": None,
                              "seconds": None, "weights": None, "val_fraction": 0.1, "val_source": "auto",
                              "seed": 0, "settings": {}}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        recipe = read_json(path)
        unknown = sorted(set(recipe) - set(config) - {"description"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(config)}")
        config.update({k: v for k, v in recipe.items() if k != "settings"})
        config["settings"] = dict(recipe.get("settings", {}))
    for key in (*RUN_KEYS, "seed"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    for key in SETTING_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            config["settings"][key] = value
    config["settings"] = PicnnSettings.from_dict(config["settings"]).to_dict()
    if config["val_source"] == "auto":
        config["val_source"] = default_val_source(config["weights"] is not None)
    if config["val_source"] not in VAL_SOURCES:
        raise ValueError(f"val_source must be auto or one of {', '.join(VAL_SOURCES)}, got {config['val_source']!r}")
    if config["backbone"] not in list_backbones():
        raise ValueError(f"unknown backbone {config['backbone']!r}; choose one of {', '.join(list_backbones())}")
    return config


def cmd_train(args: argparse.Namespace) -> None:
    config = _run_config(args)
    config["data_root"] = args.data_root
    run = RunDir(args.out)
    if run.config_path.is_file():
        previous = run.read_config()
        clash = [k for k in IDENTITY_KEYS if previous.get(k) != config.get(k)]
        if clash:
            raise ValueError(f"{run.path} holds a run with different {clash}; choose a new --out")
    settings = PicnnSettings.from_dict(config["settings"])
    device = pick_device(args.device)
    seed_everything(config["seed"])
    data = load_dataset(config["dataset"], args.data_root, val_fraction=config["val_fraction"], seed=0,
                        val_source=config["val_source"])
    model = build_picnn(config["backbone"], data.num_classes, settings.filters, config["weights"])
    run.write_config(config)
    run.write_environment(device)
    budget = Budget(epochs=config["epochs"], seconds=config["seconds"], max_batches=config["max_batches"])
    report = train_picnn(model, data, budget, run, settings, device, config["seed"])
    save_model(model, run, {"backbone": config["backbone"], "num_classes": data.num_classes,
                            "filters": model.filters, "added_target_conv": model.added_target_conv,
                            "dataset": config["dataset"],
                            "best_step": report.best_step, "steps": report.steps,
                            "train_seconds": report.train_seconds})
    print(json.dumps({"steps": report.steps, "total_steps": report.total_steps,
                      "best_val_acc1": report.best_val_acc1, "best_step": report.best_step,
                      "train_seconds": round(report.train_seconds, 1),
                      "stopped_on_time": report.stopped_on_time}, indent=2))


def _load_run(args: argparse.Namespace):
    run = RunDir(args.run) if Path(args.run).is_dir() else None
    if run is None:
        raise FileNotFoundError(f"run directory {args.run} does not exist; train into it first")
    config = run.read_config()
    device = pick_device(args.device)
    model, _meta = load_model(run, device)
    root = args.data_root if args.data_root is not None else config.get("data_root")
    data = load_dataset(config["dataset"], root, val_fraction=config.get("val_fraction", 0.1), seed=0,
                        val_source=config.get("val_source", "train"))
    return run, config, model, data, device


def cmd_evaluate(args: argparse.Namespace) -> None:
    run, config, model, data, device = _load_run(args)
    settings = PicnnSettings.from_dict(config["settings"])
    mis_samples = args.mis_samples if args.mis_samples is not None else settings.mis_samples
    metrics = evaluate_picnn(model, data.test, assignment=settings.assignment,
                             draws=args.draws or settings.eval_draws, mis_samples=mis_samples,
                             device=device, seed=config.get("seed", 0),
                             precision=args.precision or settings.precision)
    metrics.update(split=data.test_split_name, val_source=data.val_source, lam=settings.lam)
    run.write_metrics(metrics)
    print(json.dumps(metrics, indent=2))


def cmd_explain(args: argparse.Namespace) -> None:
    _run, _config, model, data, _device = _load_run(args)
    if args.images < 1:
        raise ValueError("--images must be >= 1")
    labels = data.test.labels
    picks = []
    for k in range(data.num_classes):  # the first test image of each class, in class order
        hits = (labels == k).nonzero().flatten()
        if len(hits):
            picks.append(int(hits[0]))
        if len(picks) == args.images:
            break
    index = torch.tensor(picks)
    images = data.test.images[index].float() / 255.0
    path = save_explanation_figure(model, images, labels[index], data.classes, args.out)
    print(f"wrote {path}")


def cmd_overhead(args: argparse.Namespace) -> None:
    config = _run_config(args)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    settings = PicnnSettings.from_dict(config["settings"])
    device = pick_device(args.device)
    seed_everything(config["seed"])
    data = load_dataset(config["dataset"], args.data_root, val_source=config["val_source"])
    model = build_picnn(config["backbone"], data.num_classes, settings.filters, config["weights"])
    plain = build_picnn(config["backbone"], data.num_classes, None, config["weights"]).backbone
    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, augment=settings.augment,
                         seed=config["seed"])
    batches = list(itertools.islice(iter(loader), args.steps + args.warmup))
    if len(batches) < args.steps + args.warmup:
        raise ValueError(f"the training split has only {len(batches)} batches of {settings.batch_size}")
    result = step_overhead(model, plain, batches, settings, device, warmup=args.warmup)
    result.update(backbone=config["backbone"], dataset=config["dataset"], lam=settings.lam,
                  filters=model.filters, added_target_conv=model.added_target_conv)
    if args.out:
        atomic_write_json(result, args.out)
    print(json.dumps(result, indent=2))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain, "overhead": cmd_overhead}
USER_ERRORS = (ValueError, FileNotFoundError, DatasetNotFoundError, WeightsError, CheckpointError,
               NonFiniteLossError, KeyError)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"picnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
