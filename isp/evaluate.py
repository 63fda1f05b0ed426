"""The run's metrics (metrics.json): the shared figures (common.method.shared_metrics: top1, split, macs,
mac_reduction, target_mac_reduction, params, precision) and ISP's own (top-1 of the dense start and before
fine-tuning, latency, explanation distance, selector fidelity).

Imported by train.py (the evaluate stage) and never the other way: what it needs of a run comes in through the
``EvaluatedRun`` protocol (the ``Pipeline`` satisfies it) and the model files through artefacts.py. The
studies behind the README (sweep, blocks, speed, report, compare) live in studies.py."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from common.backbones import Backbone
from common.data import BatchLoader, DatasetSplits
from common.macs import count_macs, count_params
from common.method import shared_metrics
from common.precision import Precision
from common.run import RunDir, load_checkpoint, progress, read_json
from common.training import evaluate_top1

from .artefacts import images_as_float, load_backbone
from .config import IspSettings
from .model import ChannelGates, PrunableMacs, PrunableSite
from .rbf import bernoulli_mask, mask_input
from .selector import Selector, SelectorDecoder
from .slim import keep_from_json


class EvaluatedRun(Protocol):
    """What ``evaluate_run`` reads of a run (train.Pipeline)."""

    settings: IspSettings
    device: torch.device
    policy: Precision
    classifier: Backbone
    data: DatasetSplits
    name: str
    input_size: tuple[int, int, int]
    run_dir: RunDir
    seconds_path: Path

    def path(self, stage: str) -> Path: ...
    def loader(self, batch: int, train: bool = True, split: str = "train") -> BatchLoader: ...
    def gate_setup(self) -> tuple[list[PrunableSite], ChannelGates, PrunableMacs]: ...
    def final_model(self) -> Backbone: ...
    def decoder(self) -> SelectorDecoder: ...


@torch.no_grad()
def explanation_distance(original: Selector, pruned: Selector, images: torch.Tensor, batch: int = 256
                         ) -> dict[str, float]:
    """Mean distance between the codes (RBF parameters) of the original and pruned selectors, explaining
    the original classifier's predicted class with both."""
    dists, abs_diffs = [], []
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        logits, code_a = original(x)
        _, code_b = pruned(x, logits.argmax(1))
        diff = (code_a - code_b).flatten(1)
        dists.append(diff.norm(dim=1).cpu())
        abs_diffs.append(diff.abs().cpu())
    all_abs = torch.cat(abs_diffs)
    out = {"mean_l2": float(torch.cat(dists).mean())}
    if original.decoder.kind == "rbf":
        for i, name in enumerate(("c_z", "c_t", "sigma")):
            out[f"mean_abs_{name}"] = float(all_abs[:, i].mean())
    return out


@torch.no_grad()
def selector_fidelity(selector: Selector, predictor: Backbone, images: torch.Tensor, batch: int = 256
                      ) -> dict[str, float]:
    """How well one hard mask sampled from the selector keeps the classifier's decision for the predictor
    (the quantity Eq. 2 asks for), and how much of the image it keeps."""
    agree, area, count = 0.0, 0.0, 0
    predictor.eval()
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        logits, code = selector(x)
        mask = bernoulli_mask(selector.decoder.probabilities(code))
        agree += float((predictor(mask_input(x, mask)).argmax(1) == logits.argmax(1)).sum())
        area += float(mask.flatten(1).mean(1).sum())
        count += len(x)
    return {"selector_mask_agreement": 100.0 * agree / count, "selector_mask_area": area / count}


