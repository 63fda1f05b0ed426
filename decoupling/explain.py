"""The method's native explanation: calculation paths, their figures, and whether they carry class
information (the paper's claim) measured against controls.

Figures (Agg backend): filter states per layer (Fig. 4), firing histogram (Fig. 5), PCA + t-SNE of the
paths (Fig. 3), occlusion with receptive fields (Fig. 7-8); ``explain_run`` writes them with the exported
paths and the layer-by-layer decision tree (Fig. 9) as text.

Controls:

- ``common.explain.controls.linear_probe``: a standardised logistic regression fitted on one set of
  features and scored on another (the project's one probe).
- ``class_information``: the probe on the paths, on the plain backbone's pooled features (what the
  network knows anyway) and on the paths with their labels shuffled (chance), per training seed of the
  probe; the last gated layer's code alone as well.
- ``hopkins_with_control``: the Hopkins statistic of the paths beside the same statistic of codes with
  the same per-filter firing rates but no joint structure (every filter's column permuted on its own):
  binary codes score high on Hopkins whatever their structure, so the statistic means something only
  against that control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

from common.data import BatchLoader, DatasetSplits, ImageTensors
from common.explain.controls import linear_probe
from common.precision import Precision, resolve_precision

from .paths import (
    STATES,
    FilterStates,
    OcclusionResult,
    Paths,
    collect_paths,
    decision_tree,
    embed_paths,
    filter_states,
    format_tree,
    hopkins_statistic,
    occlusion_analysis,
)


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: ImageTensors, device: torch.device,
                    batch_size: int = 256, precision: Precision | None = None) -> np.ndarray:
    """The plain backbone's globally pooled last feature map (the classifier's input), N x C, under
    ``precision`` (common.precision; None: fp32), returned in fp32."""
    backbone = backbone.to(device).eval()
    precision = precision or resolve_precision("fp32", device, channels_last=False)
    precision.prepare_model(backbone)
    out = []
    for x, _ in BatchLoader(images, batch_size, train=False, device=device):
        with precision.autocast():
            features = backbone.forward_features(precision.prepare_inputs(x))
        out.append(features.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


def class_information(fit_paths: Paths, test_paths: Paths, fit_features: np.ndarray, test_features: np.ndarray,
                      seeds: int = 3) -> dict[str, Any]:
    """Linear-probe accuracy (fit on ``fit_*``, scored on ``test_*``) of: the paths, the last gated layer's
    code, the plain pooled features, and the paths with shuffled training labels (``seeds`` shuffles)."""
    y_fit, y_test = fit_paths.labels, test_paths.labels
    last = len(fit_paths.layer_slices) - 1
    shuffled = []
    for seed in range(seeds):
        permuted = np.random.default_rng((seed, 16)).permutation(y_fit)
        shuffled.append(linear_probe(fit_paths.codes, permuted, test_paths.codes, y_test))
    per_layer = [linear_probe(fit_paths.layer(i), y_fit, test_paths.layer(i), y_test)
                 for i in range(len(fit_paths.layer_slices))]
    return {
        "probe_paths": linear_probe(fit_paths.codes, y_fit, test_paths.codes, y_test),
        "probe_last_layer_code": per_layer[last],
        "probe_per_layer": per_layer,
        "probe_plain_features": linear_probe(fit_features, y_fit, test_features, y_test),
        "probe_shuffled_paths_mean": float(np.mean(shuffled)),
        "probe_shuffled_paths_std": float(np.std(shuffled)),
        "probe_fit_images": len(y_fit),
        "probe_test_images": len(y_test),
        "chance": float(np.bincount(y_test).max() / len(y_test)),
    }


def unstructured_codes(codes: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same per-filter firing rates with the joint structure removed: each column permuted alone."""
    rng = np.random.default_rng((seed, 17))
    return np.stack([rng.permutation(column) for column in codes.T], axis=1) if codes.size else codes.copy()


