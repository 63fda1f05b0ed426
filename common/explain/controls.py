"""Controls that stand beside every interpretability figure (evaluation-protocol.md, section 2).

- reference maps: `random_saliency` (seeded noise) and `centre_saliency` (a centred Gaussian), scored
  by the same metrics as a method's own maps;
- `gradcam_saliency`: the common Grad-CAM of the same model as a saliency function;
- `randomisation_sanity`: the model-parameter randomisation sanity test (Adebayo et al., NeurIPS 2018), the
  same-image correlation beside its other-image floor; `cascading_randomisation`: its layer-by-layer cascade;
- `explanation_drift`: how far a compressed model's maps moved from its uncompressed start's;
- `linear_probe`: class information readable from any per-sample feature vector (paths, gates, features).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from .gradcam import grad_cam

SaliencyFn = Callable[[Tensor, Tensor], Tensor]  # (images, targets) -> B x H x W, higher = more relevant


def _image_seed(image: Tensor, seed: int) -> int:
    """A 63-bit seed from ``seed`` and the image's pixels quantised to 8 bits (float and uint8 copies of
    one image agree), so the noise follows the image, not the call order, batch or model."""
    pixels = image.detach().cpu()
    pixels = pixels.float() * 255.0 if pixels.is_floating_point() else pixels.float()  # floats are in [0, 1]
    quantised = pixels.round().clamp(0, 255).to(torch.uint8).contiguous().numpy()
    digest = hashlib.blake2b(quantised.tobytes(), digest_size=8, key=str(int(seed)).encode())
    digest.update(str(tuple(quantised.shape)).encode())
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def random_saliency(seed: int = 0) -> SaliencyFn:
    """Uniform noise maps, deterministic per image: each image's noise is seeded from ``seed`` and a hash
    of its pixels, so the same image gets the same map whatever the model, the batch or the call order.

    A model-blind control must be deterministic per image (evaluation-protocol.md): noise drawn afresh on
    every call would "pass" the randomisation test that exists to catch model-blind maps.
    """

    def explain(images: Tensor, targets: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        maps = [torch.rand(h, w, generator=torch.Generator().manual_seed(_image_seed(img, seed))) for img in images]
        return (torch.stack(maps) if maps else torch.zeros(0, h, w)).to(images.device)

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


RESETS = ("kaiming", "quantus")


def _weighted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None]


def _resettable_modules(model: nn.Module, reset: str) -> list[tuple[str, nn.Module]]:
    """The modules a reset touches, input to output: the weighted layers ("kaiming"), or every module with a
    ``reset_parameters`` method ("quantus", as Quantus's model-parameter randomisation selects them)."""
    if reset == "kaiming":
        return _weighted_modules(model)
    if reset == "quantus":
        return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "reset_parameters", None))]
    raise ValueError(f"unknown weight reset {reset!r}; choose one of {RESETS}")


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """The project's reset ("kaiming"): conv / linear weights N(0, 2 / fan_in), biases N(0, 0.1^2), BN scale
    N(1, 0.5^2); BN running statistics are kept."""
    with torch.no_grad():
        w = module.weight
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=generator).to(w) * (2.0 / fan_in) ** 0.5)
        else:  # BN: random scale around 1 (a zero scale would switch the channel off, not randomise it)
            w.copy_(1.0 + 0.5 * torch.randn(w.shape, generator=generator).to(w))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator).to(module.bias))


def _reset_like_quantus(module: nn.Module, seed: int) -> None:
    """Quantus 0.6's reset: the module's own ``reset_parameters()`` (PyTorch's default initialisation:
    Kaiming-uniform conv / linear weights, BN scale 1, shift 0 and running statistics 0 / 1) with the global
    torch seed set to ``seed + 1`` before each module. The global RNG state is forked, so callers' draws
    are unaffected."""
    cuda = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def _reset_modules(modules: list[tuple[str, nn.Module]], reset: str, seed: int,
                   generator: torch.Generator) -> None:
    for _, module in modules:
        if reset == "quantus":
            _reset_like_quantus(module, seed)
        else:
            _randomise(module, generator)


