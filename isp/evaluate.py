"""The method's own metrics (metrics.json: top-1, MACs, latency, explanation distance, selector fidelity) and
the measurements behind the README: the selector loss along sigma, the selector's masks and faithfulness,
Grad-CAM drift, kept-channel differences between gate searches, and speed against the dense start."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from common.backbones import Backbone
from common.macs import count_macs, count_params
from common.run import load_checkpoint, progress, read_json
from common.training import evaluate_top1

from .losses import area_penalty, kl_to_classifier, smoothness_penalty
from .rbf import bernoulli_mask, mask_input, rbf_bernoulli, sample_mask
from .selector import Selector
from .slim import keep_from_json
from .train import Pipeline, images_as_float, load_backbone


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


def evaluate_run(pipeline: Pipeline, max_explained: int = 2000) -> dict[str, Any]:
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
    test = pipeline._loader(256, train=False, split="test")
    val = pipeline._loader(256, train=False, split="val")
    started = time.perf_counter()
    macs_before, macs_after = count_macs(original, pipeline.input_size), count_macs(final, pipeline.input_size)
    gates_blob = load_checkpoint(pipeline.path("gates"))
    sites, _, prunable = pipeline._gates()
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
        ("top1_before", original, test), ("top1_after", final, test),
        ("top1_after_pruning_before_finetune", slim_before_ft, test), ("val_top1_before", original, val),
        ("val_top1_after", final, val))}
    next(steps, None)
    distance = explanation_distance(original_selector, Selector(final, decoder), explained)
    distance_before_ft = explanation_distance(original_selector, Selector(slim_before_ft, decoder), explained)
    next(steps, None)
    fidelity = selector_fidelity(original_selector, predictor, explained)
    next(steps, None)
    metrics: dict[str, Any] = {
        "backbone": pipeline.name,
        "dataset": pipeline.data.name,
        "val_source": pipeline.data.val_source,
        "test_split_name": pipeline.data.test_split_name,
        "selector": decoder.kind,
        "precision": policy.describe(),
        **top1,
        "macs_before": macs_before,
        "macs": macs_after,
        "params_before": count_params(original),
        "params": count_params(final),
        "pruned_macs_ratio": 1.0 - macs_after / macs_before,
        "mac_reduction": 1.0 - macs_after / macs_before,
        "target_mac_reduction": s.target_mac_reduction,
        "prunable_macs_kept_ratio": float(prunable(hard)) / prunable.total,
        "target_ratio_p": gates_blob.get("target_ratio_p", s.target_ratio),
        "hard_gates_calibrated_to_target": bool(gates_blob.get("calibrated", False)),
        "channels_kept": {site.name: len(k) for site, k in zip(sites, keep)},
        "channel_groups": gates_blob.get("channel_groups"),
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




@torch.no_grad()
def loss_along_sigma(classifier: Backbone, predictor: Backbone, images: Tensor, sigmas: Sequence[float], *,
                     tau: float, lambda1: float, lambda2: float, samples: int = 4, batch: int = 128,
                     seed: int = 0) -> list[dict[str, float]]:
    """Eq. 8 for a centred RBF kernel of each ``sigma``: mean KL, R(m'), S(m') and the total over
    ``images`` and ``samples`` masks per image drawn by the selector's sampler at ``tau``."""
    classifier.eval()
    predictor.eval()
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        kl = area = smooth = 0.0
        count = 0
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            teacher = classifier(x)
            params = x.new_tensor([[height / 2, width / 2, float(sigma)]]).expand(len(x), 3)
            probs = rbf_bernoulli(params, height, width)
            for _ in range(samples):
                mask = sample_mask(probs, tau, generator)
                kl += float(kl_to_classifier(teacher, predictor(x * mask[:, None]))) * len(x)
                area += float(area_penalty(mask).sum())
                smooth += float(smoothness_penalty(mask).sum())
                count += len(x)
        row = {"sigma": float(sigma), "kl": kl / count, "R": area / count, "S": smooth / count}
        row["total"] = row["kl"] + lambda1 * row["R"] + lambda2 * row["S"]
        rows.append(row)
    return rows


