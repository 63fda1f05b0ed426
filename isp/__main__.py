"""Command line: ``python -m isp train | evaluate | explain`` (see isp/README.md)."""

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
from common.method import Budget
from common.precision import add_precision_argument, resolve_precision
from common.run import RunDir, check_config, pick_device, read_json

from .config import ISPSettings
from .selector import Selector
from .train import STAGES, Pipeline, StageOrderError

PROG = "python -m isp"
# config.json keys that may change when a run is resumed; every other key is the run's identity.
NOT_IDENTITY = ("seconds", "data_root")
IDENTITY_FIX = "pass a new --out to keep the old run, or delete it to train this config there"


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that reopen a run directory: the shared device / threads / precision flags."""
    parser.add_argument("--run", required=True, help="run directory written by train")
    parser.add_argument("--data-root", default=None, help="override the dataset root stored in the run")
    add_common_arguments(parser, seed=False)
    add_precision_argument(parser, default=None)  # None: the run's own precision setting


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
    _run_flags(evaluate)

    explain = sub.add_parser("explain", help="saliency figure: original vs pruned selector")
    _run_flags(explain)
    explain.add_argument("--out", required=True, help="PNG file to write")
    explain.add_argument("--images", type=int, default=None, help="number of test images (rows)")

    sweep = sub.add_parser("sweep", help="the selector loss (Eq. 8) along sigma for a centred kernel, on the "
                                         "validation split, with the run's predictor")
    _run_flags(sweep)
    sweep.add_argument("--images", type=int, default=256, help="number of validation images")
    sweep.add_argument("--sigmas", type=float, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 16, 24, 64])
    sweep.add_argument("--tau", type=float, nargs="+", default=None,
                       help="mask temperatures to score with (default: the run's mask_tau)")
    sweep.add_argument("--samples", type=int, default=4, help="masks per image")

    blocks = sub.add_parser("blocks", help="time a 3x3 conv against its number of output channels (the table "
                                           "that chose the CPU channel block)")
    blocks.add_argument("--batch", type=int, default=128)
    blocks.add_argument("--repeats", type=int, default=20)
    add_common_arguments(blocks, device=False, seed=False)

    speed = sub.add_parser("speed", help="speedup vs MAC ratio of slim networks against the dense start, each in "
                                         "its fastest form (common.deploy), on class-mixed held-out images")
    speed.add_argument("--backbone", default="resnet20", choices=list_backbones())
    speed.add_argument("--widths", action="append", default=[], metavar="NAME=W1,W2,...",
                       help="a slim network: kept channels per prunable site (repeatable)")
    speed.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                       help="the fine-tuned slim network of a run directory (repeatable)")
    speed.add_argument("--dataset", default="cifar10")
    speed.add_argument("--data-root", default=None)
    speed.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    speed.add_argument("--repeats", type=int, default=20)
    speed.add_argument("--compile", default=None, choices=("jit", "inductor"))
    add_common_arguments(speed, device=False, seed=False)
    add_precision_argument(speed)  # bf16: every model is timed with bf16 weights (common.deploy)

    report = sub.add_parser("report", help="the selector's masks (kept fraction, centre spread) and its insertion "
                                           "/ ROAD beside Grad-CAM and random, on the held-out test split")
    _run_flags(report)
    report.add_argument("--images", type=int, default=500, help="class-mixed test images")

    compare = sub.add_parser("compare", help="two or more gate searches side by side (e.g. gamma1 vs gamma1 = 0): "
                                             "kept channels, top-1 and Grad-CAM drift of the slim networks")
    compare.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR", help="repeatable")
    compare.add_argument("--paired", action="append", default=[], metavar="[NAME=]DIR",
                         help="the other arm, one run per --run in the same seed order: per-pair kept-channel "
                              "differences and a paired t-test of every metric (e.g. gamma1 = 0 vs the default)")
    compare.add_argument("--images", type=int, default=500, help="class-mixed test images for the drift")
    compare.add_argument("--data-root", default=None)
    add_common_arguments(compare, seed=False)
    add_precision_argument(compare, default=None)
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


def _reopen(run_path: str, data_root: str | None, device_name: str | None, precision: str | None = None
            ) -> Pipeline:
    if not (Path(run_path) / "config.json").is_file():
        raise FileNotFoundError(f"{run_path} is not a run directory (no config.json); train into it first")
    run = RunDir(run_path)
    config = run.read_config()
    device = pick_device(device_name)
    root = data_root if data_root is not None else config.get("data_root")
    data = load_dataset(config["dataset"], root, val_source=config.get("val_source", "train"))
    budget = Budget(**config["budget"])
    classifier = build_backbone(config["backbone"], data.num_classes)
    settings = ISPSettings.from_dict(config["settings"])
    if precision is not None:  # --precision on a reopened run: how it is evaluated, not how it was trained
        settings = dataclasses.replace(settings, precision=precision)
    # The run's classifier.pt is the source of truth; this instance only supplies the architecture.
    return Pipeline(run.path, classifier, data, budget, settings, device, config.get("seed", 0),
                    backbone_name=config["backbone"])


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
    pipeline = _reopen(args.run, args.data_root, args.device, args.precision)
    pipeline.run("evaluate")
    print(f"metrics written to {pipeline.run_dir.metrics_path}")


def _explain(args: argparse.Namespace) -> None:
    from .explain import saliency_figure

    pipeline = _reopen(args.run, args.data_root, args.device, args.precision)
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


def _sweep(args: argparse.Namespace) -> None:
    from .evaluate import loss_along_sigma
    from .train import load_backbone

    pipeline = _reopen(args.run, args.data_root, args.device, args.precision)
    s = pipeline.settings
    predictor = load_backbone(pipeline._require("predictor"), pipeline.device, pipeline.input_size)
    # The first N validation images: splits come class-interleaved (common.data), so every class holds its share.
    images = pipeline.data.val.images[:args.images].float().div(255).to(pipeline.device)
    print(f"split: validation ({pipeline.data.val_source}), {len(images)} images; lambda1 {s.lambda1}, "
          f"lambda2 {s.lambda2}; predictor trained at mask_tau {s.mask_tau}")
    print("tau | sigma | KL | R | S | total")
    for tau in args.tau or [s.mask_tau]:
        for row in loss_along_sigma(pipeline.classifier, predictor, images, args.sigmas, tau=tau,
                                    lambda1=s.lambda1, lambda2=s.lambda2, samples=args.samples):
            print(f"{tau:g} | {row['sigma']:g} | {row['kl']:.3f} | {row['R']:.3f} | {row['S']:.3f} | "
                  f"{row['total']:.3f}")


def _blocks(args: argparse.Namespace) -> None:
    from .hardware import conv_output_channel_times, hardware_channel_block

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, block {hardware_channel_block('cpu')}, "
          f"{torch.get_num_threads()} thread(s), batch {args.batch}, median of {args.repeats}, interleaved")
    for in_channels, size, widths in ((16, 32, [4, 6, 8, 9, 12, 16]), (32, 16, [8, 12, 16, 17, 24, 32]),
                                      (64, 8, [16, 24, 32, 33, 48, 64])):
        times = conv_output_channel_times(in_channels, widths, size, args.batch, args.repeats)
        full = times[widths[-1]]
        print(f"3x3 conv {in_channels} -> c on {size}x{size}: " + ", ".join(
            f"c={c}: {times[c] / full:.2f}" for c in widths) + f"  (time / time at c={widths[-1]})")


def _named(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"expected NAME=VALUE, got {spec!r}")
    return name, value


def _speed(args: argparse.Namespace) -> None:
    from common.macs import count_macs
    from common.speed import class_mixed_images

    from .evaluate import slim_from_widths, speed_against_dense
    from .train import load_backbone

    data = load_dataset(args.dataset, args.data_root, val_source="test-half")
    models = {"dense": build_backbone(args.backbone, data.num_classes).eval()}
    for spec in args.widths:
        name, value = _named(spec)
        models[name] = slim_from_widths(args.backbone, [int(w) for w in value.split(",")], data.num_classes)
    for spec in args.run:
        name, value = _named(spec)
        models[name] = load_backbone(Path(value) / "model.pt", "cpu").eval()
    images = class_mixed_images(data.test, max(args.batch), seed=0)
    bf16 = resolve_precision(args.precision, "cpu").name == "bf16"
    timing = speed_against_dense(models, images, args.batch, args.repeats, args.compile, bf16=bf16)
    dense_macs = count_macs(models["dense"])
    form = "BN folded, channels_last" + (", bf16 weights" if bf16 else "")
    form += f", {args.compile}" if args.compile else ""
    print(f"{torch.get_num_threads()} thread(s), images: {data.test_split_name}, class-mixed; fastest form "
          f"({form}); interleaved, median of {args.repeats}")
    print("model | MACs | MAC ratio | " + " | ".join(f"speedup b={b}" for b in args.batch))
    for name, model in models.items():
        macs = count_macs(model)
        cells = " | ".join(f"{timing['batches'][b][name]['ratio']:.2f}x" for b in args.batch)
        print(f"{name} | {macs / 1e6:.2f} M | {dense_macs / macs:.2f}x | {cells}")


def _report(args: argparse.Namespace) -> None:
    import json

    from common.speed import class_mixed_images

    from .evaluate import selector_report

    pipeline = _reopen(args.run, args.data_root, args.device, args.precision)
    images = class_mixed_images(pipeline.data.test, args.images, seed=0).to(pipeline.device)
    out = selector_report(pipeline.classifier, pipeline.decoder(), images)
    out["split"] = pipeline.data.test_split_name
    print(json.dumps(out, indent=1))


def _compare(args: argparse.Namespace) -> None:
    import json

    from common.speed import class_mixed_images

    from .evaluate import kept_channel_difference, paired_differences, run_summary

    def summaries(specs: list[str]) -> dict[str, dict]:
        rows = {}
        for spec in specs:
            name, path = _named(spec) if "=" in spec else (Path(spec).name, spec)
            pipeline = _reopen(path, args.data_root, args.device, args.precision)
            images = class_mixed_images(pipeline.data.test, args.images, seed=0).to(pipeline.device)
            rows[name] = run_summary(pipeline, images)
        return rows

    if args.paired:  # --run A (one per seed) --paired B (the same seeds, same order)
        rows_a, rows_b = summaries(args.run), summaries(args.paired)
        if len(rows_a) != len(rows_b):
            raise ValueError(f"--run and --paired need the same number of runs (one per seed), got "
                             f"{len(rows_a)} and {len(rows_b)}")
        kept = [kept_channel_difference(a["keep"], b["keep"]) for a, b in zip(rows_a.values(), rows_b.values())]
        result = {"a": list(rows_a), "b": list(rows_b), "kept_channel_difference_per_pair": kept,
                  "paired": paired_differences(list(rows_a.values()), list(rows_b.values())),
                  "runs": {**rows_a, **rows_b}}
    else:
        rows = summaries(args.run)
        names = list(rows)
        result = {"runs": rows, "kept_channel_difference": {
            f"{a} vs {b}": kept_channel_difference(rows[a]["keep"], rows[b]["keep"])
            for i, a in enumerate(names) for b in names[i + 1:]}}
    for row in result["runs"].values():
        row.pop("keep")
    print(json.dumps(result, indent=1))


def _run(argv: list[str] | None) -> int:
    from common.cli import command_scope

    args = parse_args(_parser(), argv)  # seeds, sets --threads, checks budget / device / --out / --set
    with command_scope(args, PROG):  # train: one process per --out; run files name their rebuild
        {"train": _train, "evaluate": _evaluate, "explain": _explain, "sweep": _sweep,
         "blocks": _blocks, "speed": _speed, "report": _report, "compare": _compare}[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_guard(_run, argv, prog=PROG, extra_errors=(StageOrderError,))


if __name__ == "__main__":
    sys.exit(main())