def hopkins_with_control(paths: Paths, points: int = 1000, seeds: int = 3) -> dict[str, float]:
    """Hopkins statistic of the whole paths (a random subset of ``points`` inputs) and of the last layer's
    codes, beside the column-permuted control, mean over ``seeds`` draws."""
    out: dict[str, list[float]] = {"hopkins_paths": [], "hopkins_paths_control": [],
                                   "hopkins_last_layer": [], "hopkins_last_layer_control": []}
    last = paths.layer_slices[-1]
    for seed in range(seeds):
        rng = np.random.default_rng((seed, 18))
        pick = rng.choice(len(paths.codes), size=min(points, len(paths.codes)), replace=False)
        codes = paths.codes[pick].astype(np.float64)
        control = unstructured_codes(paths.codes, seed)[pick].astype(np.float64)
        out["hopkins_paths"].append(hopkins_statistic(codes, seed=seed))
        out["hopkins_paths_control"].append(hopkins_statistic(control, seed=seed))
        out["hopkins_last_layer"].append(hopkins_statistic(codes[:, last], seed=seed))
        out["hopkins_last_layer_control"].append(hopkins_statistic(control[:, last], seed=seed))
    return {k: float(np.mean(v)) for k, v in out.items()}


def path_report(model: nn.Module, dense: nn.Module, fit: ImageTensors, test: ImageTensors, device: torch.device,
                seeds: int = 3, precision: Precision | None = None) -> dict[str, Any]:
    """Class information and Hopkins of ``model``'s paths on ``test`` (probe fitted on ``fit``), with the
    plain backbone ``dense`` as control (its features under the same ``precision``)."""
    fit_paths = collect_paths(model, BatchLoader(fit, 256, train=False, device=device), "paths (probe fit)")
    test_paths = collect_paths(model, BatchLoader(test, 256, train=False, device=device), "paths (probe test)")
    report = class_information(fit_paths, test_paths, pooled_features(dense, fit, device, precision=precision),
                               pooled_features(dense, test, device, precision=precision), seeds)
    report.update(hopkins_with_control(test_paths, seeds=seeds))
    report["distinct_paths"] = len(np.unique(test_paths.codes, axis=0))
    return report


# ----- figures -----------------------------------------------------------------------------------------

STATE_COLOURS = {"energetic": "tab:red", "silent": "tab:gray", "dynamic": "tab:blue"}


def plot_filter_states(ax, states: FilterStates) -> None:
    """Fig. 4: stacked share of energetic / dynamic / silent filters per gated layer."""
    layers = np.arange(len(states.layer_names))
    bottom = np.zeros(len(layers))
    for state in STATES:
        counts = np.array([layer[state] for layer in states.per_layer], dtype=float)
        totals = np.array([sum(layer.values()) for layer in states.per_layer], dtype=float)
        share = counts / totals
        ax.bar(layers + 1, share, bottom=bottom, color=STATE_COLOURS[state], label=state)
        bottom += share
    ax.set_xlabel("gated layer")
    ax.set_ylabel("share of filters")
    ax.set_title(f"filter states over {states.inputs} inputs")
    ax.legend(fontsize=7, loc="lower left")


def plot_firing_histogram(ax, states: FilterStates, layer: int = -1) -> None:
    """Fig. 5: how many inputs each filter of one layer fired for."""
    counts = states.firing_counts[layer]
    ax.hist(counts, bins=20, range=(0, states.inputs), color="tab:blue")
    ax.set_xlabel(f"inputs that activate the filter (of {states.inputs})")
    ax.set_ylabel("filters")
    ax.set_title(f"activations per filter, {states.layer_names[layer]}", fontsize=9)


