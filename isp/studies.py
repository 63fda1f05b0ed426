"""The studies behind the README, one subcommand each (``python -m isp sweep | blocks | speed | report |
compare``), and their measurements: the selector loss along sigma, the selector's masks and faithfulness,
Grad-CAM and selector-map drift, kept-channel differences between gate searches, the interpretation term of
Eq. 10 under the hard gates and the manipulation check of steering, and speed against the dense start.

Above train.py and evaluate.py (it reopens run directories as ``Pipeline``s); below only ``__main__``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.backbones import Backbone, build_backbone, list_backbones
from common.cli import add_common_arguments
from common.data import load_dataset
from common.macs import count_macs
from common.precision import add_precision_argument, resolve_precision
from common.run import atomic_write_json, load_checkpoint
from common.training import evaluate_top1

from .artefacts import images_as_float, load_backbone, load_run
from .evaluate import explanation_distance, speed_against_dense
from .losses import area_penalty, kl_to_classifier, smoothness_penalty
from .model import prunable_sites
from .rbf import MIN_SIGMA, rbf_bernoulli, rbf_mass_outside_frame, sample_mask
from .selector import Selector, SelectorDecoder, forward_with_stages
from .slim import slim_copy
from .train import Pipeline, reopen_pipeline

# The manipulation check needs a spread: at least this many unsteered (gamma1 = 0) searches, different seeds.
MIN_UNSTEERED = 3


@torch.no_grad()
def interpretation_term(original: Backbone, pruned: Backbone, decoder: SelectorDecoder, images: Tensor,
                        explained: Tensor | None = None, batch: int = 256) -> float:
    """Eq. 10's second term as the paper writes it, whatever the search optimised: ||C_x - f_sel(x; beta, v)||^2
    with (c_z, c_t, sigma) in pixels, averaged over ``images``, C_x the unpruned selector's code and f_sel the
    pruned (slim = hard-gated) network's, both explaining ``explained`` (default: the original's predicted
    class), in fp32."""
    original.eval()
    pruned.eval()
    decoder.eval()
    total = 0.0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        logits, stages = forward_with_stages(original, x)
        target = logits.argmax(1) if explained is None else explained[start:start + batch]
        _, pruned_stages = forward_with_stages(pruned, x)
        diff = decoder.code(stages, target).float() - decoder.code(pruned_stages, target).float()
        total += float(diff.pow(2).sum(1).sum())
    return total / len(images)


def manipulation_check(steered: dict[str, dict[str, Any]], unsteered: dict[str, dict[str, Any]]
                       ) -> dict[str, Any]:
    """Does steering steer? Per split (the pruning subset, and the images of ``run_summary``), each steered
    search's interpretation term against the spread (min..max) of the unsteered searches (gamma1 = 0, at least
    ``MIN_UNSTEERED`` seeds); it "works" only if every steered term lies below the whole spread, on both."""
    if len(unsteered) < MIN_UNSTEERED:
        raise ValueError(f"the manipulation check needs >= {MIN_UNSTEERED} unsteered searches (--unsteered, "
                         f"gamma1 = 0, different seeds), got {len(unsteered)}")
    out: dict[str, Any] = {}
    for key in ("interpretation_term_subset", "interpretation_term_images"):
        spread = [row[key] for row in unsteered.values()]
        values = {name: row[key] for name, row in steered.items()}
        out[key] = {"steered": values, "unsteered": dict(zip(unsteered, spread)), "unsteered_min": min(spread),
                    "unsteered_max": max(spread), "below_spread": {n: v < min(spread) for n, v in values.items()}}
    out["works"] = all(all(part["below_spread"].values()) for part in out.values())
    return out


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
    model = build_backbone(name, num_classes, weights).eval()
    sites = prunable_sites(model, input_size)
    if len(widths) != len(sites):
        raise ValueError(f"{name} has {len(sites)} prunable sites, got {len(widths)} widths")
    for site, w in zip(sites, widths):
        if not 1 <= w <= site.channels:
            raise ValueError(f"site {site.name} has {site.channels} channels; cannot keep {w}")
    return slim_copy(model, [torch.arange(w) for w in widths], input_size).eval()


@torch.no_grad()
def selector_codes(classifier: Backbone, decoder, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(c_z, c_t, sigma) of the selector for every image (explaining the predicted class) and that class."""
    classifier.eval()
    decoder.eval()
    codes, classes = [], []
    for start in range(0, len(images), batch):
        logits, stages = forward_with_stages(classifier, images[start:start + batch])
        classes.append(logits.argmax(1))
        codes.append(decoder.code(stages, classes[-1]))
    return torch.cat(codes), torch.cat(classes)


