"""PICNN's native explanation: Grad-CAM restricted to a class's cluster of filters (Fig. 7), and figures."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from common.explain import grad_cam
from common.method import SaliencyFn
from common.precision import Precision

from .model import PicnnNet


def _targets(model: PicnnNet, images: Tensor, targets: Tensor | None) -> Tensor:
    if targets is None:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            targets = model(images).argmax(1)
            model.train(was_training)
    return torch.as_tensor(targets, device=images.device).long().reshape(-1)


def cluster_grad_cams(model: PicnnNet, images: Tensor, targets: Tensor | None = None) -> dict[str, Tensor]:
    """Grad-CAM of each image's target class from (a) all filters, (b) the class's cluster, (c) the other
    clusters (Fig. 7). Clusters are the deterministic argmax assignment of P. Maps are B x H x W."""
    images = images.to(next(model.parameters()).device)
    targets = _targets(model, images, targets)
    cluster = model.correspondence.argmax_clusters()[targets]  # B x N bool
    layer = model.target_layer
    return {
        "all": grad_cam(model, layer, images, targets),
        "cluster": grad_cam(model, layer, images, targets, channels=cluster),
        "complement": grad_cam(model, layer, images, targets, channels=~cluster),
    }


def class_cluster_saliency(model: PicnnNet) -> SaliencyFn:
    """The benchmark's saliency function: Grad-CAM of the target class from that class's cluster only."""

    def saliency(images: Tensor, targets: Tensor) -> Tensor:
        images = images.to(next(model.parameters()).device)
        targets = _targets(model, images, targets)
        cluster = model.correspondence.argmax_clusters()[targets]
        return grad_cam(model, model.target_layer, images, targets, channels=cluster)

    return saliency


def picks_by_class(labels: Tensor, count: int, num_classes: int) -> Tensor:
    """Indices of ``count`` images: the first image of each class in class order, then the second of each, ...
    (fewer when the split runs out)."""
    members = [(labels == k).nonzero().flatten().tolist() for k in range(num_classes)]
    picks = [hits[rank] for rank in range(max(map(len, members), default=0)) for hits in members if rank < len(hits)]
    return torch.tensor(picks[:count], dtype=torch.long)


def plot_correspondence(ax: plt.Axes, p: Tensor, class_names: Sequence[str]) -> None:
    """P as a heatmap (Fig. 1 bottom), filters ordered by their argmax class so clusters show as blocks."""
    p = p.detach().cpu()
    order = torch.argsort(p.argmax(dim=0) * 2.0 - p.max(dim=0).values, stable=True)
    image = ax.imshow(p[:, order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(class_names)), list(class_names), fontsize=7)
    ax.set_xlabel("filter (sorted by argmax class)")
    ax.set_title("filter-class correspondence matrix P")
    plt.colorbar(image, ax=ax, fraction=0.02)


def _blank_reason(key: str, cams: dict[str, Tensor], r: int, cluster_size: int, top: float) -> str | None:
    """Why panel ``key`` of row ``r`` shows nothing (None when it shows a map)."""
    if key == "cluster" and cluster_size == 0:
        return "empty cluster:\nno filter has this\nclass as its argmax"
    peak = float(cams[key][r].max())
    if not peak > 0:
        return "zero map: every\nfilter's Grad-CAM\nweight is <= 0"
    if peak < 0.02 * top:
        return f"weak: peak {peak / top:.0%}\nof the row's scale"
    return None


def save_explanation_figure(model: PicnnNet, images: Tensor, labels: Tensor, class_names: Sequence[str],
                            out_path: str | Path, policy: Precision | None = None) -> Path:
    """Images with Grad-CAM from all filters / the class cluster / the other clusters, above P's heatmap.

    Rows: one test image each, labelled with its class, the model's prediction and the label's cluster
    size N_f; maps are Grad-CAM of the label class on one colour scale per row (a colour bar per row), and a
    panel that shows nothing says why (an empty cluster, a map that is zero everywhere, or one too weak for
    the row's scale). ``policy`` (common.precision): the precision of the Grad-CAM passes (None: fp32)."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise ValueError(f"the figure must be a .png file, got {out_path}")
    with policy.autocast() if policy is not None else contextlib.nullcontext():
        cams = cluster_grad_cams(model, images, labels)
        preds = _targets(model, images.to(next(model.parameters()).device), None).cpu()
    cams = {key: cam.float() for key, cam in cams.items()}  # bf16 maps are plotted in fp32
    rows = len(images)
    fig = plt.figure(figsize=(8.8, 1.8 * rows + 2.5), layout="constrained")
    grid = fig.add_gridspec(rows + 1, 4, height_ratios=[1.0] * rows + [1.3])
    titles = ("image", "(a) all filters", "(b) label's cluster", "(c) other clusters")
    clusters = model.correspondence.argmax_clusters().sum(dim=1).cpu()
    for r in range(rows):
        picture = images[r].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
        label, pred = int(labels[r]), int(preds[r])
        # One colour scale per row, so a weak map (e.g. from the other clusters) looks weak.
        top = max(float(cams[key][r].max()) for key in cams)
        top = top if top > 0 else 1.0
        row_axes, shown = [], None
        for c, key in enumerate((None, "all", "cluster", "complement")):
            ax = fig.add_subplot(grid[r, c])
            row_axes.append(ax)
            ax.imshow(picture)
            if key is not None:
                shown = ax.imshow(cams[key][r].cpu().numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=top)
                reason = _blank_reason(key, cams, r, int(clusters[label]), top)
                if reason:
                    ax.text(0.5, 0.5, reason, ha="center", va="center", fontsize=6, transform=ax.transAxes,
                            color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2})
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"label {class_names[label]}\npred {class_names[pred]}\nN_f={int(clusters[label])}",
                              fontsize=8, color="black" if pred == label else "red")
        bar = fig.colorbar(shown, ax=row_axes[1:], fraction=0.03, pad=0.01)
        bar.set_label("Grad-CAM (row scale)", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    plot_correspondence(fig.add_subplot(grid[rows, :]), model.correspondence(), class_names)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, out_path)  # never leave a half-written figure
    return out_path
