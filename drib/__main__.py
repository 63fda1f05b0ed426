"""The CLI: python -m drib {train, evaluate, explain, cost, seeds}."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.backbones import build_backbone, list_backbones
from common.cli import (
    CLIError,
    add_budget_arguments,
    add_common_arguments,
    add_run_arguments,
    apply_overrides,
    budget_from_args,
    check_positive,
    command_scope,
    gather_inputs,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
    retell,
)
from common.data import default_val_source, load_dataset
from common.precision import CHOICES, add_precision_argument, resolve_precision
from common.run import RunDir, check_config, pick_device

from .config import NOT_IDENTITY, DribSettings, read_recipe, run_identity

PROG = "python -m drib"
TRAIN_FIX = "pass a new --out to keep the old run, or delete it to train these settings there"
DEFAULT_BACKBONE, DEFAULT_DATASET, DEFAULT_EPOCHS = "resnet20", "cifar10", 1.0
COMMANDS = ("train", "evaluate", "explain", "cost", "seeds")
# cost's default settings: the benchmark main job's DRIB recipe (its cifar10-cpu preset: 50% target, batch 128)
COST_RECIPE = Path(__file__).parent / "configs" / "resnet20_cifar10_cpu.json"
MAIN_JOB_SETTINGS = ("target_mac_reduction=0.5", "train.batch_size=128")


def build_parser() -> argparse.ArgumentParser:
    """The full parser: ``train``, ``evaluate``, ``explain``, ``cost`` and ``seeds``, on common.cli's shared flags."""
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "DRIB: dynamic reasoning (per-sample channel selection) + information bottleneck verification."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    train = sub.add_parser("train", help="gate a pretrained backbone and train its decision modules (resumable)")
    train.add_argument("--config", default=None,
                       help="recipe JSON (drib/configs/*.json: description, backbone, dataset, epochs, settings); "
                            "--set applies on top of its settings")
    train.add_argument("--backbone", default=None, choices=list_backbones(),
                       help=f"backbone architecture (default: the recipe's, else {DEFAULT_BACKBONE})")
    train.add_argument("--dataset", default=None,
                       help=f"dataset name, see common.data.list_datasets (default: the recipe's, else "
                            f"{DEFAULT_DATASET})")
    add_common_arguments(train, weights=True, out=True, overrides=True, val_source=True, data=True,
                         out_help="run directory (resumes if it holds checkpoint.pt)")
    retell(train, "set", help="override one of DribSettings, e.g. target_mac_reduction=0.5 or, dotted into a section, "
                              "train.backbone_lr=0.02; repeatable; the value is checked against the key's type")
    add_budget_arguments(train, epochs=None)
    retell(train, "epochs", help=f"passes over the training set (default: the recipe's epochs, else "
                               f"{DEFAULT_EPOCHS:g})")
    add_precision_argument(train, default=None)
    retell(train, "precision", help="compute precision of the training forward passes: auto (bf16 where the device has "
                                    "native bf16, else fp32), fp32 or bf16 (default: the settings' train.precision)")

    evaluate = sub.add_parser("evaluate", help="write metrics.json: top-1, MACs, dynamism, static twin, IBA "
                                               "faithfulness, credibility")
    add_run_arguments(evaluate, images=200,
                      images_help="test images for the per-sample IBA metrics and credibility, a seeded random "
                                  "draw from the reported split (0 skips them)",
                      out_help="directory for metrics.json (default: --run)")
    add_common_arguments(evaluate, device=False, threads=False, seed=True)
    retell(evaluate, "precision", help="compute precision of the channel-skipping forward that gives top-1 and MACs: "
                                       "auto (bf16 where the device has native bf16, else fp32), fp32 or bf16 "
                                       "(default: %(default)s); IBA, credibility and the controls run in fp32")
    evaluate.add_argument("--no-compare", action="store_true",
                          help="skip the controls of the IBA map (Grad-CAM, random and centre maps)")
    evaluate.add_argument("--degradation-points", type=int, default=20,
                          help="points on each MoRF/LeRF curve of the degradation test (0 skips it; default 20)")
    evaluate.add_argument("--betas", default=None,
                          help="comma-separated beta sweep for credibility and its controls (default: the "
                               "settings' bottleneck.beta)")
    evaluate.add_argument("--thresholds", default=None,
                          help="comma-separated credibility thresholds for the in-the-loop verification "
                               "(default: bottleneck.verify_threshold, else 0.5,0.6)")
    evaluate.add_argument("--no-attribution", action="store_true",
                          help="skip the saliency metrics (credibility and its controls only)")
    evaluate.add_argument("--speed", action="store_true",
                          help="also time channel skipping against the dense start (batch 1 and 128)")
    evaluate.add_argument("--speed-repeats", type=int, default=20, help="timed rounds per form (median; default 20)")

    explain = sub.add_parser("explain", help="save input | IB heatmap | selected channels, one PNG per test image")
    add_run_arguments(explain, images=1,
                      images_help="test images to explain, one PNG each (explain_<i>.png): the first N of the "
                                  "reported split, which is class-interleaved",
                      out_help="directory for the PNGs (default: RUN/explain)")
    retell(explain, "precision", help="compute precision of the forward pass that gives the prediction and the "
                                      "selected channels: auto (bf16 where the device has native bf16, else fp32), "
                                      "fp32 or bf16 (default: %(default)s); IBA runs in fp32")
    cost = sub.add_parser("cost", help="training cost: DRIB's steps against cross-entropy steps of the same backbone, "
                                       "interleaved in one process, and the projected run with its MAC calibrations "
                                       "and validations; OUT/cost.json with --out")
    cost.add_argument("--config", default=None,
                      help="recipe JSON (default: drib/configs/resnet20_cifar10_cpu.json with "
                           f"{' and '.join(MAIN_JOB_SETTINGS)}, the benchmark main job's DRIB settings); --set "
                           "applies on top")
    add_common_arguments(cost, weights=True, out=True, overrides=True, val_source=True, data=True,
                         out_help="folder for cost.json (default: print only)")
    retell(cost, "set", help="override one of DribSettings, e.g. decision.alternate=true; repeatable")
    cost.set_defaults(threads=1)
    retell(cost, "threads", help="torch CPU threads (default 1)")
    add_precision_argument(cost, default=None)
    retell(cost, "precision", help="compute precision of DRIB's steps: auto, fp32 or bf16 (default: the settings' "
                                   "train.precision)")
    cost.add_argument("--baseline-precision", choices=CHOICES, default=None,
                      help="compute precision of the cross-entropy step (default: DRIB's; the benchmark's "
                           "baseline trains at auto)")
    cost.add_argument("--epochs", type=float, default=1.0,
                      help="epochs of the projected run (default 1, the main job's)")
    cost.add_argument("--steps", type=int, default=20, help="timed steps of each, interleaved (default 20)")
    cost.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    cost.add_argument("--separate-backward", action="store_true",
                      help="also time the former one-forward decision step (a backward of the whole loss for the "
                           "gates, then one of CE for the backbone)")
    seeds = sub.add_parser("seeds", help="DRIB beside its static twins over seeds (paired by seed), from each run's "
                                         "metrics.json; OUT/seeds.json and seeds.md with --out")
    seeds.add_argument("--run", action="extend", nargs="+", required=True,
                       help="DRIB runs evaluated by `python -m drib evaluate`, one per seed (runs/a_s{0,1,2}); "
                            "repeatable")
    seeds.add_argument("--static", action="extend", nargs="+", default=[],
                       help="the static networks (b) of the same seeds, in --run's order (--set decision.actions=1); "
                            "repeatable")
    seeds.add_argument("--out", default=None, help="folder for seeds.json and seeds.md (default: print only)")
    for command in (evaluate, explain):
        retell(command, "val_source", help="validation split of the run's dataset, which decides the reported split: "
                                           "auto (the one the run was trained with), train (hold-out of the training "
                                           "set, the test set reported) or test-half (the other half of the test set "
                                           "reported)")
    return parser


