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

from common.backbones import build_backbone, list_backbones
from common.cli import (
    CLIError,
    add_budget_arguments,
    add_common_arguments,
    apply_overrides,
    check_budget,
    check_positive,
    gather_inputs,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
)
from common.data import VAL_SOURCES, BatchLoader, load_dataset
from common.method import Budget
from common.precision import add_precision_argument
from common.run import RunDir, atomic_write_json, check_config, pick_device, read_json, seed_everything

from .config import PicnnSettings
from .evaluate import evaluate_picnn
from .explain import save_explanation_figure
from .train import build_picnn, load_model, save_model, step_overhead, train_picnn

PROG = "python -m picnn"
# Command-line flag -> PicnnSettings field, for the settings that are worth a flag (--set reaches every field).
SETTING_FLAGS = {"lam": float, "assignment": str, "cluster_index": str, "lr": float, "p_lr": float,
                 "backbone_lr_scale": float, "batch_size": int, "target_layer": str, "filters": int,
                 "mis_samples": int, "precision": str}
RUN_KEYS = ("backbone", "dataset", "epochs", "max_batches", "seconds", "weights", "val_fraction", "val_source")
# config.json keys that describe a run without changing what it computes: a resumed run may change them
# (a larger time budget continues a run that stopped on time). Everything else is the run's identity: a
# checkpoint is resumed only into the config that wrote it.
NOT_IDENTITY = ("seconds", "data_root")


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lam", type=float, help="lambda of Eq. 3 (default 2; 0 = the plain STD model)")
    parser.add_argument("--target-layer", choices=("added", "last_stage"),
                        help="added (default, the paper's): a 3x3 target conv after the backbone, its MACs in "
                             "metrics.json; last_stage: the backbone's last stage (no added layer, no extra MACs)")
    parser.add_argument("--filters", type=int,
                        help="filters N of the added target conv (default round(12.8 K): 128 for 10 classes)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 128)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="PICNN: class-specific filter clusters.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train PICNN (resumes from OUT/checkpoint.pt)")
    train.add_argument("--config", help="JSON recipe (see picnn/configs); flags given here override it")
    train.add_argument("--backbone", help=f"one of {', '.join(list_backbones())} (default resnet20)")
    train.add_argument("--dataset", help="dataset name for common.data (default cifar10)")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True, data=True)
    add_budget_arguments(train, epochs=None)
    train.add_argument("--seconds", dest="budget_seconds", type=float, help=argparse.SUPPRESS)  # older spelling
    train.add_argument("--val-fraction", type=float,
                       help="share of the training set held out when --val-source is train (default 0.1)")
    _settings_arguments(train)
    train.add_argument("--assignment", choices=("bernoulli", "gumbel"), help="filter-cluster sampler")
    train.add_argument("--cluster-index", choices=("pseudo", "label"),
                       help="index P with the pseudo-label (Eq. 8-10) or the true label (trivial solution)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    train.add_argument("--p-lr", type=float, help="learning rate of P (default: --lr)")
    train.add_argument("--backbone-lr-scale", type=float, help="backbone lr = lr * this (default 1)")
    train.add_argument("--mis-samples", type=int, help="test images used for MIS (default all)")
    add_precision_argument(train, default=None)  # None: the config's settings.precision (default auto)
    # None: the --config file's seed and split, else 0 and auto (test-half with --weights)
    train.set_defaults(seed=None, val_source=None)

    evaluate = sub.add_parser("evaluate", help="ACC1/ACC2/ACC3, MIS, MACs and params on the test set")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--data-root", help="dataset root (default: the one used for training)")
    add_common_arguments(evaluate, seed=False)
    evaluate.add_argument("--draws", type=int, help="Bernoulli draws averaged for ACC2/ACC3 (default 5)")
    evaluate.add_argument("--mis-samples", type=int, help="test images used for MIS (default: the run's setting)")
    add_precision_argument(evaluate, default=None)  # None: the run's settings.precision

    explain = sub.add_parser("explain", help="class-cluster Grad-CAM (Fig. 7) and the heatmap of P (Fig. 1)")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--out", dest="figure", required=True, help="output .png")
    explain.add_argument("--data-root", help="dataset root (default: the one used for training)")
    add_common_arguments(explain, seed=False)
    explain.add_argument("--images", type=int, default=5, help="test images shown, one per class (default 5)")

    overhead = sub.add_parser("overhead", help="seconds per training step, PICNN vs the plain backbone, "
                                               "timed side by side in one process")
    overhead.add_argument("--config", help="JSON recipe (see picnn/configs); flags given here override it")
    overhead.add_argument("--backbone", help="backbone name (default resnet20)")
    overhead.add_argument("--dataset", help="dataset name (default cifar10)")
    add_common_arguments(overhead, weights=True, overrides=True, data=True)
    _settings_arguments(overhead)
    overhead.add_argument("--steps", type=int, default=30, help="timed steps of each model (default 30)")
    overhead.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps of each (default 3)")
    overhead.add_argument("--out", dest="result", help="write the result to this .json file too")
    add_precision_argument(overhead, default=None)
    overhead.set_defaults(seed=None)
    return parser


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < --config file < explicit flags < --set; then the shared checks of common.cli (budget,
    the --weights policy, --val-source)."""
    config: dict[str, Any] = {"backbone": "resnet20", "dataset": "cifar10", "epochs": 1.0, "max_batches": None,
                              "seconds": None, "weights": None, "val_fraction": 0.1, "val_source": "auto",
                              "seed": 0, "settings": {}}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        recipe = read_json(path)
        unknown = sorted(set(recipe) - set(config) - {"description"})
        if unknown:
            raise ValueError(f"--config {path}: unknown key(s) {unknown}; known: {sorted(config)}")
        config.update({k: v for k, v in recipe.items() if k != "settings"})
        config["settings"] = dict(recipe.get("settings", {}))
    flags = {key: getattr(args, key, None) for key in (*RUN_KEYS, "seed")}
    flags["seconds"] = getattr(args, "budget_seconds", None)
    config.update({key: value for key, value in flags.items() if value is not None})
    for key in SETTING_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            config["settings"][key] = value
    settings = apply_overrides(PicnnSettings.from_dict(config["settings"]), getattr(args, "set", []))
    settings.validate()
    config["settings"] = settings.to_dict()
    check_budget(config["epochs"], config["max_batches"], config["seconds"])
    # One policy for a missing --weights (common.cli.require_weights); a recipe's "weights" counts as given.
    # The file itself is checked with the data (gather_inputs): one message lists everything missing.
    require_weights(_weights_args(args, config), must_exist=False)
    if config["val_source"] not in ("auto", *VAL_SOURCES):
        raise CLIError(f"--val-source must be auto or one of {', '.join(VAL_SOURCES)}, got {config['val_source']!r}")
    config["val_source"] = resolve_val_source(config["val_source"], pretrained=config["weights"] is not None)
    if config["backbone"] not in list_backbones():
        raise CLIError(f"--backbone: unknown backbone {config['backbone']!r}; choose one of "
                       f"{', '.join(list_backbones())}")
    return config


def _weights_args(args: argparse.Namespace, config: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(weights=config["weights"], from_scratch=getattr(args, "from_scratch", False))


def _inputs(args: argparse.Namespace, config: dict[str, Any], **split: Any):
    """The dataset, after checking the weights file and the data together (one message for all missing)."""
    _weights, data = gather_inputs(
        lambda: require_weights(_weights_args(args, config)),
        lambda: load_dataset(config["dataset"], args.data_root, seed=0, val_source=config["val_source"],
                             download=args.download, **split),
        what=f"{PROG} {args.command}")
    return data


def cmd_train(args: argparse.Namespace) -> None:
    config = _run_config(args)
    config["data_root"] = args.data_root
    # Checked before anything is loaded or created: a refused or failed run leaves no folder behind.
    fix = "pass a new --out to keep the old run, or delete it to train this config there"
    check_config(args.out, config, what="--out", fix=fix, ignore=NOT_IDENTITY)
    settings = PicnnSettings.from_dict(config["settings"])
    device = pick_device(args.device)
    seed_everything(config["seed"])
    data = _inputs(args, config, val_fraction=config["val_fraction"])
    model = build_picnn(config["backbone"], data.num_classes, settings.filters, config["weights"],
                        target_layer=settings.target_layer)
    run = RunDir(args.out)
    run.claim(config, what="--out", fix=fix, ignore=NOT_IDENTITY)
    run.write_environment(device)
    budget = Budget(epochs=config["epochs"], seconds=config["seconds"], max_batches=config["max_batches"])
    report = train_picnn(model, data, budget, run, settings, device, config["seed"])
    save_model(model, run, {"backbone": config["backbone"], "num_classes": data.num_classes,
                            "filters": model.filters, "added_target_conv": model.added_target_conv,
                            "target_layer": settings.target_layer, "dataset": config["dataset"],
                            "best_step": report.best_step, "steps": report.steps,
                            "train_seconds": report.train_seconds})
    print(json.dumps({"steps": report.steps, "total_steps": report.total_steps,
                      "best_val_acc1": report.best_val_acc1, "best_step": report.best_step,
                      "train_seconds": round(report.train_seconds, 1),
                      "stopped_on_time": report.stopped_on_time}, indent=2))


def _load_run(args: argparse.Namespace):
    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"--run {args.run} does not exist; train into it first")
    run = RunDir(args.run)
    config = run.read_config()
    device = pick_device(args.device)
    model, _meta = load_model(run, device)
    root = args.data_root if args.data_root is not None else config.get("data_root")
    data = load_dataset(config["dataset"], root, val_fraction=config.get("val_fraction", 0.1), seed=0,
                        val_source=config.get("val_source", "train"))
    return run, config, model, data, device


def cmd_evaluate(args: argparse.Namespace) -> None:
    check_positive(args.draws, "--draws")
    check_positive(args.mis_samples, "--mis-samples")
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
    check_positive(args.images, "--images")
    _run, _config, model, data, _device = _load_run(args)
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
    path = save_explanation_figure(model, images, labels[index], data.classes, args.figure)
    print(f"wrote {path}")


def cmd_overhead(args: argparse.Namespace) -> None:
    check_positive(args.steps, "--steps")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    config = _run_config(args)
    settings = PicnnSettings.from_dict(config["settings"])
    device = pick_device(args.device)
    seed_everything(config["seed"])
    data = _inputs(args, config)
    model = build_picnn(config["backbone"], data.num_classes, settings.filters, config["weights"],
                        target_layer=settings.target_layer)
    plain = build_backbone(config["backbone"], data.num_classes, config["weights"])
    loader = BatchLoader(data.train, settings.batch_size, train=True, device=device, augment=settings.augment,
                         seed=config["seed"])
    batches = list(itertools.islice(iter(loader), args.steps + args.warmup))
    if len(batches) < args.steps + args.warmup:
        raise ValueError(f"the training split has only {len(batches)} batches of {settings.batch_size}")
    result = step_overhead(model, plain, batches, settings, device, warmup=args.warmup)
    result.update(backbone=config["backbone"], dataset=config["dataset"], lam=settings.lam,
                  filters=model.filters, added_target_conv=model.added_target_conv)
    if args.result:
        atomic_write_json(result, args.result)
    print(json.dumps(result, indent=2))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain, "overhead": cmd_overhead}


def _run(argv: Sequence[str] | None) -> int:
    from common.cli import command_scope

    args = parse_args(_parser(), argv)  # seeds, sets --threads, checks budget / device / --out / --set first
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        COMMANDS[args.command](args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Known errors (bad flags, missing data or weights, a changed config) are one line on stderr, exit 2;
    Ctrl-C is one line, exit 130 (common.cli.main_guard)."""
    return main_guard(_run, argv, prog=PROG, extra_errors=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