def centre_statistics(codes: Tensor, height: int, width: int) -> dict[str, float]:
    """Where the RBF selector's kernels (B x 3 codes (c_z, c_t, sigma) in pixels, Eq. 4) sit in an H x W frame:
    the spread of the centres and of sigma across images, the centres' offset from the image centre (H/2, W/2)
    (mean Euclidean distance and mean signed offset per axis, in pixels), and the mean share of each kernel's
    whole-plane mass 2 pi sigma^2 that lies outside the frame (``rbf_mass_outside_frame``), which R(m') of
    Eq. 9, counting only the frame's pixels, does not charge."""
    codes = codes.float()
    dz, dt = codes[:, 0] - height / 2, codes[:, 1] - width / 2
    plane = 2 * math.pi * codes[:, 2].clamp_min(MIN_SIGMA) ** 2
    outside = (rbf_mass_outside_frame(codes, height, width) / plane).clamp(0.0, 1.0)
    return {"centre_sd_z": float(codes[:, 0].std()), "centre_sd_t": float(codes[:, 1].std()),
            "sigma_mean": float(codes[:, 2].mean()), "sigma_sd": float(codes[:, 2].std()),
            "centre_offset_mean": float(torch.hypot(dz, dt).mean()),
            "centre_offset_z_mean": float(dz.mean()), "centre_offset_t_mean": float(dt.mean()),
            "kernel_mass_outside_frame_mean": float(outside.mean())}


