"""Command line: ``python -m decoupling {train,evaluate,explain} ...`` (see decoupling/README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.backbones import WeightsError
from common.run import CheckpointError, NonFiniteLossError, read_json

CONFIG_KEYS = {"backbone", "dataset", "epochs", "seconds", "max_batches", "settings"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decoupling", description=(
        "Interpretable Neural Network Decoupling (Li et al., ECCV 2020): architecture controlling modules "
        "with Improved SemHash select a calculation path of filters for every input."))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a pretrained backbone into a decoupled network")
    train.add_argument("--backbone", help="resnet20/32/44/56/110, resnet18 or vgg16 (default: from --config)")
    train.add_argument("--dataset", help="digits, cifar10, cifar100, ... (default: from --config)")
    train.add_argument("--data-root", help="data directory (default: $DATA_ROOT, else ./data)")
    train.add_argument("--weights", help="pretrained backbone weights to start from (.th/.pt)")
    train.add_argument("--epochs", type=float, help="training epochs, may be fractional (default: config)")
    train.add_argument("--seconds", type=float, help="stop training after this much measured time")
    train.add_argument("--max-batches", type=int, help="cap every epoch at this many batches")
    train.add_argument("--out", required=True, help="run directory (resumes from its checkpoint.pt)")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--config", help="JSON recipe: backbone, dataset, epochs, settings {lr, lambda_s, ...}")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set lambda_s=0.01 (repeatable)")

    evaluate = sub.add_parser("evaluate", help="measure a trained run; writes RUN/metrics.json")
    evaluate.add_argument("--run", required=True, help="run directory written by train")
    evaluate.add_argument("--data-root", help="data directory (default: the one used for training)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.add_argument("--latency-images", type=int, default=100,
                          help="test images timed one by one on one CPU thread (default 100)")
    evaluate.add_argument("--adv-runs", type=int, default=5,
                          help="runs of the adversarial detection (paper: 5; 0 skips it)")
    evaluate.add_argument("--adv-shots", default="1,5,10",
                          help="training images per class for the detector, comma-separated (default 1,5,10)")
    evaluate.add_argument("--adv-test-per-class", type=int, default=10, help="held-out images per class for the AUC")

    explain = sub.add_parser("explain", help="figures of filter states, calculation paths and an occlusion")
    explain.add_argument("--run", required=True, help="run directory written by train")
    explain.add_argument("--out", required=True, help="PNG to write (paths.npz and decision_tree.txt go next to it)")
    explain.add_argument("--data-root", help="data directory (default: the one used for training)")
    explain.add_argument("--device", help="cpu, cuda or cuda:N")
    explain.add_argument("--per-class", type=int, default=50, help="test images per class for the paths (default 50)")
    explain.add_argument("--seed", type=int, default=0, help="random seed for t-SNE and the image choice")
    return parser


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    import json

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def load_recipe(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        packaged = Path(__file__).parent / "configs" / file.name
        if not packaged.is_file():
            raise SystemExit(f"config {path} not found (packaged configs: "
                             f"{', '.join(p.name for p in (Path(__file__).parent / 'configs').glob('*.json'))})")
        file = packaged
    recipe = read_json(file)
    unknown = set(recipe) - CONFIG_KEYS - {"description"}
    if unknown:
        raise SystemExit(f"config {path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    return recipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import cli_commands

    try:
        if args.command == "train":
            recipe = load_recipe(args.config)
            return cli_commands.train(args, recipe, parse_overrides(args.set))
        if args.command == "evaluate":
            return cli_commands.evaluate(args)
        return cli_commands.explain(args)
    except (FileNotFoundError, CheckpointError, NonFiniteLossError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