def cpu_speed(original: Backbone, final: Backbone, images: Tensor, batch: int, threads: int, bf16: bool,
              repeats: int = 15) -> dict[str, float]:
    """Seconds per batch of the dense start and the slim model, each in its fastest inference form
    (common.deploy: BN folded, channels_last, bf16 weights when the precision policy is bf16), timed side by
    side on ``threads`` CPU threads (common.speed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = {"dense": copy.deepcopy(original).cpu().eval(), "slim": copy.deepcopy(final).cpu().eval()}
        timing = speed_against_dense(models, images.cpu(), (batch,), repeats, bf16=bf16)["batches"][batch]
    finally:
        torch.set_num_threads(previous)
    return {"dense": timing["dense"]["seconds"], "slim": timing["slim"]["seconds"]}


# Test images (a class-interleaved prefix of the reported split) for the explanation distance and fidelity.
EXPLAINED_IMAGES = 2000


def evaluate_run(pipeline: EvaluatedRun, max_explained: int = EXPLAINED_IMAGES) -> dict[str, Any]:
    """Everything metrics.json reports; selection already happened on the validation split."""
    from common.speed import class_mixed_images

    s = pipeline.settings
    dev = pipeline.device
    policy = pipeline.policy  # top-1 under the run's precision policy; MACs, maps and distances in fp32
    original = pipeline.classifier
    final = policy.prepare_model(pipeline.final_model())
    slim_before_ft = policy.prepare_model(load_backbone(pipeline.path("slim"), dev, pipeline.input_size))
    decoder = pipeline.decoder()
    predictor = load_backbone(pipeline.path("predictor"), dev, pipeline.input_size)
    test = pipeline.loader(256, train=False, split="test")
    val = pipeline.loader(256, train=False, split="val")
    started = time.perf_counter()
    macs_before, macs_after = count_macs(original, pipeline.input_size), count_macs(final, pipeline.input_size)
    gates_blob = load_checkpoint(pipeline.path("gates"))
    sites, _, prunable = pipeline.gate_setup()
    keep = keep_from_json(sites, gates_blob["keep"])
    hard = [torch.zeros(site.channels).index_fill_(0, k, 1.0) for site, k in zip(sites, keep)]
    steps = progress(range(4), "isp evaluate (latency, top-1, explanation distance, fidelity)", total=4)
    timed = cpu_speed(original, final, class_mixed_images(pipeline.data.test, s.latency_batch, seed=0),
                      s.latency_batch, s.latency_threads, bf16=policy.name == "bf16")
    next(steps, None)
    lat_before, lat_after = timed["dense"], timed["slim"]
    # The first max_explained test images: the split is class-interleaved (common.data), so the prefix is class-mixed.
    explained = images_as_float(pipeline.data.test, dev)[:max_explained]
    original_selector = Selector(original, decoder)
    top1 = {name: evaluate_top1(model, loader, precision=policy) for name, model, loader in (
        ("top1_before", original, test), ("top1", final, test),
        ("top1_after_pruning_before_finetune", slim_before_ft, test), ("val_top1_before", original, val),
        ("val_top1_after", final, val))}
    next(steps, None)
    distance = explanation_distance(original_selector, Selector(final, decoder), explained)
    distance_before_ft = explanation_distance(original_selector, Selector(slim_before_ft, decoder), explained)
    next(steps, None)
    fidelity = selector_fidelity(original_selector, predictor, explained)
    next(steps, None)
    # The figures every method reports under the same names (common.method.SHARED_METRIC_KEYS), then ISP's own.
    metrics: dict[str, Any] = {
        **shared_metrics(top1=top1.pop("top1"), split=pipeline.data.test_split_name, macs=macs_after,
                         dense_macs=macs_before, params=count_params(final), precision=policy.name,
                         target_mac_reduction=s.target_mac_reduction),
        "backbone": pipeline.name,
        "dataset": pipeline.data.name,
        "val_source": pipeline.data.val_source,
        "selector": decoder.kind,
        "precision_policy": policy.describe(),
        **top1,
        "macs_before": macs_before,
        "params_before": count_params(original),
        "prunable_macs_kept_ratio": float(prunable(hard)) / prunable.total,
        "target_ratio_p": gates_blob.get("target_ratio_p", s.target_ratio),
        "hard_gates_calibrated_to_target": bool(gates_blob.get("calibrated", False)),
        "channels_kept": {site.name: len(k) for site, k in zip(sites, keep)},
        "channel_groups": gates_blob.get("channel_groups"),
        "gate_objective": s.gate_objective,
        "interpretation_units": s.interpretation_units,
        "gate_gradient_share_summary": gates_blob.get("gradient_share_summary"),
        "cpu_latency_ms_before": 1000 * lat_before,
        "cpu_latency_ms_after": 1000 * lat_after,
        "cpu_speedup": lat_before / lat_after,
        "latency_setting": f"batch {s.latency_batch}, {s.latency_threads} CPU thread(s), class-mixed test images, "
                           f"both in their fastest form (common.deploy{', bf16' if policy.name == 'bf16' else ''}), "
                           "side by side, median of 15",
        "explanation_distance": distance,
        "explanation_distance_before_finetune": distance_before_ft,
        **fidelity,
        "explained_test_images": len(explained),
        "stage_seconds": read_json(pipeline.seconds_path) if pipeline.seconds_path.is_file() else {},
    }
    metrics["rbf_distance"] = metrics["explanation_distance"]["mean_l2"]
    check = pipeline.run_dir.file("slim_check.json")
    if check.is_file():
        metrics["slim_max_abs_logit_difference"] = read_json(check)["max_abs_logit_difference"]
    metrics["evaluate_seconds"] = time.perf_counter() - started
    return metrics


def speed_against_dense(models: dict[str, Backbone], images: Tensor, batch_sizes: Sequence[int] = (1, 128),
                        repeats: int = 20, compile: str | None = None, bf16: bool = False) -> dict:
    """Every model in its fastest inference form (``common.deploy``: BN folded, channels_last, bf16 weights
    with ``bf16``, optional compiler), timed side by side, interleaved, median of ``repeats``
    (``common.speed``); the first model is the reference of the ratios."""
    from common.deploy import deploy
    from common.speed import time_side_by_side

    forms = {name: deploy(model.eval(), example=images[:4], compile=compile, bf16=bf16)
             for name, model in models.items()}
    return time_side_by_side(forms, images, batch_sizes, min_repeats=repeats)
