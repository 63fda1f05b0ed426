"""Grid pointing game (Böhle et al., CVPR 2021; Rao et al., "Towards Better Understanding Attribution
Methods", CVPR 2022): localisation that a centre prior cannot win.

A mosaic is a 2 x 2 grid of held-out images of four distinct classes, each classified correctly on its own
by the reference model. For each cell, the explanation of that cell's class is computed on the whole
mosaic; the cell's score is the positive attribution inside the cell over the positive attribution in the
whole mosaic. A map that ignores the image (uniform noise, a centred Gaussian) scores 0.25; a map that finds
the object of the asked class scores near 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import eval_mode, model_device

SaliencyFn = Callable[[Tensor, Tensor], Tensor]
CELLS = 4  # top-left, top-right, bottom-left, bottom-right


@dataclass
class Mosaics:
    """images: N x 3 x 2H x 2W floats in [0, 1]; labels / indices: N x 4, the class and the source index of
    each cell (row-major); qualified: how many candidate images the model classified correctly on their own
    (the pool the mosaics were drawn from); candidates: how many were offered."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    qualified: int
    candidates: int

    def __len__(self) -> int:
        return len(self.images)


def cell_masks(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """4 x H x W bool masks of the 2 x 2 cells of an H x W mosaic (row-major; odd sides split at H // 2)."""
    masks = torch.zeros(CELLS, height, width, dtype=torch.bool, device=device)
    h2, w2 = height // 2, width // 2
    masks[0, :h2, :w2] = True
    masks[1, :h2, w2:] = True
    masks[2, h2:, :w2] = True
    masks[3, h2:, w2:] = True
    return masks


def tile_mosaic(cells: Tensor) -> Tensor:
    """B x 4 x C x H x W (row-major cells) -> B x C x 2H x 2W."""
    top = torch.cat([cells[:, 0], cells[:, 1]], dim=-1)
    bottom = torch.cat([cells[:, 2], cells[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


@torch.no_grad()
def correctly_classified(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> Tensor:
    """Bool mask of the images (floats in [0, 1], or uint8) that ``model`` classifies correctly on their own."""
    device = model_device(model, images.device)
    hits = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            x = x.float() / 255 if not x.is_floating_point() else x.float()
            hits.append((model(x).argmax(1) == labels[start:start + batch_size].to(device)).cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def build_mosaics(model: nn.Module, images: Tensor, labels: Tensor, count: int, *, seed: int = 0,
                  indices: Tensor | None = None) -> Mosaics:
    """Up to ``count`` seeded 2 x 2 mosaics of four distinct classes from ``images`` (uint8 or [0, 1] floats,
    N x 3 x H x W, held-out test images), using only images ``model`` classifies correctly on their own.

    Drawing: the qualifying images are shuffled with ``seed``; for each mosaic four classes are drawn
    uniformly among the classes that still have an unused image, and the next unused image of each is placed
    in a random order in the cells. No image is used twice; fewer than ``count`` mosaics are returned when
    fewer than four classes have images left (``len(result)`` says how many). ``indices`` (N) names the
    images in the caller's numbering (default 0..N-1), reported per cell.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError("build_mosaics needs N x 3 x H x W images with N labels")
    source = torch.arange(len(images)) if indices is None else torch.as_tensor(indices).reshape(-1).cpu()
    ok = correctly_classified(model, images, labels)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(ok).flatten()
    pool = pool[torch.randperm(len(pool), generator=generator)]
    by_class: dict[int, list[int]] = {}
    for i in pool.tolist():
        by_class.setdefault(int(labels[i]), []).append(i)
    chosen: list[list[int]] = []
    while len(chosen) < count:
        open_classes = sorted(c for c, left in by_class.items() if left)
        if len(open_classes) < CELLS:
            break
        picks = torch.randperm(len(open_classes), generator=generator)[:CELLS].tolist()
        chosen.append([by_class[open_classes[p]].pop(0) for p in picks])  # random class order = random cells
    h, w = images.shape[-2:]
    if not chosen:
        empty = torch.zeros(0, 3, 2 * h, 2 * w)
        return Mosaics(empty, torch.zeros(0, CELLS, dtype=torch.long), torch.zeros(0, CELLS, dtype=torch.long),
                       int(ok.sum()), len(images))
    cells = torch.tensor(chosen)
    pixels = images[cells.flatten()].cpu()
    pixels = pixels.float() / 255 if not pixels.is_floating_point() else pixels.float()
    mosaic = tile_mosaic(pixels.reshape(len(chosen), CELLS, *pixels.shape[1:]))
    return Mosaics(mosaic, labels.cpu()[cells].long(), source[cells], int(ok.sum()), len(images))


@dataclass
class GridPGScore:
    """mean and se (standard error over cells) of the per-cell scores ``scores`` (N x 4); ``empty``: cells
    whose map had no positive attribution anywhere (scored 0). Unpacks as ``mean, se``."""

    mean: float
    se: float
    scores: Tensor
    empty: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.mean, self.se))


def cell_scores(maps: Tensor, cells: Tensor) -> Tensor:
    """Positive attribution inside ``cells`` (B, in 0..3) over positive attribution in the whole map (B x H x W);
    0 for a map with no positive attribution."""
    positive = maps.detach().float().clamp_min(0)
    masks = cell_masks(*positive.shape[-2:], device=positive.device)[cells.to(positive.device)]
    inside = (positive * masks).sum(dim=(1, 2))
    total = positive.sum(dim=(1, 2))
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(total)).cpu()


def grid_pointing_game(explain_fn: SaliencyFn, mosaics: Mosaics, *, batch_size: int = 32,
                       device: torch.device | str | None = None) -> GridPGScore:
    """GridPG of ``explain_fn`` ((images, targets) -> B x H x W maps, any size: resized bilinearly to the
    mosaic) on ``mosaics``: for every mosaic and cell, the map of that cell's class on the whole mosaic,
    scored by `cell_scores`. Returns the mean over all cells and its standard error. Mosaics and targets
    are handed to ``explain_fn`` on ``device`` (default: where the mosaics are), ``batch_size`` at a time."""
    n = len(mosaics)
    if n == 0:
        raise ValueError("no mosaics to score (too few correctly classified images of four distinct classes)")
    height, width = mosaics.images.shape[-2:]
    images = mosaics.images.repeat_interleave(CELLS, dim=0)  # mosaic m, cells 0..3
    targets = mosaics.labels.reshape(-1)
    cells = torch.arange(CELLS).repeat(n)
    scores, empty = [], 0
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], targets[start:start + batch_size]
        if device is not None:
            x, y = x.to(device), y.to(device)
        maps = explain_fn(x, y).detach().float()
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.dim() != 3 or maps.shape[0] != len(x):
            raise ValueError(f"the explainer returned maps of shape {tuple(maps.shape)}; expected B x H x W")
        if tuple(maps.shape[-2:]) != (height, width):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        empty += int((maps.clamp_min(0).sum(dim=(1, 2)) <= 0).sum())
        scores.append(cell_scores(maps, cells[start:start + batch_size]))
    flat = torch.cat(scores).double()
    se = float(flat.std(unbiased=True) / flat.numel() ** 0.5) if flat.numel() > 1 else float("nan")
    return GridPGScore(float(flat.mean()), se, flat.float().reshape(n, CELLS), empty)
