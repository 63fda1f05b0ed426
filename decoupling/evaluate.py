"""Measurements of a trained decoupled network -> metrics.json: accuracy, per-sample MACs, filter states,
class information in the paths (with controls), adversarial detection (with control), CPU speed.

The figures are of the *deployed* network: filter states frozen on calibration images of the training
split (silent filters removed, energetic ones always on, ``DecoupledNet.freeze_states``), which is the
network ``execution.FastDecoupledResNet`` runs. Filter states themselves are counted with the raw gates
(Eq. 5) on the reported split, as the paper defines them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common import speed
from common.data import BatchLoader, DatasetSplits, ImageTensors
from common.macs import count_macs, count_params
from common.method import shared_metrics
from common.precision import resolve_precision
from common.run import progress

from .model import DecoupledNet
from .paths import FilterStates, classify_filters, collect_paths, layer_slices
from .train import class_mixed_indices


@torch.no_grad()
def mean_dynamic_macs(model: DecoupledNet, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    per_sample = [model.dynamic_forward(x)[1] for x, _ in progress(batches, "dynamic MACs")]
    return float(torch.cat(per_sample).mean())


def timing_images(split: ImageTensors, n: int, seed: int = 0) -> Tensor:
    """The images the speed figures are timed on: ``n`` class-mixed images in [0, 1]."""
    if n > len(split):
        raise ValueError(f"asked for {n} images from a split of {len(split)}")
    return speed.class_mixed_images(split, n, seed)


def speed_report(model: DecoupledNet, dense: nn.Module, images: Tensor, batch_sizes: Sequence[int] = (1, 128),
                 repeats: int = 20, calibration: Tensor | None = None) -> dict[str, Any]:
    """CPU time of the deployed decoupled network (``execution.FastDecoupledResNet``) against the dense
    start in its fastest form, side by side (``common.speed.time_side_by_side``: interleaved, warmed up,
    medians) on class-mixed ``images``. The dense forms are ``common.deploy.deploy`` (BN folded,
    channels_last), the same traced by TorchScript (``compile="jit"``) and this package's eager BN-folded
    ResNet; the decoupled forms are ``FastDecoupledResNet`` (gathered at batch 1, masked in batches) and its
    masked form traced by TorchScript; the speedup is the fastest decoupled form against the fastest dense
    form at each batch size. The pattern cache is warmed on ``calibration`` images (training split), never
    on the timed ones."""
    from common.deploy import deploy

    from .execution import deploy_decoupled, executed_macs, fold_dense, traced_masked

    fast = deploy_decoupled(model)  # gathered at batch 1, grouped by pattern in batches
    masked = deploy_decoupled(model, batch1_gathered=False, batched="masked")
    if calibration is not None:
        for i in range(len(calibration)):
            fast(calibration[i:i + 1])
        for i in range(0, len(calibration), 128):
            fast(calibration[i:i + 128])
    dense = dense.cpu().eval()
    forms: dict[str, Callable[[Tensor], Any]] = {"decoupled": fast, "decoupled_masked": masked,
                                                 "dense_eager_folded": fold_dense(dense)}
    # The masked form traced by TorchScript (channels_last), one trace per batch size, traced on
    # calibration-shaped zeros (a trace records shapes, not values).
    try:
        shape = tuple(images.shape[1:])
        traces = {b: traced_masked(fast, torch.zeros(b, *shape)) for b in batch_sizes}

        def masked_jit(x: Tensor) -> Tensor:
            return traces[x.shape[0]](x.contiguous(memory_format=torch.channels_last))
        forms["decoupled_masked_jit"] = masked_jit
    except Exception:
        pass
    example = images[:2]
    forms["dense_deploy"] = deploy(dense, example=example)
    try:
        forms["dense_deploy_jit"] = deploy(dense, example=example, compile="jit")
    except Exception:
        pass
    with torch.inference_mode():
        timing = speed.time_side_by_side(forms, images, batch_sizes, min_repeats=repeats, reference="decoupled")
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "images": len(images)}
    for b, row in timing["batches"].items():
        dense_name = min((n for n in row if n.startswith("dense")), key=lambda n: row[n]["seconds"])
        own_name = min((n for n in row if n.startswith("decoupled")), key=lambda n: row[n]["seconds"])
        report[f"ms_decoupled_b{b}"] = 1000 * row[own_name]["seconds"]
        report[f"fastest_decoupled_b{b}"] = own_name
        report[f"ms_dense_b{b}"] = 1000 * row[dense_name]["seconds"]
        report[f"fastest_dense_b{b}"] = dense_name
        report[f"speedup_b{b}"] = row[dense_name]["seconds"] / row[own_name]["seconds"]
        report[f"ms_all_b{b}"] = {n: 1000 * v["seconds"] for n, v in row.items()}
    report["pattern_cache_entries"] = sum(fast.cache_sizes())
    # Executed against reported MACs on the largest timed batch: counted on every convolution and matmul
    # dispatched (execution.executed_macs), against dynamic_forward's per-sample count of the same images.
    b = max(batch_sizes)
    x = images[torch.arange(b) % len(images)]
    _, reported = model.cpu().dynamic_forward(x)
    report["macs_check_batch"] = b
    report["macs_reported_per_image"] = float(reported.mean())
    report["macs_executed_per_image"] = {name: executed_macs(fn, x) / b for name, fn in
                                         (("grouped", fast), ("masked", masked), ("dense", fold_dense(dense)))}
    n = min(8, b)
    report["macs_executed_batch1_per_image"] = sum(executed_macs(fast, x[i:i + 1]) for i in range(n)) / n
    report["macs_reported_batch1_per_image"] = float(reported[:n].mean())
    return report


@torch.no_grad()
def deployed_predictions(model: DecoupledNet, split: ImageTensors, device: torch.device, batch_size: int = 256
                         ) -> tuple[Tensor, Tensor, float]:
    """(predicted classes, per-sample MACs, agreement) of the deployed network on ``split``, in the precision
    it runs (fp32). For a CIFAR ResNet the predictions are those of ``execution.FastDecoupledResNet`` itself;
    the MACs (and, for other backbones, the predictions) come from ``dynamic_forward`` in fp32, and
    ``agreement`` is the share of inputs on which the two forms predict the same class (1.0 when they are
    one form). The states must be frozen (``freeze_states`` or ``freeze_to_majority``)."""
    from .execution import deploy_decoupled

    kept = model.precision
    model.set_precision(resolve_precision("fp32", device, channels_last=False))
    # the masked batched form: the same network as the grouped one (tested), in fewer calls
    fast = deploy_decoupled(model, batched="masked") if type(model.backbone).__name__ == "CifarResNet" else None
    preds, own, macs = [], [], []
    try:
        for x, _ in progress(BatchLoader(split, batch_size, train=False, device=device), "deployed: top-1, MACs"):
            logits, per_sample = model.dynamic_forward(x)
            own.append(logits.argmax(1).cpu())
            macs.append(per_sample.cpu())
            preds.append(fast(x.cpu()).argmax(1) if fast is not None else own[-1])
    finally:
        model.set_precision(kept)
    pred, reference = torch.cat(preds), torch.cat(own)
    return pred, torch.cat(macs), float((pred == reference).double().mean())


def state_metrics(states: FilterStates) -> dict[str, Any]:
    fractions = states.fractions
    return {"energetic_filters": fractions["energetic"], "silent_filters": fractions["silent"],
            "dynamic_filters": fractions["dynamic"],
            "filter_states_per_layer": {name: counts for name, counts in zip(states.layer_names, states.per_layer)}}


def calibration_codes(model: DecoupledNet, train: ImageTensors, n: int, device: torch.device, seed: int = 0
                      ) -> Tensor:
    """Inference paths of ``n`` class-mixed training images: what the filter states are frozen on."""
    subset = train.subset(class_mixed_indices(train.labels, min(n, len(train)), seed))
    model.freeze_states(None)
    return torch.as_tensor(collect_paths(model, BatchLoader(subset, 256, train=False, device=device),
                                         "calibration paths").codes)


def freeze_for_deployment(model: DecoupledNet, train: ImageTensors, n: int, device: torch.device, seed: int = 0
                          ) -> tuple[Tensor, dict[str, Any]]:
    """The deployed network: filter states frozen (``DecoupledNet.freeze_states``) on the inference paths of
    ``n`` class-mixed training images in the form it runs and is loaded in (fp32, contiguous weights: a
    layout changes the rounding, and a gate at the threshold could flip). The model is left in that form.
    Returns the paths and the record of how the states were frozen (``save_decoupled``'s ``deployment``)."""
    model.to(memory_format=torch.contiguous_format)
    model.set_precision(resolve_precision("fp32", device, channels_last=False))
    codes = calibration_codes(model, train, n, device, seed)
    model.freeze_states(codes)
    return codes, {"calibration_images": len(codes), "calibration_seed": seed}


def val_split_name(data: DatasetSplits) -> str:
    """How the validation split is named next to a figure, e.g. "validation (test-half, 5,000)"."""
    return f"validation ({data.val_source}, {len(data.val):,})"


@torch.no_grad()
def evaluate_model(model: DecoupledNet, dense: nn.Module, test: ImageTensors, val: ImageTensors | None,
                   device: torch.device, split: str, target_mac_reduction: float | None = None,
                   batch_size: int = 256) -> dict[str, Any]:
    """The shared figures (``common.method.shared_metrics``) of ``model`` as it is (frozen or not) on
    ``test`` (named ``split``): top-1 and mean MACs of the deployed form in fp32, its parameters; the
    validation top-1 and MACs on ``val``; filter states of its raw gates on ``test``."""
    size = tuple(test.images.shape[1:])
    model.to(device).eval()
    # Top-1 of the deployed network in the precision it runs (fp32), not of a bf16 forward.
    pred, macs, agreement = deployed_predictions(model, test, device, batch_size)
    macs_dense = float(count_macs(dense.to(device), size))
    metrics: dict[str, Any] = shared_metrics(
        top1=100.0 * float((pred == test.labels.cpu()).double().mean()), split=split, macs=float(macs.mean()),
        dense_macs=macs_dense, params=count_params(model), precision="fp32",
        target_mac_reduction=target_mac_reduction)
    metrics.update({"top1_form": "deployed network, fp32", "deployed_agreement": agreement,
                    "macs_dense": macs_dense, "macs_controllers": float(model.dense_macs(size) - macs_dense),
                    "params_dense": count_params(dense)})
    if val is not None and len(val):
        pred_val, macs_val, _ = deployed_predictions(model, val, device, batch_size)
        metrics["val_top1"] = 100.0 * float((pred_val == val.labels.cpu()).double().mean())
        metrics["val_macs"] = float(macs_val.mean())
        metrics["val_mac_reduction"] = 1.0 - metrics["val_macs"] / macs_dense
    with model.raw_gates():
        raw = collect_paths(model, BatchLoader(test, batch_size, train=False, device=device), "raw paths")
    states = classify_filters(raw.codes, layer_slices(model.layer_channels), model.layer_names)
    metrics.update(state_metrics(states))
    return metrics


def frozen_disagreement(model: DecoupledNet, raw_codes: np.ndarray) -> float:
    """Share of inputs whose raw inference path (Eq. 5) differs from the deployed one at a frozen filter
    (an 'energetic' filter its controller closes, or a 'silent' one it opens)."""
    start, differs = 0, np.zeros(len(raw_codes), dtype=bool)
    for layer in model.gated_layers:
        block = raw_codes[:, start:start + layer.channels] > 0
        start += layer.channels
        if layer.always_on.numel():
            on, off = layer.always_on.cpu().numpy(), layer.always_off.cpu().numpy()
            differs |= (~block[:, on]).any(axis=1) | block[:, off].any(axis=1)
    return float(differs.mean())


def evaluate_run(model: DecoupledNet, dense: nn.Module, data: DatasetSplits, device: torch.device, *,
                 deployment: dict[str, Any] | None = None, report_split: str = "test", probe_fit_images: int = 5000,
                 seeds: int = 3, adv_runs: int = 3, adv_shots: Sequence[int] = (1, 5, 10), adv_test_per_class: int = 10,
                 adv_classifiers=None, latency_images: int = 256, speed_repeats: int = 21, seed: int = 0,
                 precision: str = "auto", target_mac_reduction: float | None = None) -> dict[str, Any]:
    """Every figure of the README for one trained run, of the deployed ``model`` (its filter states frozen:
    ``freeze_for_deployment``, as ``load_run`` returns it; ``deployment`` records how). ``dense`` is the
    pretrained start (the control). ``report_split`` "test" reports on ``data.test`` (the held-out half
    for a published start); "val" reports every figure on ``data.val`` (for recipe selection), so nothing
    is measured on the test split. The shared figures (``top1``, ``split``, ``macs``, ...) are of the
    reported split.

    Every forward of the decoupled network and of the control for the paths (probes, pooled features)
    runs under the ``precision`` policy (common.precision); gates, MAC counts, probes and AUCs are fp32.
    Top-1 and MACs are of the deployed network in fp32; the attacks' gradients and the speed figures run
    in fp32 (the timed forms are common.deploy's)."""
    from .adversarial import CLASSIFIERS, adversarial_detection, pooled_features_of
    from .explain import path_report

    if report_split not in ("test", "val"):
        raise ValueError(f"report_split must be 'test' or 'val', got {report_split!r}")
    if not model.deployed:
        raise ValueError("evaluate_run measures the deployed network: freeze its filter states first "
                         "(freeze_for_deployment)")
    split = data.test if report_split == "test" else data.val
    policy = resolve_precision(precision, device)
    metrics: dict[str, Any] = {"val_source": data.val_source, "report_split": report_split, **(deployment or {}),
                               "paths_precision": policy.describe()}
    model.set_precision(policy)  # the raw paths (filter states) under the policy; top-1 and MACs run fp32
    if report_split == "test":
        metrics.update(evaluate_model(model, dense, data.test, data.val, device, data.test_split_name,
                                      target_mac_reduction))
    else:  # selection: nothing is measured on the test split
        metrics.update(evaluate_model(model, dense, data.val, None, device, val_split_name(data),
                                      target_mac_reduction))
    with model.raw_gates():
        raw = collect_paths(model, BatchLoader(split, 256, train=False, device=device), "raw paths").codes
    metrics["frozen_state_disagreement"] = frozen_disagreement(model, raw)
    fit = data.train.subset(class_mixed_indices(data.train.labels, min(probe_fit_images, len(data.train)), seed + 1))
    metrics["paths"] = path_report(model, dense, fit, split, device, seeds, precision=policy)
    if adv_runs > 0:
        fp32 = resolve_precision("fp32", device, channels_last=False)
        model.set_precision(fp32)  # attack gradients and the paths they are read from in fp32
        classifiers = tuple(adv_classifiers or CLASSIFIERS)
        kwargs = {"shots": tuple(adv_shots), "runs": adv_runs, "test_per_class": adv_test_per_class,
                  "classifiers": classifiers, "seed": seed}
        metrics["adv_auc_paths"] = adversarial_detection(model, data.train, split, device, **kwargs)
        dense_dev = dense.to(device).eval()
        metrics["adv_auc_plain_features"] = adversarial_detection(dense_dev, data.train, split, device,
                                                                  features=pooled_features_of(dense_dev, fp32),
                                                                  **kwargs)
        metrics["adv_protocol"] = {**{k: v for k, v in kwargs.items() if k != "seed"}, "eps": "8/255",
                                   "pgd_steps": 10, "pgd_step": "2/255"}
    model.set_precision(resolve_precision("fp32", device, channels_last=False))
    if latency_images > 0 and type(model.backbone).__name__ == "CifarResNet":
        n = min(latency_images, len(split))
        batches = tuple(b for b in (1, 128) if b <= n)
        calibration = timing_images(data.train, min(200, len(data.train)), seed + 2)
        metrics["speed"] = speed_report(model.cpu(), dense.cpu(), timing_images(split, n, seed), batches,
                                        speed_repeats, calibration)
        model.to(device)
    return metrics
