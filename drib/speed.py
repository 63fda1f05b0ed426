"""Speed of the deployed DRIB against the dense start in its fastest form (evaluation-protocol.md, 5).

All forms run in one process, interleaved (`common.speed.time_side_by_side`: warm-up, then rounds that
time every form once in turn, median of `repeats` rounds), on class-mixed images of the reported test split
(`common.speed.class_mixed_images`), at the thread count of the caller (recorded).

fp32 forms. Dense start: the plain eval backbone, `common.deploy.deploy` (BN folded, channels_last; and
contiguous) and DRIB's own folded dense path. DRIB: `sparse_inference.deploy`, channels_last and contiguous,
a batch with several codes run on the union of their channels (default) or per code group. The ratio is
the fastest DRIB form against the fastest dense form at each batch size.

bf16 forms, when common.precision's "auto" policy picks bf16 on the device (this project's CPU has AMX):
dense `common.deploy.deploy(bf16=True)` against DRIB's deployed copy with bf16 weights, same ratio.

Ceiling (`static_ceiling`): every gated block runs its most frequent code on these images with no decision
head at all: the fastest a per-code executor of this model's code books could be (no decision cost, one
code per batch). If it is below the goal, the goal is out of reach for the model, not for the executor.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from common.data import DatasetSplits

from .sparse_inference import DeployedDRIB, deploy, deploy_dense
from .train import TrainedDRIB


def _dense_start(trained: TrainedDRIB) -> nn.Module:
    """The backbone without gates: same weights (the fine-tuned ones; the pretrained start has the same
    architecture and cost)."""
    from common.backbones import build_backbone

    backbone = build_backbone(trained.meta["backbone"], num_classes=trained.meta["num_classes"])
    state = {k.removeprefix("backbone."): v for k, v in trained.net.state_dict().items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    return backbone.to(next(trained.net.parameters()).device).eval()


def dense_forms(backbone: nn.Module, example: Tensor, bf16: bool = False) -> dict[str, Any]:
    forms: dict[str, Any] = {"dense_eval": backbone}
    try:
        from common.deploy import deploy as common_deploy

        forms["dense_deploy_channels_last"] = common_deploy(copy.deepcopy(backbone), example=example)
        forms["dense_deploy"] = common_deploy(copy.deepcopy(backbone), example=example, channels_last=False)
        if bf16:
            forms["bf16_dense_deploy_channels_last"] = common_deploy(copy.deepcopy(backbone), example=example,
                                                                     bf16=True)
    except (ImportError, RuntimeError, ValueError):  # common.deploy absent or refuses: the other forms remain
        pass
    forms["dense_folded"] = deploy_dense(copy.deepcopy(backbone))
    forms["dense_folded_channels_last"] = deploy_dense(copy.deepcopy(backbone), channels_last=True)
    return forms


@torch.no_grad()
def static_ceiling(deployed: DeployedDRIB, images: Tensor) -> DeployedDRIB:
    """A copy of ``deployed`` whose gated blocks always run their most frequent code on ``images`` and
    compute no decision (see the module docstring)."""
    ceiling = copy.deepcopy(deployed)
    deployed(images)
    for name, codes in zip(deployed.gated_blocks, deployed.codes()):
        block = ceiling._blocks[name]
        block.codes = nn.ModuleList([block.codes[int(torch.mode(codes).values)]])
        block.head = None
    ceiling.gated_blocks = []
    return ceiling


class _BF16:
    """Run a deployed copy with bf16 weights on bf16 inputs; fp32 logits."""

    def __init__(self, module: nn.Module):
        self.module = module.to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x.to(torch.bfloat16)).float()


def _policy_is_bf16(device: torch.device) -> bool:
    from common.precision import resolve_precision

    return "bf16" in resolve_precision("auto", device).describe()


@torch.inference_mode()
def speed_metrics(trained: TrainedDRIB, data: DatasetSplits, seed: int = 0, batch_sizes: tuple[int, ...] = (1, 128),
                  repeats: int = 20, images: int = 256, bf16: bool | None = None) -> dict[str, Any]:
    """Median ms per forward of every form, and the speed ratios (see the module docstring)."""
    from common.speed import class_mixed_images, time_side_by_side

    device = next(trained.net.parameters()).device
    x = class_mixed_images(data.test, images, seed=seed).to(device)
    bf16 = _policy_is_bf16(device) if bf16 is None else bf16
    net = trained.net.eval()
    fns: dict[str, Any] = dense_forms(_dense_start(trained), x[:2], bf16=bf16)
    fns["drib_deployed"] = deploy(net)
    fns["drib_deployed_channels_last"] = deploy(net, channels_last=True)
    fns["drib_grouped_channels_last"] = deploy(net, channels_last=True, multi="group")
    fns["ceiling_static_channels_last"] = static_ceiling(fns["drib_deployed_channels_last"], x)
    if bf16:
        fns["bf16_drib_deployed_channels_last"] = _BF16(deploy(net, channels_last=True))
        fns["bf16_ceiling_static_channels_last"] = _BF16(static_ceiling(deploy(net, channels_last=True), x))
    agreement = float((fns["drib_deployed_channels_last"](x).argmax(1) == net(x).argmax(1)).float().mean())
    timing = time_side_by_side(fns, x, batch_sizes, min_repeats=repeats, reference="dense_deploy_channels_last"
                               if "dense_deploy_channels_last" in fns else "dense_eval")
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "images": len(x),
                           "split": data.test_split_name, "device": str(device), "bf16": bf16,
                           "deployed_top1_agreement_with_masked_dense": agreement}
    for batch in batch_sizes:
        ms = {k: 1000 * v["seconds"] for k, v in timing["batches"][batch].items()}
        row: dict[str, Any] = {"median_ms": ms}
        for prefix in ("", "bf16_") if bf16 else ("",):
            def fastest(kind: str, prefix: str = prefix, ms: dict = ms) -> tuple[float, str]:
                return min((v, k) for k, v in ms.items()
                           if k.startswith(prefix + kind) and (prefix or not k.startswith("bf16_")))
            dense, drib, ceiling = fastest("dense"), fastest("drib"), fastest("ceiling")
            row[f"{prefix}fastest_dense"], row[f"{prefix}fastest_drib"] = dense[1], drib[1]
            row[f"{prefix}speedup_vs_fastest_dense"] = dense[0] / drib[0]
            row[f"{prefix}ceiling_speedup_vs_fastest_dense"] = dense[0] / ceiling[0]
        overall = min((v, k) for k, v in ms.items() if "dense" in k)
        row["fastest_dense_any_precision"] = overall[1]
        row["best_drib_vs_fastest_dense_any_precision"] = overall[0] / min(
            v for k, v in ms.items() if "drib" in k)
        out[f"batch_{batch}"] = row
    return out
