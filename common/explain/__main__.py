"""``python -m common.explain``: Grad-CAM beside the random and centre controls on a published start.

Prints tiled deletion / insertion AUC and the ROAD gap of each map, and Grad-CAM's cascading-randomisation
correlation, on a seeded subset of the held-out test half (the table in the top-level README).
"""

from __future__ import annotations

import argparse

import torch

from common.backbones import build_backbone
from common.data import load_dataset

from .controls import cascading_randomisation, centre_saliency, gradcam_saliency, random_saliency
from .faithfulness import road, tile_deletion_insertion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.explain", description=__doc__)
    parser.add_argument("--weights", required=True, help="published checkpoint, e.g. weights/resnet20-12fca82f.th")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be >= 1")
    data = load_dataset(args.dataset, args.data_root, val_source="test-half")
    model = build_backbone(args.backbone, data.num_classes, weights=args.weights).eval()
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    x, y = data.test.images[idx].float() / 255, data.test.labels[idx]
    gradcam = gradcam_saliency(model, model.cam_layer())
    print(f"{len(x)} images of the {data.test_split_name}, targets = true labels")
    print("| map | tiled deletion ↓ | tiled insertion ↑ | ROAD gap ↑ |\n|---|---:|---:|---:|")
    for name, fn in (("random", random_saliency(args.seed)), ("centre", centre_saliency()), ("Grad-CAM", gradcam)):
        maps = fn(x, y)
        game, gap = tile_deletion_insertion(model, x, maps, y), road(model, x, maps, y).gap
        print(f"| {name} | {game.deletion_auc.mean():.3f} | {game.insertion_auc.mean():.3f} | {gap.mean():.3f} |")
    sanity = cascading_randomisation(model, gradcam, x, y)
    print(f"Grad-CAM rank correlation after full randomisation: {sanity.final:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
