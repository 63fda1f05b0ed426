"""Command line: ``python -m decoupling {train,evaluate,static-twin,speed,cost,explain} ...`` (see
decoupling/README.md).

Built on ``common.cli``'s shared flags (``--device``, ``--threads``, ``--seed``, ``--weights`` /
``--from-scratch``, ``--out``, ``--set KEY=VALUE`` over ``config.DecouplingSettings``, ``--val-source``,
the budget flags and ``--precision``; ``evaluate`` and ``explain`` take ``common.cli.add_run_arguments``);
every known error is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from common.cli import (
    add_budget_arguments,
    add_common_arguments,
    add_run_arguments,
    apply_overrides,
    check_budget,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
    retell,
)
from common.precision import add_precision_argument

PROG = "python -m decoupling"
COMMANDS = ("train", "evaluate", "static-twin", "speed", "cost", "explain")
CALIBRATION_SEED = 0  # the class-mixed draw of the calibration images that freeze the deployed states


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every subcommand with its flags."""
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "Interpretable Neural Network Decoupling (Li et al., ECCV 2020): architecture controlling modules "
        "with Improved SemHash select a calculation path of filters for every input."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    train = sub.add_parser("train", help="fine-tune a pretrained backbone into a decoupled network; writes "
                           "OUT/model.pt (the deployed network)")
    train.add_argument("--backbone", help="resnet20/32/44/56/110, resnet18 or vgg16 (default: from --config)")
    train.add_argument("--dataset", help="digits, cifar10, cifar100, ... (default: from --config)")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True, data=True)
    add_precision_argument(train, default=None)  # None: the config's precision setting (default auto)
    retell(train, "precision", help="compute precision of training: auto (bf16 where the device has native bf16, else "
                                    "fp32), fp32 or bf16 (default: the settings' precision, auto)")
    add_budget_arguments(train, epochs=None)
    retell(train, "epochs", help="passes over the training set (default: the --config's epochs)")
    train.add_argument("--config", help="JSON recipe with description, backbone, dataset, epochs and settings "
                       "(a dict over config.DecouplingSettings), e.g. decoupling/configs/resnet20_cifar10_cpu.json")

    evaluate = sub.add_parser("evaluate", help="measure a trained run; writes OUT/metrics.json "
                              "(OUT/metrics_val.json with --split val)")
    _run_arguments(evaluate, images_help="images to measure on: a class-interleaved prefix of the reported split "
                   "(default: the whole split)", out_help="folder for metrics.json / metrics_val.json (default: "
                   "the --run folder)")
    evaluate.add_argument("--split", choices=("test", "val"), default="test",
                          help="report on the test split (default; the held-out half for a published start) "
                               "or on the validation split only (recipe selection)")
    evaluate.add_argument("--calibration-images", type=int, default=None,
                          help="freeze the filter states again on this many class-mixed training images "
                               "(default: the states frozen at the end of training, on the settings' "
                               "calibration_images)")
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
    evaluate.add_argument("--adv-test-per-class", type=int, default=10,
                          help="reported-split images per class for the AUC (default 10)")
    evaluate.add_argument("--adv-classifiers", default="random_forest,adaboost,gradient_boosting",
                          help="detectors, comma-separated")

    twin = sub.add_parser("static-twin", help="the static twin of a trained run (every dynamic filter fixed to its "
                          "majority state), as it is and fine-tuned for the run's budget; writes "
                          "RUN/static_twin/{metrics.json,model.pt}")
    _run_flags(twin)
    twin.add_argument("--calibration-images", type=int, default=None,
                      help="class-mixed training images the states are counted on (default: the run's "
                           "calibration_images setting, as at the end of training)")
    twin.add_argument("--threshold", default="0.5",
                      help="a filter is on in the twin where it fires on more than this share (default 0.5, the "
                           "majority), or 'macs': the threshold whose twin costs the decoupled network's mean MACs "
                           "(written to RUN/static_twin_macs/)")
    twin.add_argument("--no-finetune", action="store_true", help="only the twin as it is (no training)")

    speed = sub.add_parser("speed", help="CPU time of the deployed network against the dense start, and the MACs "
                           "it executes against the reported ones; writes RUN/speed.json")
    _run_flags(speed, precision=False)  # the timed forms and the MAC counts run fp32
    speed.add_argument("--calibration-images", type=int, default=None,
                       help="freeze the filter states again on this many class-mixed training images (default: "
                            "the states frozen at the end of training)")
    speed.add_argument("--latency-images", type=int, default=256,
                       help="class-mixed test images timed (default 256)")
    speed.add_argument("--speed-repeats", type=int, default=21, help="timed repetitions per batch size (default 21)")

    cost = sub.add_parser("cost", help="training cost: Decoupling steps (Eq. 12) against cross-entropy steps of the "
                          "same backbone, interleaved in one process, and the post-training calibration")
    cost.add_argument("--config", required=True, help="JSON recipe (description, backbone, dataset, epochs, "
                      "settings), as train's")
    add_common_arguments(cost, weights=True, overrides=True, val_source=True, data=True)
    add_precision_argument(cost, default=None)
    retell(cost, "precision", help="compute precision of the timed steps: auto, fp32 or bf16 (default: the settings' "
                                   "precision, auto)")
    cost.add_argument("--steps", type=int, default=20, help="timed steps of each, interleaved (default 20)")

    explain = sub.add_parser("explain", help="figures of filter states, calculation paths and an occlusion; writes "
                             "OUT/explain.png, OUT/explain_paths.npz and OUT/explain_decision_tree.txt")
    _run_arguments(explain, images=500, images_help="reported-split images whose paths are drawn, the same number "
                   "from every class (a random draw per class)",
                   out_help="folder for explain.png, explain_paths.npz and explain_decision_tree.txt (default: "
                            "the --run folder)")
    explain.add_argument("--seed", type=int, default=0, help="random seed for t-SNE and the image choice (default 0)")
    return parser


