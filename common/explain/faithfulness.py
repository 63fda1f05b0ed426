"""Faithfulness metrics that do not reward noise: tiled deletion / insertion and ROAD.

Pixel-by-pixel deletion to black on 32 x 32 images rewards scattered maps: a random map "wins" because
salt-and-pepper black pixels are far out of distribution (evaluation-protocol.md, section 3). The two
metrics here remove evidence in shapes the network can still read as images:

- `tile_deletion_insertion`: deletion and insertion games (RISE, Petsiuk et al., BMVC 2018) over square
  tiles (2 x 2 at 32 px by default, the same share of the image as IBA's 14 px tiles at 224 px) onto a
  Gaussian-blurred canvas, so what is removed is detail, not colour.
- `road`: RemOve And Debias (Rong et al., ICML 2022): remove a fraction of pixels in MoRF or LeRF order and
  fill them by noisy linear imputation from their neighbours, so the removal pattern itself leaks no class
  information; a faithful map makes MoRF fall fast and LeRF stay high.

Scores are the softmax probability of the target class (default: the clean prediction), as in the other
games of this package; ROAD's paper reports accuracy, the probability is its smoother per-image version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve
from torch import Tensor, nn

from ._utils import (
    as_maps,
    as_targets,
    eval_mode,
    mixed_scores,
    model_device,
    stable_rank,
    target_probabilities,
    tile_of_pixel,
    tile_relevance,
)
from .degradation import scaled_tile
from .perturbation import make_baseline

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE = 0.01  # std of the noise added to imputed pixels (ROAD's NoisyLinearImputer default)
# Neighbour weights of ROAD's linear imputation: 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonals.
_NEIGHBOURS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def default_tile(size: int) -> int:
    """Tile side for an image of side `size`: IBA's 14 px at 224 px scaled (2 px at 32 px, 4 px at 64 px)."""
    return scaled_tile(14, size)


def _targets(model: nn.Module, images: Tensor, targets: Tensor | int | Sequence[int] | None) -> Tensor:
    if targets is not None:
        return as_targets(targets, images.shape[0], images.device)
    with torch.no_grad(), eval_mode(model):
        return model(images).argmax(dim=1)


@dataclass
class TileGameCurves:
    """Result of `tile_deletion_insertion`; P recorded points.

    fractions: [P] fraction of tiles deleted / inserted (0 ... 1).
    deletion, insertion: [B, P] target probability along each game.
    deletion_auc (lower is better), insertion_auc (higher is better): [B] trapezoidal areas over [0, 1].
    """

    fractions: Tensor
    deletion: Tensor
    insertion: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor


def tile_deletion_insertion(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None = None,
    *,
    tile: int | None = None,
    baseline: str | Tensor = "blur",
    points: int = 33,
    batch_size: int = 64,
) -> TileGameCurves:
    """Deletion and insertion over tiles onto a blurred canvas.

    The image is cut into tile x tile tiles (`tile` None: `default_tile(min(H, W))`); a tile's relevance is
    the mean saliency of its pixels, ties broken by lower tile index. Deletion replaces the m most relevant
    tiles by the canvas (`make_baseline`, default the Gaussian-blurred image); insertion copies the m most
    relevant tiles of the image onto the canvas. m runs over round_half_up(linspace(0, T, points)) for T
    tiles, so both ends (clean image, full canvas) are always recorded.
    """
    if points < 2:
        raise ValueError("points must be >= 2 (the curve needs both ends)")
    device = model_device(model, images.device)
    images = images.to(device)
    b, _, h, w = images.shape
    tile = default_tile(min(h, w)) if tile is None else tile
    maps = as_maps(saliency, (h, w), device).reshape(b, h * w)
    target_idx = _targets(model, images, targets)
    tile_index, num_tiles = tile_of_pixel(h, w, tile, device)
    pixel_rank = stable_rank(tile_relevance(maps, tile_index, num_tiles), descending=True)
    pixel_rank = pixel_rank.gather(1, tile_index.expand(b, h * w))
    counts = torch.floor(torch.linspace(0, num_tiles, points, device=device, dtype=torch.float64) + 0.5).long()
    canvas = make_baseline(images, baseline)
    deletion = mixed_scores(model, canvas, images, pixel_rank, counts, target_idx, batch_size)
    insertion = mixed_scores(model, images, canvas, pixel_rank, counts, target_idx, batch_size)
    fractions = counts.float() / num_tiles
    return TileGameCurves(fractions, deletion, insertion, torch.trapezoid(deletion, fractions, dim=1),
                          torch.trapezoid(insertion, fractions, dim=1))