def plot_path_embedding(ax, embedding: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """Fig. 3: t-SNE of the calculation paths, one colour per class."""
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(labels):
        sel = labels == c
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=6, color=cmap(int(c) % cmap.N), label=classes[c])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("calculation paths (PCA + t-SNE)")
    if len(embedding) < 3 or float(np.ptp(embedding, axis=0).max()) < 1e-6:
        # a figure that shows nothing says why: every input took the same path (e.g. after a very short run)
        ax.text(0.5, 0.5, f"degenerate: {len(embedding)} input(s) on one point;\nthe controllers route every "
                "input the same way\n(train longer for distinct paths)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="tab:red")
    if len(classes) <= 10:
        ax.legend(fontsize=6, markerscale=2, loc="best")


def plot_occlusion(axes, image: Tensor, box: tuple[int, int, int, int], result: OcclusionResult,
                   layer_names: list[str], top: int = 3) -> None:
    """Fig. 7-8: the occluded region and the receptive fields of the filters that switched off."""
    rgb = image.permute(1, 2, 0).numpy()
    t, left, b, r = box
    axes[0].imshow(rgb)
    axes[0].add_patch(plt.Rectangle((left - 0.5, t - 0.5), r - left, b - t, fill=False, color="black", lw=2))
    axes[0].set_title(f"occluded region: {len(result.switched_off)} filters off", fontsize=9)
    best = sorted(result.switched_off, key=lambda k: -result.iou[k])[:top]
    for ax, key in zip(axes[1:], best + [None] * (len(axes) - 1 - len(best))):
        ax.imshow(rgb)
        if key is not None:
            ax.imshow(np.ma.masked_where(~result.receptive_fields[key], result.receptive_fields[key]),
                      cmap="autumn", alpha=0.6)
            ax.set_title(f"{layer_names[key[0]]} #{key[1]} IoU {result.iou[key]:.2f}", fontsize=7)
        else:
            ax.set_title(f"(only {len(best)} filter(s) switched off\nby this occlusion)", fontsize=7)
    for ax in axes:
        ax.axis("off")


def explanation_figure(out: Path, states: FilterStates, paths: Paths, embedding: np.ndarray, classes: list[str],
                       image: Tensor, box: tuple[int, int, int, int], occlusion: OcclusionResult) -> None:
    fig = plt.figure(figsize=(14, 8))
    grid = fig.add_gridspec(2, 4)
    plot_filter_states(fig.add_subplot(grid[0, 0:2]), states)
    plot_firing_histogram(fig.add_subplot(grid[0, 2]), states)
    plot_path_embedding(fig.add_subplot(grid[0, 3]), embedding, paths.labels, classes)
    plot_occlusion([fig.add_subplot(grid[1, i]) for i in range(4)], image, box, occlusion, paths.layer_names)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def explain_run(model: nn.Module, data: DatasetSplits, device: torch.device, out: Path, per_class: int = 50,
                seed: int = 0) -> str:
    """The figure of ``explanation_figure`` on ``per_class`` images per class of the reported split, with
    ``<out>_paths.npz`` (the exported paths) and ``<out>_decision_tree.txt`` (Fig. 9 as text) beside it.
    Returns the decision tree as text."""
    rng = np.random.default_rng(seed)
    labels = data.test.labels.numpy()
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())),
                                       replace=False) for c in np.unique(labels)])
    subset = data.test.subset(torch.as_tensor(picks))
    paths = collect_paths(model, BatchLoader(subset, 256, train=False, device=device))
    states = filter_states(paths)
    embedding = embed_paths(paths.codes, seed=seed)
    tree_subset = np.concatenate([np.flatnonzero(paths.labels == c)[:10] for c in np.unique(paths.labels)])
    tree_paths = Paths(paths.codes[tree_subset], paths.labels[tree_subset], paths.layer_names, paths.layer_slices)
    tree_text = format_tree(decision_tree(tree_paths, seed=seed), tree_paths, data.classes)
    image = subset.images[0].float().div(255).to(device)
    h, w = image.shape[-2:]
    box = (h // 4, w // 4, 3 * h // 4, 3 * w // 4)
    occlusion = occlusion_analysis(model, image, box)
    out.parent.mkdir(parents=True, exist_ok=True)
    explanation_figure(out, states, paths, embedding, data.classes, image.cpu(), box, occlusion)
    np.savez_compressed(out.with_name(out.stem + "_paths.npz"), codes=paths.codes, labels=paths.labels,
                        layer_names=np.array(paths.layer_names),
                        layer_sizes=np.array([s.stop - s.start for s in paths.layer_slices]))
    out.with_name(out.stem + "_decision_tree.txt").write_text(tree_text + "\n")
    return tree_text