def selector_report(classifier: Backbone, decoder, images: Tensor, seed: int = 0) -> dict[str, float]:
    """The selector's masks (kept-pixel fraction; for RBF kernels ``centre_statistics``) and its maps' faithfulness
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
    }
    if decoder.kind == "rbf":  # REAL-X codes are per-pixel logits: no centre, no sigma
        out.update(centre_statistics(codes, *images.shape[-2:]))
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


def run_summary(pipeline: Pipeline, images: Tensor, split: str = "test") -> dict[str, Any]:
    """One gate search's result for the steering comparison: kept channels, top-1 on ``split`` ("test": the
    held-out split; "val": the validation split, for choices) under the run's precision policy, explanation
    drift (Grad-CAM and the selector's maps, fp32) of the slim network before and, when it exists, after
    fine-tuning on ``images`` (drawn from the same split), and the interpretation term of Eq. 10 under the hard
    gates (``interpretation_term``) on the pruning subset and on ``images``."""
    gates = load_checkpoint(pipeline.require("gates"))
    loader = pipeline.loader(256, train=False, split=split)
    decoder = pipeline.decoder()
    s = pipeline.settings
    split_name = pipeline.data.test_split_name if split == "test" else f"validation ({pipeline.data.val_source})"
    out: dict[str, Any] = {"gamma1": s.gamma1, "gamma2": s.gamma2, "interpretation_units": s.interpretation_units,
                           "gate_objective": s.gate_objective, "seed": pipeline.seed,
                           "prunable_kept_ratio": gates["prunable_kept_ratio"],
                           "channels_kept": {k: len(v) for k, v in gates["keep"].items()},
                           "split": split_name, "keep": gates["keep"],
                           "gradient_share_summary": gates.get("gradient_share_summary")}
    slim = load_backbone(pipeline.require("slim"), pipeline.device, pipeline.input_size)
    targets = load_checkpoint(pipeline.require("targets"))
    subset = images_as_float(pipeline.data.train.subset(targets["indices"]), pipeline.device)
    out["interpretation_term_subset"] = interpretation_term(pipeline.classifier, slim, decoder, subset,
                                                            targets["explained"].to(pipeline.device))
    out["interpretation_term_images"] = interpretation_term(pipeline.classifier, slim, decoder, images)
    models = {"before_finetune": slim}
    if pipeline.path("finetune").is_file():
        models["after_finetune"] = pipeline.final_model()
    for when, model in models.items():
        out[f"top1_{when}"] = evaluate_top1(pipeline.policy.prepare_model(model), loader, precision=pipeline.policy)
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


# --- the subcommands ----------------------------------------------------------------------------------------

def run_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that reopen a run directory: the shared device / threads / precision flags."""
    parser.add_argument("--run", required=True, help="run directory written by train")
    parser.add_argument("--data-root", default=None, help="override the dataset root stored in the run")
    add_common_arguments(parser, seed=False)
    add_precision_argument(parser, default=None)  # None: the run's own precision setting


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    """The study subcommands' parsers (sweep, blocks, speed, report, compare)."""
    sweep = sub.add_parser("sweep", help="the selector loss (Eq. 8) along sigma for a centred kernel, on the "
                                         "validation split, with the run's predictor")
    run_flags(sweep)
    sweep.add_argument("--images", type=int, default=256, help="number of validation images")
    sweep.add_argument("--sigmas", type=float, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 16, 24, 64])
    sweep.add_argument("--tau", type=float, nargs="+", default=None,
                       help="mask temperatures to score with (default: the run's mask_tau)")
    sweep.add_argument("--samples", type=int, default=4, help="masks per image")

    blocks = sub.add_parser("blocks", help="time a 3x3 conv against its number of output channels (the table "
                                           "that chose the CPU channel block)")
    blocks.add_argument("--batch", type=int, default=128)
    blocks.add_argument("--repeats", type=int, default=20)
    add_common_arguments(blocks, device=False, seed=False)

    speed = sub.add_parser("speed", help="speedup vs MAC ratio of slim networks against the dense start, each in "
                                         "its fastest form (common.deploy), on class-mixed held-out images")
    speed.add_argument("--backbone", default="resnet20", choices=list_backbones())
    speed.add_argument("--widths", action="append", default=[], metavar="NAME=W1,W2,...",
                       help="a slim network: kept channels per prunable site (repeatable)")
    speed.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                       help="the fine-tuned slim network of a run directory (repeatable)")
    speed.add_argument("--dataset", default="cifar10")
    speed.add_argument("--data-root", default=None)
    speed.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    speed.add_argument("--repeats", type=int, default=20)
    speed.add_argument("--compile", default=None, choices=("jit", "inductor"))
    add_common_arguments(speed, device=False, seed=False)
    add_precision_argument(speed)  # bf16: every model is timed with bf16 weights (common.deploy)

    report = sub.add_parser("report", help="the selector's masks (kept fraction, centre spread and offset) and its "
                                           "insertion / ROAD beside Grad-CAM and random, on the held-out test split")
    run_flags(report)
    report.add_argument("--images", type=int, default=500, help="class-mixed test images")

    compare = sub.add_parser("compare", help="gate searches side by side (e.g. gamma1 vs gamma1 = 0): kept "
                                             "channels, top-1, drift, the interpretation term under the hard "
                                             "gates and the manipulation check of steering")
    compare.add_argument("--run", action="extend", nargs="+", required=True, metavar="[NAME=]DIR",
                         help="one or more runs (runs/a_s0 runs/a_s1 or runs/a_s{0,1,2}); repeatable")
    compare.add_argument("--paired", action="extend", nargs="+", default=[], metavar="[NAME=]DIR",
                         help="the other arm, one run per --run in the same seed order: per-pair kept-channel "
                              "differences and a paired t-test of every metric (e.g. gamma1 = 0 vs the default)")
    compare.add_argument("--unsteered", action="extend", nargs="+", default=[], metavar="[NAME=]DIR",
                         help=f"an unsteered search (gamma1 = 0; >= {MIN_UNSTEERED} seeds): the manipulation "
                              "check, each --run's interpretation term against their spread")
    compare.add_argument("--split", default="test", choices=("test", "val"),
                         help="top-1, drift and interpretation-term images: the held-out split (test) or the "
                              "validation split (val, for choosing settings)")
    compare.add_argument("--images", type=int, default=500, help="class-mixed images of --split for the drift")
    compare.add_argument("--figure", default=None, metavar="PATH.png",
                         help="also draw the runs against gamma1 (interpretation term with the unsteered spread, "
                              "top-1, drift; isp/figures.py) into PATH (.png, .pdf or .svg) and write the printed "
                              "JSON beside it (same stem, .json), so the figure can be redrawn")
    compare.add_argument("--data-root", default=None)
    add_common_arguments(compare, seed=False)
    add_precision_argument(compare, default=None)