def noisy_linear_imputation(images: Tensor, removed: Tensor, *, noise: float = ROAD_NOISE,
                            generator: torch.Generator | None = None) -> Tensor:
    """Fill the `removed` pixels (bool B x H x W) of `images` (B x C x H x W) as ROAD does.

    Every removed pixel takes the weighted mean of its in-image 8-neighbours (weights 1/6 direct, 1/12
    diagonal), whether those are kept or themselves removed: one sparse linear system per image, solved
    exactly (scipy), shared by the channels. Then N(0, noise^2) is added to the imputed pixels. Kept pixels
    are returned unchanged. The system is non-singular whenever at least one pixel is kept.
    """
    if removed.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"removed must be B x H x W = {(images.shape[0], *images.shape[-2:])}, "
                         f"got {tuple(removed.shape)}")
    out = images.detach().clone()
    b, c, h, w = images.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(b):
        gone = removed[i].cpu().numpy()
        n_gone = int(gone.sum())
        if n_gone == 0:
            continue
        if n_gone == h * w:
            raise ValueError("noisy_linear_imputation needs at least one kept pixel per image")
        unknown = -np.ones((h, w), dtype=np.int64)
        unknown[gone] = np.arange(n_gone)
        r0, c0 = rows[gone], cols[gone]
        values = out[i].reshape(c, h * w).cpu().double().numpy()
        diag = np.zeros(n_gone)
        rhs = np.zeros((n_gone, c))
        a_rows, a_cols, a_vals = [], [], []
        for dr, dc, weight in _NEIGHBOURS:
            r1, c1 = r0 + dr, c0 + dc
            inside = (r1 >= 0) & (r1 < h) & (c1 >= 0) & (c1 < w)
            src = np.flatnonzero(inside)
            diag[src] += weight
            nbr = unknown[r1[inside], c1[inside]]
            free = nbr >= 0
            a_rows.append(src[free])
            a_cols.append(nbr[free])
            a_vals.append(np.full(int(free.sum()), -weight))
            known_flat = r1[inside][~free] * w + c1[inside][~free]
            np.add.at(rhs, src[~free], weight * values[:, known_flat].T)
        a_rows.append(np.arange(n_gone))
        a_cols.append(np.arange(n_gone))
        a_vals.append(diag)
        system = sparse.csc_matrix((np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))),
                                   shape=(n_gone, n_gone))
        solved = np.asarray(spsolve(system, rhs)).reshape(n_gone, c)
        filled = torch.from_numpy(solved.T).to(out)
        if noise > 0:
            filled = filled + noise * torch.randn(filled.shape, generator=generator).to(out)
        flat = out[i].reshape(c, h * w)
        flat[:, torch.from_numpy(np.flatnonzero(gone.reshape(-1))).to(out.device)] = filled
    return out


@dataclass
class RoadCurves:
    """Result of `road`: F removal fractions.

    morf, lerf: [B, F] target probability after removing the most / least relevant fraction of pixels.
    morf_auc (lower is better), lerf_auc (higher is better): [B] means over the fractions.
    gap: [B] lerf_auc - morf_auc (higher is better; about 0 for a map that carries no information).
    """

    fractions: Tensor
    morf: Tensor
    lerf: Tensor
    morf_auc: Tensor
    lerf_auc: Tensor
    gap: Tensor


def road(
    model: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int | Sequence[int] | None = None,
    *,
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = ROAD_NOISE,
    seed: int = 0,
    batch_size: int = 64,
) -> RoadCurves:
    """ROAD (Rong et al., ICML 2022) with noisy linear imputation, MoRF and LeRF orders.

    For every fraction p, the round(p * H * W) pixels ranked highest (MoRF) or lowest (LeRF) by the map
    (ties: lower flat index first) are removed and imputed (`noisy_linear_imputation`, noise seeded by
    `seed`), and the model scores the target's softmax probability. The AUCs are means over `fractions`.
    """
    fr = torch.as_tensor(list(fractions), dtype=torch.float64)
    if fr.numel() == 0 or not bool(((fr > 0) & (fr < 1)).all()):
        raise ValueError("ROAD fractions must lie strictly between 0 and 1")
    device = model_device(model, images.device)
    images = images.to(device)
    b, _, h, w = images.shape
    maps = as_maps(saliency, (h, w), device).reshape(b, h * w)
    target_idx = _targets(model, images, targets)
    generator = torch.Generator().manual_seed(seed)
    curves = []
    for descending in (True, False):
        rank = stable_rank(maps, descending=descending)
        scores = torch.empty(b, fr.numel(), device=device)
        for j, p in enumerate(fr.tolist()):
            removed = (rank < round(p * h * w)).view(b, h, w)
            imputed = noisy_linear_imputation(images, removed, noise=noise, generator=generator)
            with torch.no_grad(), eval_mode(model):
                for start in range(0, b, batch_size):
                    sl = slice(start, start + batch_size)
                    scores[sl, j] = target_probabilities(model, imputed[sl], target_idx[sl])
        curves.append(scores)
    morf, lerf = curves
    morf_auc, lerf_auc = morf.mean(dim=1), lerf.mean(dim=1)
    return RoadCurves(fr.float(), morf, lerf, morf_auc, lerf_auc, lerf_auc - morf_auc)
