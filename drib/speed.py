"""Speed of the deployed DRIB against the dense start in its fastest form (evaluation-protocol.md, 5).

Both sides run in the same process, interleaved (each repetition times every form once, in rotating
order), after warm-up, on class-mixed test images (a seeded permutation of the reported test split),
median of `repeats` repetitions per form and batch size; the thread count is recorded. The dense start's
fastest form is the fastest of: the plain eval backbone, `common.deploy.deploy` (BN folded, channels_last)
and the same without channels_last, and DRIB's own folded dense path (`sparse_inference.deploy_dense`);
DRIB runs `sparse_inference.deploy` contiguous and channels_last; the ratio is the fastest DRIB form
against the fastest dense form at each batch size.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from common.data import DatasetSplits

from .sparse_inference import deploy, deploy_dense
from .train import TrainedDRIB


def _dense_start(trained: TrainedDRIB) -> nn.Module:
    """The backbone without gates: same weights (the fine-tuned ones; the pretrained start has the same
    architecture and cost)."""
    from common.backbones import build_backbone

    backbone = build_backbone(trained.meta["backbone"], num_classes=trained.meta["num_classes"])
    state = {k.removeprefix("backbone."): v for k, v in trained.net.state_dict().items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    return backbone.to(next(trained.net.parameters()).device).eval()


def dense_forms(backbone: nn.Module, example: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    forms: dict[str, Callable[[Tensor], Tensor]] = {"dense_eval": backbone}
    try:
        from common.deploy import deploy as common_deploy

        forms["dense_deploy_channels_last"] = common_deploy(copy.deepcopy(backbone), example=example)
        forms["dense_deploy"] = common_deploy(copy.deepcopy(backbone), example=example, channels_last=False)
    except (ImportError, RuntimeError, ValueError):  # common.deploy absent or refuses: the other forms remain
        pass
    forms["dense_folded"] = deploy_dense(copy.deepcopy(backbone))
    forms["dense_folded_channels_last"] = deploy_dense(copy.deepcopy(backbone), channels_last=True)
    return forms


@torch.inference_mode()
def time_interleaved(fns: dict[str, Callable[[Tensor], Any]], images: Tensor, batch_size: int, repeats: int = 25,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per forward of each function, interleaved; each repetition uses the next slice of
    ``images`` (all functions see the same batch)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    n = len(images)
    for rep in range(warmup + repeats):
        start = (rep * batch_size) % max(1, n - batch_size + 1)
        x = images[start:start + batch_size]
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name](x)
            elapsed = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def speed_metrics(trained: TrainedDRIB, data: DatasetSplits, seed: int = 0, batch_sizes: tuple[int, ...] = (1, 128),
                  repeats: int = 25, images: int = 1024) -> dict[str, Any]:
    device = next(trained.net.parameters()).device
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed + 1))[:images]
    x = (data.test.subset(order).images.float() / 255.0).to(device)
    dense = _dense_start(trained)
    fns = dense_forms(dense, x[:2])
    fns["drib_deployed"] = deploy(trained.net.eval())
    fns["drib_deployed_channels_last"] = deploy(trained.net.eval(), channels_last=True)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "images": len(x),
                           "split": data.test_split_name, "device": str(device)}
    for batch in batch_sizes:
        medians = time_interleaved(fns, x, batch, repeats)
        fastest_dense = min((v, k) for k, v in medians.items() if k.startswith("dense"))
        fastest_drib = min((v, k) for k, v in medians.items() if k.startswith("drib"))
        out[f"batch_{batch}"] = {"median_ms": {k: 1000 * v for k, v in medians.items()},
                                 "fastest_dense": fastest_dense[1], "fastest_drib": fastest_drib[1],
                                 "speedup_vs_fastest_dense": fastest_dense[0] / fastest_drib[0]}
    return out
