"""``python -m common.explain``: Grad-CAM beside the random and centre controls on a published start.

Prints, for each map, tiled deletion / insertion AUC and the ROAD gap on a seeded subset of the held-out
test half, the grid pointing game on seeded 2 x 2 mosaics of held-out images the model classifies correctly
alone, and the randomisation sanity test (same-image correlation beside its other-image floor; the table in
common/README.md).
"""

from __future__ import annotations

import argparse

import torch

from common.backbones import build_backbone
from common.data import load_dataset

from .controls import RESETS, centre_saliency, gradcam_saliency, random_saliency, randomisation_sanity
from .faithfulness import road, tile_deletion_insertion
from .gridpg import build_mosaics, grid_pointing_game


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.explain", description=__doc__)
    parser.add_argument("--weights", required=True, help="published checkpoint, e.g. weights/resnet20-12fca82f.th")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--mosaics", type=int, default=64, help="2 x 2 mosaics for the grid pointing game")
    parser.add_argument("--reset", choices=RESETS, default="kaiming", help="weight reset of the sanity test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 2:
        parser.error("--images must be >= 2 (the sanity test's floor pairs two images)")
    if args.mosaics < 1:
        parser.error("--mosaics must be >= 1")
    data = load_dataset(args.dataset, args.data_root, val_source="test-half")
    model = build_backbone(args.backbone, data.num_classes, weights=args.weights).eval()
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    x, y = data.test.images[idx].float() / 255, data.test.labels[idx]
    gradcam = gradcam_saliency(model, model.cam_layer())
    # Mosaic candidates: the next 5 x mosaics images of the same permutation (about 9 in 10 qualify).
    pool = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(args.seed))[: 5 * args.mosaics]
    mosaics = build_mosaics(model, data.test.images[pool], data.test.labels[pool], args.mosaics, seed=args.seed,
                            indices=pool)
    print(f"{len(x)} images of the {data.test_split_name}, targets = true labels; GridPG: {len(mosaics)} mosaics"
          f" of 4 distinct classes from the {mosaics.qualified} of {mosaics.candidates} seeded images the model"
          f" classifies correctly alone; sanity test: reset {args.reset!r}, floor = image i vs image i + 1")
    print("| map | tiled deletion ↓ | tiled insertion ↑ | ROAD gap ↑ | GridPG ↑ | sanity: same image | other-image"
          " floor | verdict |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for name, fn in (("random", random_saliency(args.seed)), ("centre", centre_saliency()), ("Grad-CAM", gradcam)):
        maps = fn(x, y)
        game, gap = tile_deletion_insertion(model, x, maps, y), road(model, x, maps, y).gap
        grid = grid_pointing_game(fn, mosaics)
        sanity = randomisation_sanity(model, fn, x, y, reset=args.reset, seed=args.seed)
        print(f"| {name} | {game.deletion_auc.mean():.3f} | {game.insertion_auc.mean():.3f} | {gap.mean():.3f}"
              f" | {grid.mean:.3f} ± {grid.se:.3f} | {sanity.same_image:.3f} ± {sanity.same_image_se:.3f}"
              f" | {sanity.floor:.3f} ± {sanity.floor_se:.3f} | {sanity.verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