def _run_arguments(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``common.cli.add_run_arguments``, with the run's own precision and validation split as defaults."""
    add_run_arguments(parser, **kwargs)
    retell(parser, "precision", default=None,
            help="compute precision of the path figures (top-1 and MACs are always of the fp32 deployed network): "
                 "auto (bf16 where the device has native bf16, else fp32), fp32 or bf16 (default: the run's "
                 "precision setting)")
    retell(parser, "val_source", help="validation split: auto (default: the one the run was trained with), train "
                                      "(hold-out of the training set) or test-half (half of the test set; the other "
                                      "half is reported)")
    retell(parser, "data_root", help="dataset root (default: the run's, else $DATA_ROOT, else ./data)")


def _run_flags(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """The flags of the commands that read and extend a run (static-twin, speed)."""
    parser.add_argument("--run", required=True, help="a run directory written by this package's train command")
    parser.add_argument("--data-root", help="dataset root (default: the run's, else $DATA_ROOT, else ./data)")
    add_common_arguments(parser, seed=False)
    if precision:
        add_precision_argument(parser, default=None)
        retell(parser, "precision", help="precision of the static twin's fine-tuning: auto, fp32 or bf16 (default: the "
                                         "run's precision setting); top-1 and MACs are of the fp32 deployed network")


def _train(args: argparse.Namespace) -> int:
    import torch  # noqa: F401  (imported late: --help stays fast)

    from common.backbones import build_backbone
    from common.data import load_dataset
    from common.method import Budget
    from common.run import RunDir, check_config, pick_device

    from .config import DecouplingSettings, load_recipe
    from .evaluate import freeze_for_deployment
    from .model import DecoupledNet, save_decoupled
    from .train import build_objective, train_decoupled

    recipe = load_recipe(args.config)
    backbone = args.backbone or recipe.get("backbone")
    dataset = args.dataset or recipe.get("dataset")
    epochs = args.epochs if args.epochs is not None else recipe.get("epochs")
    if not backbone or not dataset or epochs is None:
        raise ValueError("train needs --backbone, --dataset and --epochs (or a --config that sets them)")
    seconds, max_batches = args.budget_seconds, args.max_batches
    check_budget(epochs=epochs, max_batches=max_batches, seconds=seconds)
    settings = apply_overrides(DecouplingSettings.from_dict(recipe.get("settings", {})), args.set)
    if args.precision is not None:
        settings = dataclasses.replace(settings, precision=args.precision)
    settings = DecouplingSettings.from_dict(settings.to_dict()).resolved(backbone)  # validated after --set
    device = pick_device(args.device)
    weights = require_weights(args)
    val_source = resolve_val_source(args.val_source, pretrained=weights is not None)
    data = load_dataset(dataset, args.data_root, val_source=val_source, download=args.download)
    run = RunDir(args.out)
    config = {"backbone": backbone, "dataset": dataset, "data_root": args.data_root,
              "weights": None if weights is None else str(weights), "val_source": val_source,
              "epochs": epochs, "seconds": seconds, "max_batches": max_batches, "seed": args.seed,
              "settings": settings.to_dict()}
    if run.checkpoint_path.is_file():  # a checkpoint resumes only into the config that wrote it
        check_config(run.path, config, what="--out " + str(run.path), ignore=("data_root", "seconds"))
    run.write_config(config)
    run.write_environment(device)
    logger = run.logger("decoupling")
    start = build_backbone(backbone, data.num_classes, None if weights is None else str(weights))
    model = DecoupledNet(start, settings.reduction, settings.init_bias, settings.controller_init)
    objective = build_objective(model, data.num_classes, settings, (3, *data.image_size))
    logger.info("decoupling %s on %s: %d gated layers, %d filters", backbone, dataset, len(model.gated_layers),
                sum(model.layer_channels))
    outcome = train_decoupled(model, objective, data, Budget(epochs, seconds, max_batches), run, settings, device,
                              args.seed, logger)
    # The deployed network (what load_run and evaluate measure): states frozen on the calibration images.
    _, deployment = freeze_for_deployment(model, data.train, settings.calibration_images, device, CALIBRATION_SEED)
    save_decoupled(model, run.model_path, backbone, data.num_classes, settings.reduction, settings.init_bias,
                   settings.controller_init, deployment)
    logger.info("trained %d/%d steps in %.1f s%s; filter states frozen on %d training images", outcome.steps,
                outcome.total_steps, outcome.train_seconds, " (time budget reached)" if outcome.stopped_by_time else "",
                deployment["calibration_images"])
    print(f"trained {outcome.steps}/{outcome.total_steps} steps in {outcome.train_seconds:.1f} s; "
          f"model in {run.model_path}")
    return 0


def _load_run(args: argparse.Namespace, calibration_images: int | None = None) -> tuple[Any, ...]:
    """(run, deployed model, its deployment record, dense start, data, device, precision) of ``--run``: the
    network ``load_run`` returns, its states frozen again on ``calibration_images`` training images if given."""
    from common.backbones import build_backbone
    from common.data import load_dataset
    from common.run import RunDir, pick_device

    from .evaluate import freeze_for_deployment
    from .model import load_decoupled, run_model_file

    run = RunDir(args.run)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a run directory (no config.json); train into it first")
    config = run.read_config()
    file = run_model_file(run.path)
    device = pick_device(args.device)
    model, meta = load_decoupled(file, device)  # what load_run returns, with the file's record
    model.to(device)
    settings = config.get("settings", {})
    val_source = getattr(args, "val_source", "auto")
    data = load_dataset(config["dataset"], args.data_root or config.get("data_root"),
                        val_source=config.get("val_source", "train") if val_source in (None, "auto") else val_source,
                        download=getattr(args, "download", False))
    deployment = dict(meta.get("deployment") or {})
    if calibration_images is not None or not model.deployed:  # a run trained before states were frozen in it
        n = calibration_images if calibration_images is not None else settings.get("calibration_images", 2000)
        _, deployment = freeze_for_deployment(model, data.train, n, device, CALIBRATION_SEED)
    dense = build_backbone(meta["backbone"], meta["num_classes"], config.get("weights"))  # the start (control)
    precision = getattr(args, "precision", None) or settings.get("precision", "auto")
    return run, model, deployment, dense, data, device, precision


def _evaluate(args: argparse.Namespace) -> int:
    from common.run import atomic_write_json

    from .evaluate import evaluate_run

    try:
        shots = tuple(int(k) for k in args.adv_shots.split(","))
    except ValueError:
        raise ValueError(f"--adv-shots expects comma-separated integers, got {args.adv_shots!r}") from None
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    run, model, deployment, dense, data, device, precision = _load_run(args, args.calibration_images)
    if args.images is not None:  # a class-interleaved prefix of the reported split
        which = "test" if args.split == "test" else "val"
        split = getattr(data, which)
        data = dataclasses.replace(data, **{which: split.subset(range(min(args.images, len(split))))})
    target = run.read_config().get("settings", {}).get("target_mac_reduction")
    metrics = evaluate_run(model, dense, data, device, deployment=deployment, report_split=args.split,
                           probe_fit_images=args.probe_fit_images, seeds=args.seeds, adv_runs=args.adv_runs,
                           adv_shots=shots, adv_test_per_class=args.adv_test_per_class,
                           adv_classifiers=args.adv_classifiers.split(","), latency_images=args.latency_images,
                           speed_repeats=args.speed_repeats, precision=precision, target_mac_reduction=target)
    out = Path(args.out) if args.out is not None else run.path
    name = "metrics.json" if args.split == "test" else "metrics_val.json"  # selection never overwrites
    atomic_write_json(metrics, out / name)
    keys = ("top1", "val_top1", "mac_reduction", "val_mac_reduction", "dynamic_filters")
    print(f"{metrics['split']}: " + " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
          + ("" if target is None else f" target_mac_reduction={target:g}"))
    print(f"metrics in {out / name}")
    return 0


def _static_twin(args: argparse.Namespace) -> int:
    from common.data import BatchLoader
    from common.macs import count_macs, count_params
    from common.method import Budget, shared_metrics
    from common.run import RunDir, atomic_write_json

    from .config import DecouplingSettings
    from .evaluate import calibration_codes
    from .model import save_decoupled
    from .train import class_mixed_indices
    from .twin import TWIN_DIR, finetune_static_twin, static_twin, twin_report

    run, model, _deployment, dense, data, device, precision = _load_run(args)
    config = run.read_config()
    settings = DecouplingSettings.from_dict(config.get("settings", {}))
    if precision != settings.precision:
        settings = dataclasses.replace(settings, precision=precision)
    n = args.calibration_images if args.calibration_images is not None else settings.calibration_images
    codes = calibration_codes(model, data.train, n, device, CALIBRATION_SEED)  # the images training froze on
    size = (3, *data.image_size)
    model.freeze_states(codes)  # the deployed network: energetic and silent frozen, the rest dynamic
    if args.threshold == "macs":  # equal cost: the decoupled network's mean MACs on the calibration images
        from .evaluate import mean_dynamic_macs
        from .twin import macs_matched_threshold

        calibration = data.train.subset(class_mixed_indices(data.train.labels, len(codes), CALIBRATION_SEED))
        target = mean_dynamic_macs(model, BatchLoader(calibration, 256, train=False, device=device))
        threshold, folder = macs_matched_threshold(model, codes, target, size), TWIN_DIR + "_macs"
    else:
        try:
            threshold, folder = float(args.threshold), TWIN_DIR
        except ValueError:
            raise ValueError(f"--threshold must be a number in [0, 1) or 'macs', got {args.threshold!r}") from None
    twin = static_twin(model, codes, threshold)
    dense_macs = float(count_macs(dense.to(device), size))
    metrics: dict[str, Any] = {"val_source": data.val_source, "calibration_images": len(codes),
                               "threshold": threshold, "threshold_rule": args.threshold,
                               "as_is": twin_report(model, twin, data.test, data.val, device, dense_macs)}
    out = RunDir(run.path / folder)
    final = "as_is"
    if not args.no_finetune:
        budget = Budget(config["epochs"], config.get("seconds"), config.get("max_batches"))
        steps, seconds = finetune_static_twin(twin, data, budget, out, settings, device, config.get("seed", 0))
        metrics["finetuned"] = twin_report(model, twin, data.test, data.val, device, dense_macs)
        metrics["finetune_steps"], metrics["finetune_seconds"] = steps, seconds
        final = "finetuned"
    row = metrics[final]["twin"]  # the shared figures are of the twin in OUT/model.pt
    metrics = {**shared_metrics(top1=row["top1"], split=data.test_split_name, macs=row["macs"], dense_macs=dense_macs,
                                params=count_params(twin), precision="fp32",
                                target_mac_reduction=config.get("settings", {}).get("target_mac_reduction")),
               "variant": "static twin " + ("(fine-tuned)" if final == "finetuned" else "(as is)"), **metrics}
    save_decoupled(twin, out.model_path, config["backbone"], data.num_classes, settings.reduction,
                   settings.init_bias, settings.controller_init,
                   {"calibration_images": len(codes), "calibration_seed": CALIBRATION_SEED,
                    "static_twin_threshold": threshold})
    atomic_write_json(metrics, out.metrics_path)
    for key in ("as_is", "finetuned"):
        if key in metrics:
            rep = metrics[key]
            print(f"{key}: decoupled {rep['decoupled']['top1']:.2f}% at {100 * rep['decoupled']['mac_reduction']:.1f}% "
                  f"fewer MACs; twin {rep['twin']['top1']:.2f}% at {100 * rep['twin']['mac_reduction']:.1f}%; "
                  f"paired {rep['paired_decoupled_minus_twin']['difference']:+.2f} "
                  f"+- {rep['paired_decoupled_minus_twin']['se']:.2f} points")
    print(f"metrics in {out.metrics_path}")
    return 0


def _speed(args: argparse.Namespace) -> int:
    from common.run import atomic_write_json

    from .evaluate import speed_report, timing_images

    run, model, _deployment, dense, data, _device, _precision = _load_run(args, args.calibration_images)
    if type(model.backbone).__name__ != "CifarResNet":
        raise ValueError("the deployed fast execution exists for the CIFAR ResNets only")
    images = timing_images(data.test, min(args.latency_images, len(data.test)), 0)
    calibration = timing_images(data.train, min(200, len(data.train)), 2)
    batches = tuple(b for b in (1, 128) if b <= len(images))
    report = {"split": data.test_split_name, **speed_report(model.cpu(), dense.cpu(), images, batches,
                                                            args.speed_repeats, calibration)}
    atomic_write_json(report, run.path / "speed.json")
    for b in batches:
        print(f"batch {b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in report[f"ms_all_b{b}"].items())
              + f"; speedup {report[f'speedup_b{b}']:.2f}x")
    print(f"MACs per image: reported {report['macs_reported_per_image'] / 1e6:.3f} M, executed "
          + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in report["macs_executed_per_image"].items()))
    print(f"speed in {run.path / 'speed.json'}")
    return 0


def _cost(args: argparse.Namespace) -> int:
    from common.data import load_dataset
    from common.run import pick_device

    from .config import DecouplingSettings, load_recipe
    from .cost import training_cost

    recipe = load_recipe(args.config)
    settings = apply_overrides(DecouplingSettings.from_dict(recipe["settings"]), args.set)
    if args.precision is not None:
        settings = dataclasses.replace(settings, precision=args.precision)
    settings = DecouplingSettings.from_dict(settings.to_dict()).resolved(recipe["backbone"])
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    weights = require_weights(args)
    data = load_dataset(recipe["dataset"], args.data_root, download=args.download,
                        val_source=resolve_val_source(args.val_source, pretrained=weights is not None))
    report = training_cost(recipe["backbone"], None if weights is None else str(weights), data, settings,
                           pick_device(args.device), args.steps, args.seed)
    for key, value in report.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from common.precision import resolve_precision

    from .explain import explain_run

    run, model, _deployment, _dense, data, device, precision = _load_run(args)
    if args.images < data.num_classes:
        raise ValueError(f"--images must be at least the number of classes ({data.num_classes}), got {args.images}")
    model.freeze_states(None)  # the paper's figures are of the raw gates (Eq. 5), not of the frozen states
    model.set_precision(resolve_precision(precision, device))
    out = (Path(args.out) if args.out is not None else run.path) / "explain.png"
    print(explain_run(model, data, device, out, args.images // data.num_classes, args.seed))
    print(f"figure in {out}; paths and decision tree next to it")
    return 0


def run(argv: list[str] | None = None) -> int:
    from common.cli import command_scope

    args = parse_args(build_parser(), argv)
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        return {"train": _train, "evaluate": _evaluate, "static-twin": _static_twin, "speed": _speed, "cost": _cost,
                "explain": _explain}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    return main_guard(run, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
