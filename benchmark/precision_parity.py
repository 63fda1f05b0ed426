"""``python -m benchmark.precision_parity``: does the bf16 fast path train as well as fp32?

Fine-tunes the pretrained start for one epoch with the baseline's cross-entropy recipe twice, same seed
and batches, once under ``--precision fp32`` and once under ``bf16`` (``common.precision``), and prints
the top-1 of both on the held-out half of the test set (the last weights: a validation selection could hand
back the untouched start for both) and their difference beside the binomial standard error of one figure.
A figure for the README, not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common.backbones import build_backbone
from common.cli import add_common_arguments, main_guard, parse_args
from common.data import BatchLoader, load_dataset
from common.method import Budget
from common.precision import resolve_precision
from common.run import pick_device
from common.training import evaluate_top1

from .baseline import CrossEntropyRecipe, train_cross_entropy

PROG = "python -m benchmark.precision_parity"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="dataset root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    add_common_arguments(parser, weights=True)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    args = parse_args(build_parser(), argv)
    if args.weights is None:
        raise ValueError("--weights: the pretrained start is needed (e.g. DATA_ROOT/weights/resnet20-12fca82f.th)")
    device = pick_device(args.device)
    if resolve_precision("auto", device).name != "bf16":
        raise ValueError(f"{device} has no native bf16: the policy would train in fp32, nothing to compare")
    data = load_dataset("cifar10", args.data_root, val_source="test-half")
    results = {}
    for name in ("fp32", "bf16"):
        model = build_backbone(args.backbone, 10, weights=args.weights)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            outcome = train_cross_entropy(model, data, Budget(epochs=args.epochs), Path(work), device=device,
                                          seed=args.seed, recipe=CrossEntropyRecipe(lr=args.lr, precision=name,
                                                                            select_best=False))
        top1 = evaluate_top1(model.eval(), BatchLoader(data.test, 500, train=False, device=device), name)
        results[name] = top1
        print(f"{name}: held-out top-1 {top1:.2f}% (validation {outcome.val_top1:.2f}%, selected "
              f"{outcome.selected}), {outcome.train_seconds:.0f} s of training, "
              f"{time.perf_counter() - began:.0f} s wall", flush=True)
    p = results["fp32"] / 100
    se = 100 * math.sqrt(p * (1 - p) / len(data.test))
    print(f"bf16 - fp32: {results['bf16'] - results['fp32']:+.2f} points (one figure's binomial SE: {se:.2f}; "
          f"{len(data.test)} images, {torch.get_num_threads()} thread(s))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_guard(_run, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