def _run_dataset(meta: dict, args: argparse.Namespace):
    """The dataset split of a trained run (its recorded val source unless --val-source overrides it)."""
    recorded = meta.get("val_source") or default_val_source(bool(meta.get("pretrained", True)))
    source = recorded if args.val_source == "auto" else args.val_source
    return load_dataset(meta["dataset"], args.data_root, download=args.download, val_source=source)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import train_run

    recipe = read_recipe(args.config) if args.config is not None else None
    backbone_name = args.backbone or (recipe.backbone if recipe else DEFAULT_BACKBONE)
    if backbone_name not in list_backbones():
        raise CLIError(f"--config {args.config}: unknown backbone {backbone_name!r}; known: "
                       f"{', '.join(list_backbones())}")
    dataset = args.dataset or (recipe.dataset if recipe else DEFAULT_DATASET)
    if args.epochs is None:
        args.epochs = recipe.epochs if recipe is not None and recipe.epochs is not None else DEFAULT_EPOCHS
    config = apply_overrides(recipe.settings if recipe else DribSettings(), args.set)
    if args.precision is not None:
        config.train.precision = args.precision
    config.validate()
    budget = budget_from_args(args)
    val_source = resolve_val_source(args.val_source, args.weights is not None)
    identity = run_identity(backbone_name, dataset, val_source, args.seed, budget, config, weights=args.weights)
    # Before anything is loaded or created: a resume never carries on under other settings, and a finished
    # run is never overwritten by other settings (the keys that differ are named).
    check_config(args.out, identity, what="--out", fix=TRAIN_FIX, ignore=NOT_IDENTITY)
    device = pick_device(args.device)
    weights, data = gather_inputs(
        lambda: require_weights(args),
        lambda: load_dataset(dataset, args.data_root, download=args.download, val_source=val_source),
        what=f"{PROG} train")
    backbone = build_backbone(backbone_name, num_classes=data.num_classes,
                              weights=None if weights is None else str(weights))
    run = RunDir(args.out)
    run.claim(identity, what="--out", fix=TRAIN_FIX, ignore=NOT_IDENTITY)
    run.write_environment(device)
    trained, seconds = train_run(backbone, backbone_name, data, budget, run.path, config, device, args.seed)
    print(f"trained {trained.meta['steps']} steps in {seconds:.0f} s; val top-1 {trained.meta['val_top1']:.2f}%, "
          f"val MAC fraction {trained.meta['val_mac_fraction']:.3f}; model at {run.model_path}")


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate, write_metrics
    from .train import load_trained

    if args.images is None or args.images < 0:
        raise CLIError(f"--images must be 0 or more, got {args.images!r}")
    betas, thresholds = _floats(args.betas, "--betas"), _floats(args.thresholds, "--thresholds")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    trained = load_trained(args.run, device)
    data = _run_dataset(trained.meta, args)
    metrics = evaluate(trained, data, device, subset=args.images, seed=args.seed, compare=not args.no_compare,
                       degradation_points=args.degradation_points, betas=betas, speed=args.speed,
                       thresholds=thresholds, attribution=not args.no_attribution, speed_repeats=args.speed_repeats,
                       precision=precision)
    out = Path(args.out) if args.out is not None else Path(args.run)
    write_metrics(out, metrics)
    print(f"{metrics['split']}: top-1 {metrics['top1']:.2f}%  MACs {metrics['macs'] / 1e6:.2f}M of "
          f"{metrics['macs_dense'] / 1e6:.2f}M ({100 * metrics['mac_reduction']:.1f}% fewer, {metrics['precision']})"
          + (f"  credibility {metrics['credibility_own']:.3f} (random {metrics['credibility_random']:.3f}, "
             f"oracle {metrics['credibility_oracle']:.3f}; accepted: {metrics['credibility_accepted']})"
             if "credibility_own" in metrics else "") + f"; wrote {out / 'metrics.json'}")


