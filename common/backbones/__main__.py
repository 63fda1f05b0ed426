"""``python -m common.backbones --backbone resnet20 --weights PATH --dataset cifar10``: test-set top-1 of a
weights file, printed as JSON. ``--list`` prints the registered backbones."""

from __future__ import annotations

import argparse
import json
import sys

from common.backbones import WeightsError, build_backbone, list_backbones
from common.data import BatchLoader, DatasetNotFoundError, load_dataset
from common.run import pick_device
from common.training import predict_logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.backbones", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print the registered backbones and exit")
    parser.add_argument("--backbone", choices=list_backbones())
    parser.add_argument("--weights", help="weights file (plain state dict, checkpoint dict or DataParallel save)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $DATA_ROOT, else ./data)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(list_backbones()))
        return
    if not args.backbone:
        parser.error("--backbone is required")
    try:
        data = load_dataset(args.dataset, args.data_root)
        model = build_backbone(args.backbone, data.num_classes, args.weights)
    except (DatasetNotFoundError, WeightsError) as exc:
        sys.exit(f"error: {exc}")
    device = pick_device(args.device)
    logits, labels = predict_logits(model.to(device), BatchLoader(data.test, args.batch_size, train=False,
                                                                  device=device))
    correct = int((logits.argmax(1) == labels).sum())
    print(json.dumps({"backbone": args.backbone, "weights": args.weights, "dataset": args.dataset,
                      "correct": correct, "total": len(labels), "top1": round(100.0 * correct / len(labels), 2)}))


if __name__ == "__main__":
    main()
