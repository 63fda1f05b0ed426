"""Path-level interpretation of a decoupled network (paper Section 4.2).

- ``collect_paths``: the calculation path of every input (concatenated z^l), with labels.
- ``filter_states``: energetic (on for every input), silent (never on) and dynamic filters (Fig. 4-5, Table 7).
- ``embed_paths``: PCA (to 300 dims) then t-SNE of the paths, for the per-class picture of Fig. 3.
- ``decision_tree``: the layer-by-layer decision process of Fig. 9 (Hopkins statistic, two-way k-means).
- ``occlusion_analysis``: the filters that switch off when a region is occluded, and their receptive
  fields (Fig. 7-8).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.run import progress

from .model import DecoupledNet


@dataclass
class Paths:
    """Calculation paths of a set of inputs: ``codes`` N x sum N^l (0/1), ``labels`` N, and the slice of
    each gated layer inside a code."""

    codes: np.ndarray
    labels: np.ndarray
    layer_names: list[str]
    layer_slices: list[slice]

    def layer(self, index: int) -> np.ndarray:
        return self.codes[:, self.layer_slices[index]]


def layer_slices(channels: Iterable[int]) -> list[slice]:
    slices, start = [], 0
    for n in channels:
        slices.append(slice(start, start + n))
        start += n
    return slices


@torch.no_grad()
def collect_paths(model: DecoupledNet, batches: Iterable[tuple[Tensor, Tensor]], desc: str = "paths") -> Paths:
    codes, labels = [], []
    for x, y in progress(batches, desc):
        _, path = model.paths(x)
        codes.append(path.cpu().numpy().astype(np.uint8))
        labels.append(y.cpu().numpy())
    return Paths(np.concatenate(codes), np.concatenate(labels), model.layer_names,
                 layer_slices(model.layer_channels))


@dataclass
class FilterStates:
    """Per gated layer: how often each filter fired over the inputs, and the three states."""

    layer_names: list[str]
    firing_counts: list[np.ndarray]  # per layer, N^l counts in [0, inputs]
    inputs: int
    per_layer: list[dict[str, int]] = field(default_factory=list)

    @property
    def fractions(self) -> dict[str, float]:
        totals = {state: sum(layer[state] for layer in self.per_layer) for state in STATES}
        filters = sum(totals.values())
        return {state: totals[state] / filters for state in STATES}


STATES = ("energetic", "silent", "dynamic")


def classify_filters(codes: np.ndarray, slices: list[slice], layer_names: list[str]) -> FilterStates:
    """Energetic: on for every input; silent: on for none; dynamic: input-dependent."""
    if codes.shape[0] == 0:
        raise ValueError("filter states need at least one input")
    counts = [codes[:, s].sum(axis=0).astype(np.int64) for s in slices]
    n = codes.shape[0]
    per_layer = [{"energetic": int((c == n).sum()), "silent": int((c == 0).sum()),
                  "dynamic": int(((c > 0) & (c < n)).sum())} for c in counts]
    return FilterStates(layer_names, counts, n, per_layer)


def filter_states(paths: Paths) -> FilterStates:
    return classify_filters(paths.codes, paths.layer_slices, paths.layer_names)


def embed_paths(codes: np.ndarray, seed: int = 0, pca_dims: int = 300) -> np.ndarray:
    """Fig. 3: PCA to ``pca_dims`` (or fewer when the data has fewer) then 2-D t-SNE."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    distinct, inverse = np.unique(codes, axis=0, return_inverse=True)
    if len(distinct) < 4:
        # t-SNE is undefined when (almost) all paths coincide: one point per distinct path on a line.
        return np.stack([inverse.reshape(-1).astype(np.float64), np.zeros(len(codes))], axis=1)
    x = codes.astype(np.float32)
    dims = min(pca_dims, x.shape[0], x.shape[1])
    if np.ptp(x, axis=0).max() > 0 and dims >= 2:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def hopkins_statistic(points: np.ndarray, samples: int | None = None, seed: int = 0) -> float:
    """Hopkins statistic H = sum u / (sum u + sum w): u are distances from uniform points in the data's
    bounding box to the nearest data point, w from sampled data points to their nearest other data point.
    About 0.5 for uniformly spread data, towards 1 for clustered data."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    if n < 3:
        raise ValueError(f"the Hopkins statistic needs at least 3 points, got {n}")
    rng = np.random.default_rng((seed, 104))  # a stream of its own, not the caller's data stream
    m = min(n - 1, samples if samples else max(5, n // 10))
    tree = cKDTree(points)
    low, high = points.min(axis=0), points.max(axis=0)
    uniform = rng.uniform(low, high, size=(m, points.shape[1]))
    u = tree.query(uniform, k=1)[0]
    picks = rng.choice(n, size=m, replace=False)
    w = tree.query(points[picks], k=2)[0][:, 1]
    denominator = u.sum() + w.sum()
    return float(u.sum() / denominator) if denominator > 0 else 0.5


@dataclass
class TreeNode:
    """A group of inputs that share their calculation path up to ``layer`` (exclusive), and its split."""

    indices: np.ndarray
    layer: int  # the layer at which this group was split (or len(layers) for a leaf)
    children: list[TreeNode] = field(default_factory=list)
    hopkins: float | None = None


def decision_tree(paths: Paths, threshold: float = 0.75, min_group: int = 4, max_depth: int = 4,
                  seed: int = 0) -> TreeNode:
    """Fig. 9: walk the layers in order; a group whose layer-l codes differ (more than one distinct code
    and Hopkins statistic above ``threshold``) is split in two by k-means, then both halves continue at
    layer l + 1; otherwise the group continues unchanged."""
    from sklearn.cluster import KMeans

    def grow(indices: np.ndarray, start: int, depth: int) -> TreeNode:
        for layer in range(start, len(paths.layer_slices)):
            if depth >= max_depth or len(indices) < min_group:
                break
            codes = paths.layer(layer)[indices].astype(np.float64)
            if len(np.unique(codes, axis=0)) < 2:
                continue
            h = hopkins_statistic(codes, seed=seed)
            if h <= threshold:
                continue
            split = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(codes)
            if split.min() == split.max():
                continue
            node = TreeNode(indices, layer, hopkins=h)
            node.children = [grow(indices[split == k], layer + 1, depth + 1) for k in (0, 1)]
            return node
        return TreeNode(indices, len(paths.layer_slices))

    return grow(np.arange(len(paths.labels)), 0, 0)


def format_tree(node: TreeNode, paths: Paths, classes: list[str], indent: str = "") -> str:
    """The tree as text: each group with its class composition and the layer where it splits."""
    labels = paths.labels[node.indices]
    values, counts = np.unique(labels, return_counts=True)
    composition = ", ".join(f"{classes[v]}:{c}" for v, c in sorted(zip(values, counts), key=lambda t: -t[1]))
    if node.children:
        head = (f"{indent}split at layer {node.layer + 1} ({paths.layer_names[node.layer]}, "
                f"Hopkins {node.hopkins:.2f}) [{composition}]")
        return "\n".join([head] + [format_tree(c, paths, classes, indent + "    ") for c in node.children])
    return f"{indent}leaf [{composition}]"


@dataclass
class OcclusionResult:
    """Filters on for the original image and off once the region is occluded: (layer index, filter)."""

    switched_off: list[tuple[int, int]]
    receptive_fields: dict[tuple[int, int], np.ndarray]  # H x W boolean masks at input resolution
    iou: dict[tuple[int, int], float]  # receptive field vs the occluded region


@torch.no_grad()
def occlusion_analysis(model: DecoupledNet, image: Tensor, box: tuple[int, int, int, int],
                       quantile: float = 0.8) -> OcclusionResult:
    """Occlude ``box`` = (top, left, bottom, right) of ``image`` (3 x H x W in [0, 1]) with black, and
    report the filters that switch off. A filter's receptive field is its activation map on the original
    image, bilinearly upsampled and thresholded at its ``quantile`` (Section 4.2)."""
    top, left, bottom, right = box
    h, w = image.shape[-2:]
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"occlusion box {box} does not fit an image of {h} x {w}")
    occluded = image.clone()
    occluded[:, top:bottom, left:right] = 0.0
    for layer in model.gated_layers:
        layer.keep_maps = True
    try:
        with model.inference():
            model(image[None])
            masks = [g.last_mask[0].cpu() for g in model.gated_layers]
            maps = [g.last_map[0].cpu() for g in model.gated_layers]
            model(occluded[None])
            masks_occluded = [g.last_mask[0].cpu() for g in model.gated_layers]
    finally:
        for layer in model.gated_layers:
            layer.keep_maps = False
    region = np.zeros((h, w), dtype=bool)
    region[top:bottom, left:right] = True
    switched, fields, ious = [], {}, {}
    for index, (before, after, fmap) in enumerate(zip(masks, masks_occluded, maps)):
        for f in torch.nonzero((before > 0) & (after == 0)).flatten().tolist():
            key = (index, f)
            up = F.interpolate(fmap[f][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            field_mask = (up >= torch.quantile(up.flatten(), quantile)).numpy() & (up.numpy() > 0)
            switched.append(key)
            fields[key] = field_mask
            union = (field_mask | region).sum()
            ious[key] = float((field_mask & region).sum() / union) if union else 0.0
    return OcclusionResult(switched, fields, ious)