def cmd_explain(args: argparse.Namespace) -> None:
    from .explain import explain_figure
    from .train import load_trained

    check_positive(args.images, "--images")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    trained = load_trained(args.run, device)
    data = _run_dataset(trained.meta, args)
    if args.images > len(data.test):
        raise CLIError(f"--images must be at most {len(data.test)} (the reported split), got {args.images}")
    out = Path(args.out) if args.out is not None else Path(args.run) / "explain"
    for index in range(args.images):
        png = out / f"explain_{index}.png"
        shown = explain_figure(trained, data, index, png, device, precision)
        print(f"wrote {png}: {shown}")


def cmd_cost(args: argparse.Namespace) -> None:
    from common.run import atomic_write_json

    from .cost import training_cost

    check_positive(args.steps, "--steps")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be 0 or more, got {args.warmup}")
    recipe = read_recipe(args.config if args.config is not None else COST_RECIPE)
    defaults = list(MAIN_JOB_SETTINGS) if args.config is None else []
    config = apply_overrides(recipe.settings, [*defaults, *args.set])
    if args.precision is not None:
        config.train.precision = args.precision
    config.validate()
    if args.separate_backward and config.decision.alternate:
        raise CLIError("--separate-backward times the one-forward step: it needs decision.alternate=false")
    device = pick_device(args.device)
    val_source = resolve_val_source(args.val_source, args.weights is not None)
    weights, data = gather_inputs(
        lambda: require_weights(args),
        lambda: load_dataset(recipe.dataset, args.data_root, download=args.download, val_source=val_source),
        what=f"{PROG} cost")
    report = training_cost(recipe.backbone, None if weights is None else str(weights), data, config, device,
                           steps=args.steps, warmup=args.warmup, epochs=args.epochs, seed=args.seed,
                           baseline_precision=args.baseline_precision, separate_backward=args.separate_backward)
    report = {"backbone": recipe.backbone, "dataset": recipe.dataset, "val_source": val_source, **report}
    for key, value in report.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if args.out is not None:
        path = Path(args.out) / "cost.json"
        atomic_write_json(report, path)
        print(f"wrote {path}")


def cmd_seeds(args: argparse.Namespace) -> None:
    from common.run import atomic_write_json, atomic_write_text

    from .seeds import render_markdown, seeds_table

    try:
        table = seeds_table(args.run, args.static)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise CLIError(f"seeds: {error}") from None
    text = render_markdown(table)
    print(text, end="")
    if args.out is not None:
        atomic_write_json(table, Path(args.out) / "seeds.json")
        atomic_write_text(text, Path(args.out) / "seeds.md")
        print(f"wrote {Path(args.out) / 'seeds.json'} and seeds.md")


def _run(argv: list[str] | None) -> None:
    args = parse_args(build_parser(), argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain, "cost": cmd_cost,
                "seeds": cmd_seeds}
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """The CLI's entry: runs one command; a known error is one line on stderr and exit code 2."""
    return main_guard(_run, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
