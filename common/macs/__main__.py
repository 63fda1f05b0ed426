"""``python -m common.macs --backbone resnet56 --dataset cifar10``: print MACs and parameters as JSON."""

from __future__ import annotations

import argparse
import json

from common.backbones import build_backbone, list_backbones
from common.macs import count_macs, count_params

# Input geometry per dataset; all datasets are served as 3-channel images.
DATASET_GEOMETRY = {"cifar10": (10, 32), "cifar100": (100, 32), "mnist": (10, 32), "svhn": (10, 32),
                    "digits": (10, 32), "stl10": (10, 96)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.macs", description=__doc__)
    parser.add_argument("--backbone", required=True, choices=list_backbones())
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASET_GEOMETRY))
    args = parser.parse_args(argv)
    num_classes, size = DATASET_GEOMETRY[args.dataset]
    model = build_backbone(args.backbone, num_classes)
    print(json.dumps({"backbone": args.backbone, "dataset": args.dataset, "input": [3, size, size],
                      "macs": count_macs(model, (3, size, size)), "params": count_params(model)}))


if __name__ == "__main__":
    main()
