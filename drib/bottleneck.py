"""Per-sample Information Bottleneck Attribution (Schulz et al., ICLR 2020), DRIB's verification module.

At a layer with features R (C x h x w), with per-element mean mu and std sigma estimated on training data:
    lambda = smooth(sigmoid(alpha))                      alpha: C x h x w, learned per image
    Z      = lambda * R + (1 - lambda) * eps,            eps ~ N(mu, sigma^2)
    capacity = KL( N(lambda * r, (1 - lambda)^2) || N(0, 1) ),   r = (R - mu) / sigma   (per element, nats)
    loss   = CE(model with Z, target) + beta * mean(capacity)
The capacity is an upper bound of the information I(R; Z) each element lets through (the paper's Eq. 6
trade-off). After `steps` Adam steps the capacity map, in bits, is the attribution. Elements that never vary
on training data (IBA's active-neuron filter) carry no capacity. `check_cut` refuses a site the network can
route around (a residual branch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BottleneckSettings
from .losses import information_bottleneck_loss

# log((1 - lambda)^2) is computed from smooth(sigmoid(-alpha)) directly, so it is exact and has a gradient at
# IBA's start (alpha = 5: log var = -10.01) and far beyond; only 1 - lambda < 1e-30 (alpha > ~69) is floored.
ONE_MINUS_FLOOR = 1e-30


@dataclass
class FeatureStats:
    """Per-element statistics of a bottleneck site's features on training data (each C x h x w).

    ``active``: IBA's active-neuron filter, 1 where the element varies (std >= active_std) and is non-zero
    in more than active_share of the images, else 0; inactive elements carry no capacity.
    """

    mean: Tensor
    std: Tensor
    active: Tensor

    def to(self, device: torch.device | str) -> FeatureStats:
        return FeatureStats(self.mean.to(device), self.std.to(device), self.active.to(device))

    def as_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "active": self.active.cpu()}

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> FeatureStats:
        return cls(data["mean"], data["std"], data["active"])


class WelfordEstimator:
    """Running per-element mean, unbiased std and non-zero count of feature maps (Welford, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._nonzero: Tensor | None = None

    def update(self, batch: Tensor) -> None:
        batch = batch.detach().to(torch.float64)
        for sample in batch:  # per sample keeps the update exact and simple
            self.n += 1
            if self._mean is None:
                self._mean = torch.zeros_like(sample)
                self._m2 = torch.zeros_like(sample)
                self._nonzero = torch.zeros_like(sample)
            delta = sample - self._mean
            self._mean += delta / self.n
            self._m2 += delta * (sample - self._mean)  # type: ignore[operator]
            self._nonzero += (sample != 0).to(sample.dtype)  # type: ignore[operator]

    def mean(self) -> Tensor:
        if self._mean is None:
            raise RuntimeError("the estimator has seen no samples")
        return self._mean.float()

    def std(self) -> Tensor:
        if self._m2 is None or self.n < 2:
            raise RuntimeError("the estimator needs at least two samples for a standard deviation")
        return torch.sqrt(self._m2 / (self.n - 1)).float()

    def nonzero_share(self) -> Tensor:
        if self._nonzero is None:
            raise RuntimeError("the estimator has seen no samples")
        return (self._nonzero / self.n).float()

    def statistics(self, active_std: float = 0.01, active_share: float = 0.01) -> FeatureStats:
        std = self.std()
        active = ((std >= active_std) & (self.nonzero_share() > active_share)).float()
        return FeatureStats(self.mean(), std, active)


def gaussian_kernel(sigma: float) -> Tensor:
    """1-D Gaussian of IBA's size round(2 sigma) * 2 + 1, normalised to sum 1."""
    half = round(2 * sigma)
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(lam: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of each channel of a (B x) C x h x w map, reflection padding."""
    if sigma <= 0:
        return lam
    squeeze = lam.dim() == 3
    x = lam[None] if squeeze else lam
    kernel = gaussian_kernel(sigma).to(x)
    half = kernel.numel() // 2
    c = x.shape[1]
    pad_h, pad_w = min(half, x.shape[-2] - 1), min(half, x.shape[-1] - 1)
    k = kernel[half - pad_h: half + pad_h + 1] if pad_h < half else kernel
    x = F.conv2d(F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x,
                 (k / k.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    k = kernel[half - pad_w: half + pad_w + 1] if pad_w < half else kernel
    x = F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x,
                 (k / k.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x[0] if squeeze else x


def restrict(features: Tensor, lam: Tensor, mean: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """Z = lambda R + (1 - lambda) eps with eps = mu + sigma * noise (noise ~ N(0, 1))."""
    return lam * features + (1 - lam) * (mean + std * noise)


def capacity(features: Tensor, lam: Tensor, mean: Tensor, std: Tensor, one_minus: Tensor | None = None) -> Tensor:
    """Per-element KL( N(lambda r, (1 - lambda)^2) || N(0, 1) ) in nats, r the standardised features.

    Zero at lambda = 0 (Z is pure noise from the prior); grows without bound as lambda -> 1. ``one_minus`` is
    1 - lambda computed without cancellation (``smooth(sigmoid(-alpha))``); no clamp touches IBA's working
    range, so the variance terms have a gradient from the first step (only 1 - lambda < 1e-30 is floored).
    """
    r = (features - mean) / std
    one_minus = 1 - lam if one_minus is None else one_minus
    log_var = 2 * torch.log(one_minus.clamp_min(ONE_MINUS_FLOOR))
    return -0.5 * (1 + log_var - (lam * r) ** 2 - one_minus**2)


@dataclass
class Attribution:
    """The result of one image at one site: capacity per feature element (bits, C x h x w) and the heatmap."""

    capacity_bits: Tensor
    heatmap: Tensor  # H x W, bits per input pixel


class _ShapeMismatch(Exception):
    """Raised by a bottleneck hook whose features differ in shape from its statistics."""

    def __init__(self, hook: _BottleneckHook, shape: tuple[int, ...]):
        super().__init__(shape)
        self.hook, self.shape = hook, shape


class _BottleneckHook:
    """Forward hook that swaps a module's output R for Z (and records the capacity)."""

    def __init__(self, stats: FeatureStats, config: BottleneckSettings, generator: torch.Generator | None):
        self.stats, self.config, self.generator = stats, config, generator
        self.alpha: Tensor | None = None
        self.last_capacity: Tensor | None = None
        self.index = 0  # position among the sites of one attribution

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self.alpha is None:
            return output
        if output.shape[1:] != self.stats.mean.shape:  # another input size: refit and restart (no noise drawn)
            raise _ShapeMismatch(self, tuple(output.shape[1:]))
        lam = smooth(torch.sigmoid(self.alpha), self.config.sigma).expand_as(output)
        one_minus = smooth(torch.sigmoid(-self.alpha), self.config.sigma).expand_as(output)
        device = self.generator.device if self.generator is not None else output.device
        noise = torch.randn(output.shape, generator=self.generator, device=device).to(output)
        self.last_capacity = capacity(output, lam, self.stats.mean, self.stats.std, one_minus) * self.stats.active
        return restrict(output, lam, self.stats.mean, self.stats.std, noise)


def fit_statistics(stats: FeatureStats, shape: tuple[int, ...]) -> FeatureStats:
    """``stats`` for features of ``shape`` (C x h' x w'): unchanged when the shape is the estimated one; for
    an input of another size (a 64 x 64 mosaic of 32 x 32 images) the mean and std are resized bilinearly and
    the active mask by nearest neighbour to h' x w', position for position (a stated deviation, README)."""
    if tuple(stats.mean.shape) == tuple(shape):
        return stats
    if len(shape) != 3 or stats.mean.dim() != 3 or shape[0] != stats.mean.shape[0]:
        raise ValueError(f"bottleneck statistics of shape {tuple(stats.mean.shape)} do not match the site's features "
                         f"{tuple(shape)}: re-estimate them for this site")
    size = tuple(shape[-2:])

    def resized(t: Tensor, mode: str) -> Tensor:
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(t[None].float(), size=size, mode=mode, **kwargs)[0].to(t.dtype)

    return FeatureStats(resized(stats.mean, "bilinear"), resized(stats.std, "bilinear"),
                        resized(stats.active, "nearest"))


def attribute_sites(model: nn.Module, layers: list[nn.Module], stats: list[FeatureStats], image: Tensor,
                    target: int, config: BottleneckSettings | None = None,
                    element_masks: list[Tensor | None] | None = None,
                    generator: torch.Generator | None = None, prepend: bool = False) -> list[Attribution]:
    """Per-sample IBA of one image (3 x H x W) for class ``target`` with a bottleneck on the output of each
    of ``layers`` at once (together they should be a cut of the network: see `check_cut`).

    Loss = CE + beta * (capacity summed over every counted element of every site / their number), IBA's
    mean over C h w. ``element_masks`` (per site: C or C x h x w, 0/1, or None) restrict the capacity that
    counts. Only the alphas are optimised; the model's parameters and their ``.grad`` are untouched; eval
    mode throughout. ``prepend``: run the bottleneck before the layer's other forward hooks. Statistics
    estimated at another input size are fitted to this image's feature shapes (`fit_statistics`).
    """
    config = config or BottleneckSettings()
    config.validate()
    if len(layers) != len(stats):
        raise ValueError(f"{len(layers)} bottleneck layers but {len(stats)} sets of statistics")
    device = image.device
    stats = [FeatureStats(s.mean.to(device), s.std.to(device).clamp_min(config.min_std), s.active.to(device))
             for s in stats]
    masks = element_masks or [None] * len(layers)
    for _ in range(len(layers)):
        try:
            return _attribute_once(model, layers, stats, image, target, config, masks, generator, prepend)
        except _ShapeMismatch as mismatch:  # the first forward stopped at that site before any noise was drawn
            stats[mismatch.hook.index] = fit_statistics(stats[mismatch.hook.index], mismatch.shape)
    return _attribute_once(model, layers, stats, image, target, config, masks, generator, prepend)


def _attribute_once(model: nn.Module, layers: list[nn.Module], stats: list[FeatureStats], image: Tensor,
                    target: int, config: BottleneckSettings, masks: list[Tensor | None],
                    generator: torch.Generator | None, prepend: bool) -> list[Attribution]:
    device = image.device
    hooks = [_BottleneckHook(s, config, generator) for s in stats]
    for index, hook in enumerate(hooks):
        hook.index = index
    handles = [layer.register_forward_hook(hook, prepend=prepend) for layer, hook in zip(layers, hooks)]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    weights = [s.active * (torch.ones_like(s.mean) if m is None else _broadcast_mask(m, s.mean))
               for s, m in zip(stats, masks)]
    counted = sum(float(w.numel()) for w in weights)  # IBA's 1/k with k = all elements (issue #40)
    try:
        alphas = [torch.full(s.mean.shape, config.alpha_init, device=device, requires_grad=True) for s in stats]
        for hook, alpha in zip(hooks, alphas):
            hook.alpha = alpha
        optimiser = torch.optim.Adam(alphas, lr=config.lr)
        batch = image[None].expand(config.copies, *image.shape)
        labels = torch.full((config.copies,), int(target), dtype=torch.long, device=device)
        for _ in range(config.steps):
            optimiser.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = model(batch).float()
                caps = [hook.last_capacity for hook in hooks]
                if any(c is None for c in caps):
                    raise RuntimeError("a bottleneck layer did not run in the forward pass")
                info = sum((c * w).sum(dim=(1, 2, 3)) for c, w in zip(caps, weights)) / counted  # type: ignore
                loss = information_bottleneck_loss(logits, labels, info.mean(), config.beta)
                if not torch.isfinite(loss):
                    raise ValueError(f"IBA loss became {float(loss)} (bottleneck settings {config})")
                grads = torch.autograd.grad(loss, alphas)
            for alpha, grad in zip(alphas, grads):
                alpha.grad = grad
            optimiser.step()
        finals = [hook.last_capacity.detach().mean(dim=0) * w for hook, w in zip(hooks, weights)]  # type: ignore
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    size = tuple(image.shape[-2:])
    return [Attribution(f / math.log(2), to_heatmap(f / math.log(2), size)) for f in finals]  # type: ignore


def attribute(model: nn.Module, layer: nn.Module, image: Tensor, target: int, stats: FeatureStats,
              config: BottleneckSettings | None = None, element_mask: Tensor | None = None,
              generator: torch.Generator | None = None, prepend: bool = False) -> Attribution:
    """Per-sample IBA at one site (see `attribute_sites`)."""
    return attribute_sites(model, [layer], [stats], image, target, config, [element_mask], generator, prepend)[0]


def _broadcast_mask(mask: Tensor, like: Tensor) -> Tensor:
    mask = (mask != 0).to(like)
    return mask.view(-1, 1, 1).expand_as(like) if mask.dim() == 1 else mask.expand_as(like)


@torch.no_grad()
def check_cut(model: nn.Module, layers: list[nn.Module], images: Tensor, name: str = "bottleneck",
              tolerance: float = 1e-5) -> None:
    """Refuse a bottleneck the network can bypass.

    With every layer in ``layers`` emitting a constant (zeros), a site that is a cut of the network leaves
    the output independent of the input; if the logits of different ``images`` still differ, information
    reaches the output around the bottleneck (a residual branch with its shortcut) and IBA's capacity would
    not measure what the prediction needs: ValueError.
    """
    if len(images) < 2:
        raise ValueError("check_cut needs at least two different images")

    def constant(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return torch.zeros_like(output)

    handles = [layer.register_forward_hook(constant) for layer in layers]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        logits = model(images).float()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    spread = float((logits - logits[:1]).abs().max())
    if spread > tolerance * max(1.0, float(logits.abs().max())):
        raise ValueError(f"{name} can be bypassed: with its output held constant the logits still depend on the "
                         f"input (spread {spread:.3g}); put it on the residual stream (a block output)")


def to_heatmap(capacity_bits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bits per input pixel: sum over channels, spread over the input pixels each feature pixel covers
    (x h*w / H*W), bilinear upsampling to ``size``. The map sums to (about) the total bits."""
    per_position = capacity_bits.sum(dim=0)
    h, w = per_position.shape
    scaled = per_position * (h * w) / (size[0] * size[1])
    return F.interpolate(scaled[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def estimate_statistics(model: nn.Module, layer: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        samples: int, active_std: float = 0.01, active_share: float = 0.01,
                        prepend: bool = False) -> FeatureStats:
    """Per-element mean, std and active-neuron mask of ``layer``'s output over ``samples`` images (eval mode)."""
    return estimate_statistics_sites(model, [layer], batches, samples, active_std, active_share, prepend)[0]


def estimate_statistics_sites(model: nn.Module, layers: list[nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
                              samples: int, active_std: float = 0.01, active_share: float = 0.01,
                              prepend: bool = False) -> list[FeatureStats]:
    """`estimate_statistics` for several layers in one pass over the data."""
    estimators = [WelfordEstimator() for _ in layers]
    seen = [0]

    def recorder(estimator: WelfordEstimator):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            remaining = samples - estimator.n
            if remaining > 0:
                estimator.update(output[:remaining])
        return record

    handles = [layer.register_forward_hook(recorder(e), prepend=prepend) for layer, e in zip(layers, estimators)]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
                seen[0] += len(x)
                if seen[0] >= samples:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return [e.statistics(active_std, active_share) for e in estimators]