def named(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"expected NAME=VALUE, got {spec!r}")
    return name, value


def sweep_command(args: argparse.Namespace) -> None:
    pipeline = reopen_pipeline(args.run, args.data_root, args.device, args.precision)
    s = pipeline.settings
    predictor = load_backbone(pipeline.require("predictor"), pipeline.device, pipeline.input_size)
    # The first N validation images: splits come class-interleaved (common.data), so every class holds its share.
    images = pipeline.data.val.images[:args.images].float().div(255).to(pipeline.device)
    print(f"split: validation ({pipeline.data.val_source}), {len(images)} images; lambda1 {s.lambda1}, "
          f"lambda2 {s.lambda2}; predictor trained at mask_tau {s.mask_tau}")
    print("tau | sigma | KL | R | S | total")
    for tau in args.tau or [s.mask_tau]:
        for row in loss_along_sigma(pipeline.classifier, predictor, images, args.sigmas, tau=tau,
                                    lambda1=s.lambda1, lambda2=s.lambda2, samples=args.samples):
            print(f"{tau:g} | {row['sigma']:g} | {row['kl']:.3f} | {row['R']:.3f} | {row['S']:.3f} | "
                  f"{row['total']:.3f}")


def blocks_command(args: argparse.Namespace) -> None:
    from .hardware import conv_output_channel_times, hardware_channel_block

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, block {hardware_channel_block('cpu')}, "
          f"{torch.get_num_threads()} thread(s), batch {args.batch}, median of {args.repeats}, interleaved")
    for in_channels, size, widths in ((16, 32, [4, 6, 8, 9, 12, 16]), (32, 16, [8, 12, 16, 17, 24, 32]),
                                      (64, 8, [16, 24, 32, 33, 48, 64])):
        times = conv_output_channel_times(in_channels, widths, size, args.batch, args.repeats)
        full = times[widths[-1]]
        print(f"3x3 conv {in_channels} -> c on {size}x{size}: " + ", ".join(
            f"c={c}: {times[c] / full:.2f}" for c in widths) + f"  (time / time at c={widths[-1]})")


def speed_command(args: argparse.Namespace) -> None:
    from common.speed import class_mixed_images

    data = load_dataset(args.dataset, args.data_root, val_source="test-half")
    models = {"dense": build_backbone(args.backbone, data.num_classes).eval()}
    for spec in args.widths:
        name, value = named(spec)
        models[name] = slim_from_widths(args.backbone, [int(w) for w in value.split(",")], data.num_classes)
    for spec in args.run:
        name, value = named(spec)
        models[name] = load_run(value, device="cpu")
    images = class_mixed_images(data.test, max(args.batch), seed=0)
    bf16 = resolve_precision(args.precision, "cpu").name == "bf16"
    timing = speed_against_dense(models, images, args.batch, args.repeats, args.compile, bf16=bf16)
    dense_macs = count_macs(models["dense"])
    form = "BN folded, channels_last" + (", bf16 weights" if bf16 else "")
    form += f", {args.compile}" if args.compile else ""
    print(f"{torch.get_num_threads()} thread(s), images: {data.test_split_name}, class-mixed; fastest form "
          f"({form}); interleaved, median of {args.repeats}")
    print("model | MACs | MAC ratio | " + " | ".join(f"speedup b={b}" for b in args.batch))
    for name, model in models.items():
        macs = count_macs(model)
        cells = " | ".join(f"{timing['batches'][b][name]['ratio']:.2f}x" for b in args.batch)
        print(f"{name} | {macs / 1e6:.2f} M | {dense_macs / macs:.2f}x | {cells}")


