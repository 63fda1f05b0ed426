"""Saliency pictures in the layout of the supplementary's Fig. 4-12, original and pruned side by side:
input, predicted Bernoulli map, map over the input, a sampled mask, the masked input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from .rbf import bernoulli_mask, mask_input
from .selector import Selector

COLUMNS = ("input", "Bernoulli map", "overlay", "sampled mask", "masked input")


@torch.no_grad()
def selector_panels(selector: Selector, images: torch.Tensor, targets: torch.Tensor, seed: int = 0
                    ) -> list[torch.Tensor]:
    """The five columns for every image, as CPU tensors (H x W x 3 images or H x W maps)."""
    probs = selector.saliency(images, targets)
    torch.manual_seed(seed)
    mask = bernoulli_mask(probs)
    masked = mask_input(images, mask)
    return [images.permute(0, 2, 3, 1).cpu(), probs.cpu(), probs.cpu(), mask.cpu(), masked.permute(0, 2, 3, 1).cpu()]


def saliency_figure(models: Sequence[tuple[str, Selector]], images: torch.Tensor, targets: torch.Tensor,
                    class_names: Sequence[str], path: str | Path) -> Path:
    """One row per image; five columns per model (e.g. original, pruned)."""
    n = len(images)
    cols = len(COLUMNS) * len(models)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n + 0.4), squeeze=False)
    for m, (label, selector) in enumerate(models):
        panels = selector_panels(selector, images, targets)
        for row in range(n):
            for c, title in enumerate(COLUMNS):
                ax = axes[row, m * len(COLUMNS) + c]
                if c == 2:
                    ax.imshow(panels[0][row].numpy())
                    ax.imshow(panels[2][row].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                elif c in (1, 3):
                    ax.imshow(panels[c][row].numpy(), cmap="gray" if c == 3 else "jet", vmin=0, vmax=1)
                else:
                    ax.imshow(panels[c][row].numpy().clip(0, 1))
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{label}\n{title}" if c == 0 else title, fontsize=8)
                if c == 0 and m == 0:
                    ax.set_ylabel(class_names[int(targets[row])], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
