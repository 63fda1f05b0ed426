"""Command line: ``python -m picnn {train,evaluate,explain,overhead}`` (``build_parser``, ``main``); see the README."""

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
    add_run_arguments,
    apply_overrides,
    check_budget,
    check_positive,
    gather_inputs,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
    retell,
)
from common.data import BatchLoader, DatasetSplits, load_dataset
from common.method import Budget, read_recipe_file
from common.precision import add_precision_argument, resolve_precision
from common.run import RunDir, atomic_write_json, check_config, pick_device, read_json, seed_everything

from .config import PicnnSettings
from .evaluate import evaluate_picnn
from .explain import picks_by_class, save_explanation_figure
from .model import PicnnNet
from .train import build_picnn, load_run, save_model, step_overhead, train_picnn

PROG = "python -m picnn"
COMMANDS = ("train", "evaluate", "explain", "overhead")
# Command-line flag -> PicnnSettings field, for the settings that are worth a flag (--set reaches every field).
SETTING_FLAGS = {"lam": float, "assignment": str, "cluster_index": str, "lr": float, "p_lr": float,
                 "backbone_lr_scale": float, "batch_size": int, "target_layer": str, "filters": int,
                 "mis_samples": int, "precision": str}
RUN_KEYS = ("backbone", "dataset", "epochs", "max_batches", "seconds", "weights", "val_fraction", "val_source")
# The one layout of a recipe (picnn/configs/*.json).
# config.json keys that describe a run without changing what it computes: a resumed run may change them
# (a larger time budget continues a run that stopped on time). Everything else is the run's identity: a
# checkpoint is resumed only into the config that wrote it.
NOT_IDENTITY = ("seconds", "data_root")
RUN_VAL_SOURCE_HELP = ("the validation split, which decides the test images used: auto (the run's own, recorded in "
                       "its config.json), train (a hold-out of the training set: the whole test set is used) or "
                       "test-half (half of the test set: the other half is used)")