def report_command(args: argparse.Namespace) -> None:
    from common.speed import class_mixed_images

    pipeline = reopen_pipeline(args.run, args.data_root, args.device, args.precision)
    images = class_mixed_images(pipeline.data.test, args.images, seed=0).to(pipeline.device)
    out = selector_report(pipeline.classifier, pipeline.decoder(), images)
    out["split"] = pipeline.data.test_split_name
    print(json.dumps(out, indent=1))


def compare_command(args: argparse.Namespace) -> None:
    from common.speed import class_mixed_images

    from .figures import FIGURE_SUFFIXES, sweep_figure  # matplotlib is loaded by this command only

    measured: dict[str, dict] = {}  # a run named in two roles (--paired and --unsteered) is measured once

    def summaries(specs: list[str]) -> dict[str, dict]:
        rows = {}
        for spec in specs:
            name, path = named(spec) if "=" in spec else (Path(spec).name, spec)
            key = str(Path(path).resolve())
            if key not in measured:
                pipeline = reopen_pipeline(path, args.data_root, args.device, args.precision)
                split = pipeline.data.test if args.split == "test" else pipeline.data.val
                images = class_mixed_images(split, args.images, seed=0).to(pipeline.device)
                measured[key] = run_summary(pipeline, images, args.split)
            rows[name] = dict(measured[key])
        return rows

    figure = Path(args.figure) if args.figure is not None else None
    if figure is not None and figure.suffix.lower() not in FIGURE_SUFFIXES:  # before any run is reopened
        raise ValueError(f"--figure must end in one of {', '.join(FIGURE_SUFFIXES)}, got {args.figure!r}")
    if args.unsteered and len(args.unsteered) < MIN_UNSTEERED:
        raise ValueError(f"the manipulation check needs >= {MIN_UNSTEERED} --unsteered runs, got "
                         f"{len(args.unsteered)}")
    if args.paired:  # --run A (one per seed) --paired B (the same seeds, same order)
        if len(args.run) != len(args.paired):
            raise ValueError(f"--run and --paired need the same number of runs (one per seed), got "
                             f"{len(args.run)} and {len(args.paired)}")
        rows_a, rows_b = summaries(args.run), summaries(args.paired)
        kept = [kept_channel_difference(a["keep"], b["keep"]) for a, b in zip(rows_a.values(), rows_b.values())]
        result = {"a": list(rows_a), "b": list(rows_b), "kept_channel_difference_per_pair": kept,
                  "paired": paired_differences(list(rows_a.values()), list(rows_b.values())),
                  "runs": {**rows_a, **rows_b}}
    else:
        rows = summaries(args.run)
        names = list(rows)
        result = {"runs": rows, "kept_channel_difference": {
            f"{a} vs {b}": kept_channel_difference(rows[a]["keep"], rows[b]["keep"])
            for i, a in enumerate(names) for b in names[i + 1:]}}
    if args.unsteered:
        steered = {name: result["runs"][name] for name in (result.get("a") or list(result["runs"]))}
        unsteered = summaries(args.unsteered)
        result["manipulation_check"] = manipulation_check(steered, unsteered)
        result["unsteered_runs"] = unsteered
    for row in [*result["runs"].values(), *result.get("unsteered_runs", {}).values()]:
        row.pop("keep", None)
    print(json.dumps(result, indent=1))
    if figure is not None:
        atomic_write_json(result, figure.with_suffix(".json"))
        sweep_figure(result["runs"], result.get("unsteered_runs"), figure)
        print(f"figure written to {figure}, its data to {figure.with_suffix('.json')}", file=sys.stderr)


STUDY_COMMANDS = {"sweep": sweep_command, "blocks": blocks_command, "speed": speed_command,
                  "report": report_command, "compare": compare_command}