def slim_from_widths(name: str, widths: Sequence[int], num_classes: int = 10,
                     input_size: tuple[int, int, int] = (3, 32, 32), weights: str | None = None) -> Backbone:
    """``name`` (optionally with pretrained ``weights``) with the first ``widths[i]`` channels kept at prunable
    site i: a network of the given shape for timing (which channels are kept does not change its speed)."""
    from common.backbones import build_backbone

    from .model import prunable_sites
    from .slim import slim_copy

    model = build_backbone(name, num_classes, weights).eval()
    sites = prunable_sites(model, input_size)
    if len(widths) != len(sites):
        raise ValueError(f"{name} has {len(sites)} prunable sites, got {len(widths)} widths")
    for site, w in zip(sites, widths):
        if not 1 <= w <= site.channels:
            raise ValueError(f"site {site.name} has {site.channels} channels; cannot keep {w}")
    return slim_copy(model, [torch.arange(w) for w in widths], input_size).eval()


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


@torch.no_grad()
def selector_codes(classifier: Backbone, decoder, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(c_z, c_t, sigma) of the selector for every image (explaining the predicted class) and that class."""
    from .selector import forward_with_stages

    classifier.eval()
    decoder.eval()
    codes, classes = [], []
    for start in range(0, len(images), batch):
        logits, stages = forward_with_stages(classifier, images[start:start + batch])
        classes.append(logits.argmax(1))
        codes.append(decoder.code(stages, classes[-1]))
    return torch.cat(codes), torch.cat(classes)


def selector_report(classifier: Backbone, decoder, images: Tensor, seed: int = 0) -> dict[str, float]:
    """The selector's masks (kept-pixel fraction, centre spread across images) and its maps' faithfulness
    (tiled insertion on a blurred canvas, ROAD) beside Grad-CAM, a seeded random map and a centred Gaussian
    map, on ``images``. A single RBF blob ranks pixels by distance from its centre, so the centred map (the
    same shape, never moved) is the control that isolates what the selector's image-specific centres add."""
    from common.explain import grad_cam
    from common.explain.controls import centre_saliency, random_saliency
    from common.explain.faithfulness import road, tile_deletion_insertion

    codes, classes = selector_codes(classifier, decoder, images)
    probs = decoder.probabilities(codes)
    out: dict[str, float] = {
        "images": float(len(images)),
        "kept_fraction_mean": float(probs.flatten(1).mean(1).mean()),
        "kept_fraction_median": float(probs.flatten(1).mean(1).median()),
        "centre_sd_z": float(codes[:, 0].std()), "centre_sd_t": float(codes[:, 1].std()),
        "sigma_mean": float(codes[:, 2].mean()), "sigma_sd": float(codes[:, 2].std()),
    }
    if decoder.kind != "rbf":
        for key in ("centre_sd_z", "centre_sd_t", "sigma_mean", "sigma_sd"):
            out.pop(key)
    maps = {"selector": probs,
            "grad-cam": torch.cat([grad_cam(classifier, classifier.cam_layer(), images[s:s + 128], classes[s:s + 128])
                                   for s in range(0, len(images), 128)]),
            "random": random_saliency(seed)(images, classes),
            "centre": centre_saliency()(images, classes)}
    for name, saliency in maps.items():
        tiles = tile_deletion_insertion(classifier, images, saliency, classes)
        roads = road(classifier, images, saliency, classes, seed=seed)
        out[f"{name}_insertion_auc"] = float(tiles.insertion_auc.mean())
        out[f"{name}_deletion_auc"] = float(tiles.deletion_auc.mean())
        out[f"{name}_road_gap"] = float(roads.gap.mean())
    return out


def gradcam_drift(original: Backbone, pruned: Backbone, images: Tensor, batch: int = 128) -> dict[str, float]:
    """Explanation drift (common.explain.controls.explanation_drift: Spearman rank correlation and top-10%
    overlap) of Grad-CAM at the last feature map, original vs pruned, both explaining the original's class."""
    from common.explain import grad_cam
    from common.explain.controls import explanation_drift

    original.eval()
    pruned.eval()
    maps_a, maps_b = [], []
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        with torch.no_grad():
            target = original(x).argmax(1)
        maps_a.append(grad_cam(original, original.cam_layer(), x, target))
        maps_b.append(grad_cam(pruned, pruned.cam_layer(), x, target))
    return explanation_drift(torch.cat(maps_a), torch.cat(maps_b))


def kept_channel_difference(keep_a: dict[str, list[int]], keep_b: dict[str, list[int]]) -> dict[str, float]:
    """How differently two gate searches pruned: channels kept by exactly one of them (count and share of all
    prunable channels kept by either) and the mean per-site Jaccard index of the kept sets."""
    if keep_a.keys() != keep_b.keys():
        raise ValueError("the two architectures have different prunable sites")
    only_one, either, jaccards = 0, 0, []
    for site in keep_a:
        a, b = set(keep_a[site]), set(keep_b[site])
        only_one += len(a ^ b)
        either += len(a | b)
        jaccards.append(len(a & b) / max(1, len(a | b)))
    return {"kept_by_one_only": float(only_one), "share_kept_by_one_only": only_one / max(1, either),
            "mean_site_jaccard": sum(jaccards) / len(jaccards)}


def selector_map_drift(original: Backbone, pruned: Backbone, decoder, images: Tensor, batch: int = 256
                       ) -> dict[str, float]:
    """ISP's own explanation drift: the selector's RBF Bernoulli maps with the original vs the pruned encoder
    (both explaining the original's predicted class), as common.explain.controls.explanation_drift plus the
    mean L2 distance of the codes (c_z, c_t, sigma) in pixels."""
    from common.explain.controls import explanation_drift

    distance = explanation_distance(Selector(original, decoder), Selector(pruned, decoder), images, batch)
    maps_a, maps_b = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            target = original(x).argmax(1)
            maps_a.append(Selector(original, decoder).saliency(x, target))
            maps_b.append(Selector(pruned, decoder).saliency(x, target))
    return {**explanation_drift(torch.cat(maps_a), torch.cat(maps_b)), "code_l2_px": distance["mean_l2"]}


def run_summary(pipeline: Pipeline, images: Tensor) -> dict[str, Any]:
    """One gate search's result for the steering comparison: kept channels, top-1 on the held-out split (under
    the run's precision policy) and explanation drift (Grad-CAM and the selector's maps, fp32) of the slim
    network before and, when it exists, after fine-tuning."""
    gates = load_checkpoint(pipeline._require("gates"))
    test = pipeline._loader(256, train=False, split="test")
    decoder = pipeline.decoder()
    out: dict[str, Any] = {"gamma1": pipeline.settings.gamma1, "seed": pipeline.seed,
                           "prunable_kept_ratio": gates["prunable_kept_ratio"],
                           "channels_kept": {k: len(v) for k, v in gates["keep"].items()},
                           "split": pipeline.data.test_split_name, "keep": gates["keep"]}
    models = {"before_finetune": load_backbone(pipeline._require("slim"), pipeline.device, pipeline.input_size)}
    if pipeline.path("finetune").is_file():
        models["after_finetune"] = pipeline.final_model()
    for when, model in models.items():
        out[f"top1_{when}"] = evaluate_top1(pipeline.policy.prepare_model(model), test, precision=pipeline.policy)
        out[f"gradcam_drift_{when}"] = gradcam_drift(pipeline.classifier, model, images)
        out[f"selector_drift_{when}"] = selector_map_drift(pipeline.classifier, model, decoder, images)
        out[f"mac_reduction_{when}"] = 1.0 - count_macs(model) / count_macs(pipeline.classifier)
    return out


def paired_differences(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: the mean of a - b over paired runs (same seed) and a two-sided paired t-test (scipy)."""
    from scipy import stats

    def flat(row: dict[str, Any]) -> dict[str, float]:
        values = {}
        for key, value in row.items():
            if isinstance(value, dict) and key.endswith(("_before_finetune", "_after_finetune")):
                values.update({f"{key}.{k}": float(v) for k, v in value.items()})
            elif isinstance(value, float) and key.startswith(("top1_", "mac_reduction_")):
                values[key] = float(value)
        return values

    rows_a, rows_b = [flat(r) for r in a], [flat(r) for r in b]
    out = {}
    for key in rows_a[0]:
        if not all(key in r for r in rows_a + rows_b):
            continue
        diffs = [ra[key] - rb[key] for ra, rb in zip(rows_a, rows_b)]
        test = stats.ttest_rel([r[key] for r in rows_a], [r[key] for r in rows_b]) if len(diffs) > 1 else None
        out[key] = {"mean_a": sum(r[key] for r in rows_a) / len(rows_a),
                    "mean_b": sum(r[key] for r in rows_b) / len(rows_b),
                    "mean_difference": sum(diffs) / len(diffs), "differences": diffs,
                    "paired_t_p": float(test.pvalue) if test is not None and test.pvalue == test.pvalue else None}
    return out