def cascading_randomisation(model: nn.Module, explain: SaliencyFn, images: Tensor, targets: Tensor, *,
                            stages: int = 4, seed: int = 0, reset: str = "kaiming") -> SanityResult:
    """Model-parameter randomisation test (Adebayo et al., NeurIPS 2018), cascading from the top layer.

    The weighted layers (conv, linear, BN affine) are randomised in place, from the output towards the
    input, in `stages` equal groups (the last stage ends with every layer random); after each stage the
    maps of `explain` are recomputed for the same images and targets and compared with the trained
    model's by Spearman rank correlation. `explain` may close over `model` (a method's own explainer):
    the weights are changed in place and every entry of the state dict is restored afterwards. `reset`
    names the weight reset (see `randomisation_sanity`). The same-image correlation alone cannot be read
    without its other-image floor: `randomisation_sanity` reports both.
    """
    layers = _resettable_modules(model, reset)
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
            _reset_modules(order[done:cut], reset, seed, generator)
            done = cut
            maps = explain(images, targets).detach()
            names.append(order[cut - 1][0])
            rhos.append(float(rank_correlation(reference, maps).mean()))
    return SanityResult(names, rhos)


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


@dataclass
class SanityTest:
    """The model-parameter randomisation test read against its floor (see `randomisation_sanity`).

    same_image: mean Spearman correlation of the trained and the randomised model's maps of the same image.
    floor: the same with the randomised map of another image (a fixed derangement: image i + 1 mod n), what
    two unrelated maps of this explainer share (a centre bias, say). ``*_se``: standard errors over images;
    diff_se: standard error of the paired per-image difference same - floor. reset: the weight reset used.
    """

    same_image: float
    same_image_se: float
    floor: float
    floor_se: float
    diff_se: float
    images: int
    reset: str

    @property
    def depends_on_weights(self) -> bool:
        """True only where the same-image correlation is within two standard errors (of the paired
        difference) of the floor and the reset moved the maps (same-image correlation more than two standard
        errors below 1): a map the reset left unchanged is blind to the weights, whatever its floor."""
        if not all(np.isfinite([self.same_image, self.floor, self.diff_se, self.same_image_se])):
            return False
        near_floor = abs(self.same_image - self.floor) <= 2 * self.diff_se
        moved = self.same_image < 1.0 - max(2 * self.same_image_se, 1e-6)
        return bool(near_floor and moved)

    @property
    def verdict(self) -> str:
        return "depends on the weights" if self.depends_on_weights else "blind to the weights"


def randomisation_sanity(model: nn.Module, explain: SaliencyFn, images: Tensor, targets: Tensor, *,
                         reset: str = "kaiming", seed: int = 0) -> SanityTest:
    """Model-parameter randomisation test (Adebayo et al., NeurIPS 2018), every layer reset at once, read
    against the other-image floor.

    For n >= 2 images: maps of the trained model, then of the model with every layer reset (`reset`):
    "kaiming", the project's (`_randomise`: conv / linear N(0, 2 / fan_in), BN scale around 1, running
    statistics kept) or "quantus" (each module's ``reset_parameters()`` under the seed ``seed + 1``, as
    Quantus 0.6's ModelParameterRandomisation resets a PyTorch model; BN statistics back to 0 / 1). Per
    image i: same = rho(trained map i, randomised map i); floor = rho(trained map i, randomised map of
    image i + 1 mod n). A map that depends on the weights falls to its floor; a model-blind map keeps
    same-image correlation 1. `explain` may close over `model`; the state dict is restored afterwards.
    """
    if len(images) < 2:
        raise ValueError("the randomisation sanity test needs at least two images (the floor pairs image i with i + 1)")
    layers = _resettable_modules(model, reset)
    if not layers:
        raise ValueError("the model has no layer to randomise")
    reference = explain(images, targets).detach()
    with _restored(model):
        _reset_modules(layers[::-1], reset, seed, torch.Generator().manual_seed(seed))
        randomised = explain(images, targets).detach()
    same = rank_correlation(reference, randomised).double().numpy()
    other = rank_correlation(reference, randomised.roll(-1, dims=0)).double().numpy()
    return SanityTest(float(same.mean()), _se(same), float(other.mean()), _se(other), _se(same - other),
                      len(same), reset)


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
