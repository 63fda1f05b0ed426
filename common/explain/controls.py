"""Controls that stand beside every interpretability figure (evaluation-protocol.md, section 2).

- reference maps: `random_saliency` (seeded noise) and `centre_saliency` (a centred Gaussian), scored
  by the same metrics as a method's own maps;
- `gradcam_saliency`: the common Grad-CAM of the same model as a saliency function;
- `cascading_randomisation`: the model-parameter randomisation sanity test (Adebayo et al., NeurIPS 2018);
- `explanation_drift`: how far a compressed model's maps moved from its uncompressed start's;
- `linear_probe`: class information readable from any per-sample feature vector (paths, gates, features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from .gradcam import grad_cam

SaliencyFn = Callable[[Tensor, Tensor], Tensor]  # (images, targets) -> B x H x W, higher = more relevant


def random_saliency(seed: int = 0) -> SaliencyFn:
    """Uniform noise maps from a generator seeded once: the same sequence of calls gives the same maps."""
    generator = torch.Generator().manual_seed(seed)

    def explain(images: Tensor, targets: Tensor) -> Tensor:
        b, _, h, w = images.shape
        return torch.rand(b, h, w, generator=generator).to(images.device)

    return explain


def centre_map(h: int, w: int, sigma_fraction: float = 0.25) -> Tensor:
    """An H x W Gaussian centred on the image, std `sigma_fraction` of each side (the centre-bias control)."""
    ys = (torch.arange(h, dtype=torch.float32) - (h - 1) / 2) / (sigma_fraction * h)
    xs = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2) / (sigma_fraction * w)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def centre_saliency(sigma_fraction: float = 0.25) -> SaliencyFn:
    """The same centred Gaussian for every image (ties in metrics are broken by pixel index)."""

    def explain(images: Tensor, targets: Tensor) -> Tensor:
        b, _, h, w = images.shape
        return centre_map(h, w, sigma_fraction).to(images.device).expand(b, h, w).clone()

    return explain


def gradcam_saliency(model: nn.Module, layer: nn.Module) -> SaliencyFn:
    """Grad-CAM of `model` at `layer` (upsampled to the image) as a saliency function."""
    return lambda images, targets: grad_cam(model, layer, images, targets)


def _ranks(maps: Tensor) -> np.ndarray:
    flat = maps.detach().float().reshape(maps.shape[0], -1).cpu().numpy()
    return np.stack([rankdata(row) for row in flat]) if len(flat) else flat


def rank_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Per-sample Spearman correlation of two batches of maps (average ranks for ties); a constant map,
    which has no ranking, correlates 0 with anything."""
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    ra, rb = _ranks(maps_a), _ranks(maps_b)
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    rho = np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return torch.from_numpy(rho).float()


def top_overlap(maps_a: Tensor, maps_b: Tensor, fraction: float = 0.1) -> Tensor:
    """Per-sample share of the top `fraction` pixels of `maps_a` that are also in the top of `maps_b`."""
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1]")
    a = maps_a.detach().float().reshape(maps_a.shape[0], -1)
    b = maps_b.detach().float().reshape(maps_b.shape[0], -1).to(a.device)
    k = max(1, round(fraction * a.shape[1]))
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(dim=1).float().cpu() / k


def explanation_drift(maps_start: Tensor, maps_model: Tensor, top_fraction: float = 0.1) -> dict[str, float]:
    """How much a compressed model's maps kept of its start's on the same images: mean Spearman rank
    correlation and mean top-`top_fraction` overlap (1.0 and 1.0: the explanation is preserved)."""
    return {"spearman": float(rank_correlation(maps_start, maps_model).mean()),
            "top_overlap": float(top_overlap(maps_start, maps_model, top_fraction).mean())}


@dataclass
class SanityResult:
    """Cascading randomisation: `layers[i]` is the last module randomised at stage i (top layer first);
    `spearman[i]` the mean rank correlation of the maps at that stage with the trained model's."""

    layers: list[str]
    spearman: list[float]

    @property
    def final(self) -> float:
        """Correlation after every layer is randomised (near 0 for a map that depends on the weights)."""
        return self.spearman[-1]


def _weighted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        w = module.weight
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=generator).to(w) * (2.0 / fan_in) ** 0.5)
        else:  # BN: random scale around 1 (a zero scale would switch the channel off, not randomise it)
            w.copy_(1.0 + 0.5 * torch.randn(w.shape, generator=generator).to(w))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator).to(module.bias))


def cascading_randomisation(model: nn.Module, explain: SaliencyFn, images: Tensor, targets: Tensor, *,
                            stages: int = 4, seed: int = 0) -> SanityResult:
    """Model-parameter randomisation test (Adebayo et al., NeurIPS 2018), cascading from the top layer.

    The weighted layers (conv, linear, BN affine) are randomised in place, from the output towards the
    input, in `stages` equal groups (the last stage ends with every layer random); after each stage the
    maps of `explain` are recomputed for the same images and targets and compared with the trained
    model's by Spearman rank correlation. `explain` may close over `model` (a method's own explainer):
    the weights are changed in place and every entry of the state dict is restored afterwards.
    """
    layers = _weighted_modules(model)
    if not layers:
        raise ValueError("the model has no conv, linear or BN layer to randomise")
    stages = max(1, min(stages, len(layers)))
    reference = explain(images, targets).detach()
    generator = torch.Generator().manual_seed(seed)
    order = layers[::-1]
    cuts = [round(len(order) * (i + 1) / stages) for i in range(stages)]
    names, rhos = [], []
    with _restored(model):
        done = 0
        for cut in cuts:
            for _, module in order[done:cut]:
                _randomise(module, generator)
            done = cut
            maps = explain(images, targets).detach()
            names.append(order[cut - 1][0])
            rhos.append(float(rank_correlation(reference, maps).mean()))
    return SanityResult(names, rhos)


def linear_probe(train_x: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_x: Tensor | np.ndarray,
                 test_y: Tensor | np.ndarray, *, seed: int = 0, max_iter: int = 2000) -> float:
    """Test accuracy of a standardised multinomial logistic regression fitted on (train_x, train_y).

    The probe asks how much class information a per-sample feature vector carries linearly; compare it
    with the same probe on the plain backbone's pooled features and on shuffled features or labels.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def arr(v: Tensor | np.ndarray) -> np.ndarray:
        return v.detach().float().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)

    xtr, ytr, xte, yte = arr(train_x), arr(train_y).astype(int), arr(test_x), arr(test_y).astype(int)
    if xtr.ndim != 2 or xte.ndim != 2 or len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("linear_probe needs N x D features with N labels for both train and test")
    if len(np.unique(ytr)) < 2:
        return float(np.mean(yte == ytr[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    probe.fit(xtr, ytr)
    return float(np.mean(probe.predict(xte) == yte))
