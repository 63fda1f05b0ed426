"""`python -m drib explain`: per test image, the input, its IB heatmap and the channels the decision module selected."""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from common.data import DatasetSplits
from common.precision import Precision

from .train import TrainedDRIB, ensure_statistics
from .verification import attribution_site, ib_saliency


def explain_figure(trained: TrainedDRIB, data: DatasetSplits, index: int, out: Path,
                   device: torch.device, precision: Precision | None = None) -> dict[str, object]:
    """Save a 3-panel PNG for test image ``index`` of the reported split; returns what it shows (class,
    prediction, MAC share). The prediction and the selected channels come from a forward under ``precision``
    (default fp32); the IB heatmap is computed in fp32."""
    if not 0 <= index < len(data.test):
        raise ValueError(f"test image {index} is out of range: the reported split has {len(data.test)} images")
    ensure_statistics(trained, data, device)
    net = trained.net.eval()
    image = data.test.images[index:index + 1].float().div(255).to(device)
    with torch.no_grad(), (precision.autocast() if precision is not None else contextlib.nullcontext()):
        masks = [m.float() for m in net.channel_masks(image)]
        prediction = int(net(image).float().argmax(1))
    heatmap = ib_saliency(net, image, torch.tensor([prediction]), trained.stats, trained.config.bottleneck)[0]
    width = max(m.shape[1] for m in masks)
    grid = torch.full((len(masks), width), float("nan"))
    for row, mask in enumerate(masks):
        grid[row, : mask.shape[1]] = mask[0].cpu()
    fraction = float(net.per_sample_macs(masks)[0]) / net.dense_backbone_macs()
    site = attribution_site(net, trained.config.bottleneck.site).name

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    axes[0].imshow(image[0].permute(1, 2, 0).cpu().numpy())
    axes[0].set_title(f"input #{index}: {data.classes[int(data.test.labels[index])]}\n"
                      f"predicted: {data.classes[prediction]}")
    shown = axes[1].imshow(heatmap.cpu().numpy(), cmap="inferno")
    axes[1].set_title(f"IB heatmap at {site} (residual stream)\n{float(heatmap.sum()):.1f} bits in total")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, label="bits / pixel")
    selected = axes[2].imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[2].set_title(f"selected channels G_l[i] per gated layer (0 = skipped)\nMACs: {100 * fraction:.1f}% of dense")
    axes[2].set_xlabel("output channel")
    axes[2].set_ylabel("gated layer")
    axes[2].set_yticks(range(len(masks)), [g.site.name for g in net.gated], fontsize=6)
    fig.colorbar(selected, ax=axes[2], fraction=0.046, label="mask value")
    for ax in axes[:2]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)
    return {"index": index, "label": data.classes[int(data.test.labels[index])],
            "prediction": data.classes[prediction], "mac_fraction": fraction, "ib_bits": float(heatmap.sum())}