def _settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lam", type=float, help="lambda of Eq. 3 (default 2; 0 = the plain STD model)")
    parser.add_argument("--target-layer", choices=("added", "last_stage"),
                        help="added (default, the paper's): a 3x3 target conv after the backbone, its MACs in "
                             "metrics.json; last_stage: the backbone's last stage (no added layer, no extra MACs)")
    parser.add_argument("--filters", type=int,
                        help="filters N of the added target conv (default round(12.8 K): 128 for 10 classes)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 128)")


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON recipe (picnn/configs/*.json: description, backbone, dataset, epochs, "
                                         "settings); flags given here override it, --set applies last")
    parser.add_argument("--backbone", help=f"one of {', '.join(list_backbones())} (default: the recipe's, else "
                                           "resnet20)")
    parser.add_argument("--dataset", help="dataset name for common.data (default: the recipe's, else cifar10)")


def build_parser() -> argparse.ArgumentParser:
    """The full parser: ``train``, ``evaluate``, ``explain`` and ``overhead``, on common.cli's shared flags."""
    parser = argparse.ArgumentParser(prog=PROG, description="PICNN (Guo, Yang et al., AAAI 2024): class-specific "
                                                            "filter clusters through a learnable filter-class "
                                                            "correspondence matrix P (see picnn/README.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    train = sub.add_parser("train", help="train PICNN from a backbone (resumes from OUT/checkpoint.pt)")
    _recipe_arguments(train)
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True, data=True)
    add_budget_arguments(train, epochs=None)
    retell(train, "epochs", help="passes over the training set (default: the recipe's epochs, else 1)")
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
    retell(train, "precision", help="compute precision of training and evaluation: auto (bf16 where the device has "
                                    "native bf16, else fp32), fp32 or bf16 (default: the settings' precision, auto)")
    # None: the --config file's seed and split, else 0 and auto (test-half with --weights)
    train.set_defaults(seed=None, val_source=None)

    evaluate = sub.add_parser("evaluate", help="top-1 (ACC1), ACC2/ACC3, MIS, MACs and params of a run on its "
                                               "test split -> metrics.json")
    add_run_arguments(evaluate, images_help="test images evaluated: the first N of the reported split, which is "
                                            "class-interleaved (default: all of it)",
                      out_help="directory for metrics.json (default: --run)")
    retell(evaluate, "val_source", help=RUN_VAL_SOURCE_HELP)
    retell(evaluate, "precision", help="compute precision of the forward pass over the test images: auto (bf16 where "
                                       "the device has native bf16, else fp32), fp32 or bf16 (default: %(default)s); "
                                       "the metrics themselves in fp32")
    evaluate.add_argument("--draws", type=int, help="Bernoulli draws averaged for ACC2/ACC3 (default: the run's "
                                                    "eval_draws, 5)")
    evaluate.add_argument("--mis-samples", type=int, help="test images used for MIS, a seeded random subset of "
                                                          "those evaluated (default: the run's setting, all)")

    explain = sub.add_parser("explain", help="class-cluster Grad-CAM (Fig. 7) above the heatmap of P (Fig. 1) -> "
                                             "explain.png")
    add_run_arguments(explain, images=5, images_help="test images shown, one row each: the first of each class in "
                                                     "class order, then the second of each, ...",
                      out_help="directory for explain.png (default: --run)")
    retell(explain, "val_source", help=RUN_VAL_SOURCE_HELP)
    retell(explain, "precision", help="compute precision of the Grad-CAM passes: auto (bf16 where the device has "
                                      "native bf16, else fp32), fp32 or bf16 (default: %(default)s)")

    overhead = sub.add_parser("overhead", help="seconds per training step, PICNN vs the plain backbone, "
                                               "timed side by side in one process")
    _recipe_arguments(overhead)
    add_common_arguments(overhead, weights=True, overrides=True, data=True)
    _settings_arguments(overhead)
    overhead.add_argument("--steps", type=int, default=30, help="timed steps of each model (default 30)")
    overhead.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps of each (default 3)")
    overhead.add_argument("--out", dest="result", help="write the result to this .json file too")
    add_precision_argument(overhead, default=None)
    retell(overhead, "precision", help="compute precision of both models' steps: auto (bf16 where the device has "
                                       "native bf16, else fp32), fp32 or bf16 (default: the settings' precision, auto)")
    overhead.set_defaults(seed=None)
    return parser


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < --config recipe < explicit flags < --set; then the shared checks of common.cli (budget,
    the --weights policy, --val-source)."""
    config: dict[str, Any] = {"backbone": "resnet20", "dataset": "cifar10", "epochs": 1.0, "max_batches": None,
                              "seconds": None, "weights": None, "val_fraction": 0.1, "val_source": "auto",
                              "seed": 0, "settings": {}}
    if args.config:
        recipe = read_recipe_file(args.config)
        config.update(backbone=recipe["backbone"], dataset=recipe["dataset"], settings=dict(recipe["settings"]))
        if recipe["epochs"] is not None:
            config["epochs"] = recipe["epochs"]
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
    # One policy for a missing --weights (common.cli.require_weights). The file itself is checked with the data
    # (gather_inputs): one message lists everything missing.
    require_weights(_weights_args(args, config), must_exist=False)
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
                      "best_val_top1": report.best_val_top1, "best_step": report.best_step,
                      "train_seconds": round(report.train_seconds, 1),
                      "stopped_on_time": report.stopped_on_time}, indent=2))


def _open_run(args: argparse.Namespace) -> tuple[dict[str, Any], PicnnNet, DatasetSplits, torch.device]:
    """A trained run's config, network (``load_run``) and dataset; --val-source auto is the run's own split."""
    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"--run {args.run} does not exist; train into it first")
    config = read_json(Path(args.run) / "config.json")
    device = pick_device(args.device)
    model = load_run(args.run, device=device)
    val_source = config.get("val_source", "train") if args.val_source == "auto" else args.val_source
    data = load_dataset(config["dataset"], args.data_root, val_fraction=config.get("val_fraction", 0.1), seed=0,
                        val_source=val_source, download=args.download)
    return config, model, data, device


def cmd_evaluate(args: argparse.Namespace) -> None:
    for value, flag in ((args.images, "--images"), (args.draws, "--draws"), (args.mis_samples, "--mis-samples")):
        check_positive(value, flag)
    config, model, data, device = _open_run(args)
    settings = PicnnSettings.from_dict(config.get("settings", {}))
    test, split_name = data.test, data.test_split_name
    if args.images is not None:
        if args.images > len(test):
            raise CLIError(f"--images {args.images}: the reported split has {len(test)} images")
        test, split_name = test.subset(range(args.images)), f"{split_name}, first {args.images} images"
    mis_samples = args.mis_samples if args.mis_samples is not None else settings.mis_samples
    metrics = evaluate_picnn(model, test, split_name=split_name, assignment=settings.assignment,
                             draws=args.draws or settings.eval_draws, mis_samples=mis_samples, device=device,
                             seed=config.get("seed", 0), precision=args.precision)
    metrics.update(val_source=data.val_source, lam=settings.lam)
    out = Path(args.out if args.out is not None else args.run)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics, out / "metrics.json")
    print(json.dumps(metrics, indent=2))


def cmd_explain(args: argparse.Namespace) -> None:
    check_positive(args.images, "--images")
    _config, model, data, device = _open_run(args)
    index = picks_by_class(data.test.labels, args.images, data.num_classes)
    policy = resolve_precision(args.precision, device)
    policy.prepare_model(model)
    images = data.test.images[index].float() / 255.0
    out = Path(args.out if args.out is not None else args.run)
    path = save_explanation_figure(model, images, data.test.labels[index], data.classes, out / "explain.png",
                                   policy)
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


def _run(argv: Sequence[str] | None) -> int:
    from common.cli import command_scope

    args = parse_args(build_parser(), argv)  # seeds, sets --threads, checks budget / device / --out / --set first
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain, "overhead": cmd_overhead}
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        commands[args.command](args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Known errors (bad flags, missing data or weights, a changed config) are one line on stderr, exit 2;
    Ctrl-C is one line, exit 130 (common.cli.main_guard)."""
    return main_guard(_run, argv, prog=PROG, extra_errors=(KeyError,))


if __name__ == "__main__":
    sys.exit(main())
