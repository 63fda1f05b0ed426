"""Matplotlib figures (Agg backend): filter states (Fig. 4-5), path embedding (Fig. 3), occlusion (Fig. 7)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from .analysis import STATES, FilterStates, OcclusionResult, Paths

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
            ax.set_title("no further filter", fontsize=7)
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
