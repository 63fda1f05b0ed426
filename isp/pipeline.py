"""The ISP pipeline as resumable stages, each writing its artefact to the run directory:

predictor.pt (Eq. 6-7) -> selector.pt (Eq. 8-9) -> targets.pt (C_x on the 5% subset) -> gates.pt (Eq. 10)
-> slim.pt (physically pruned, checked against the gated network) -> model.pt (fine-tuned) -> metrics.json.
A stage whose artefact exists is skipped; an interrupted stage resumes from checkpoint.pt.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from common.backbones import Backbone, build_backbone, list_backbones
from common.data import BatchLoader, DatasetSplits
from common.macs import count_macs, count_params
from common.method import Budget
from common.run import RunDir, atomic_torch_save, atomic_write_json, load_checkpoint, read_json, seed_everything
from common.training import evaluate_top1, measure_latency

from . import stages
from .gates import ChannelGates, GateInjector, PrunableMacs, group_sizes, prunable_sites
from .hardware import resolve_channel_group
from .rbf import bernoulli_mask, mask_input
from .selector import DecoderShape, Selector, SelectorDecoder, decoder_shape
from .settings import STAGE_SHARES, ISPSettings
from .slim import keep_from_json, keep_to_json, kept_indices, slim_copy

STAGES = ("predictor", "selector", "targets", "gates", "slim", "finetune", "evaluate")
# The slim network must compute what the gated one computes; float32 reorderings stay far below this.
SLIM_TOLERANCE = 1e-3
# Checkpoint at least every epoch, and every 200 steps within long epochs.
SAVE_EVERY = 200


class StageOrderError(RuntimeError):
    """A single stage was requested before the stages it depends on have written their artefacts."""


def identify_backbone(model: Backbone) -> str:
    """The registry name whose architecture has exactly ``model``'s parameter names and shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    num_classes = model.classifier.out_features
    for name in list_backbones():
        candidate = build_backbone(name, num_classes).state_dict()
        if {k: tuple(v.shape) for k, v in candidate.items()} == own:
            return name
    raise ValueError(f"{type(model).__name__} matches no registered backbone; ISP needs one of {list_backbones()}")


def save_backbone(path: Path, name: str, model: Backbone, keep: dict[str, list[int]] | None) -> None:
    """A (possibly slim) backbone as registry name + kept channels + state dict: rebuildable, no pickled code."""
    atomic_torch_save({"backbone": name, "num_classes": model.classifier.out_features, "keep": keep,
                       "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_backbone(path: Path, device: torch.device | str = "cpu",
                  input_size: tuple[int, int, int] = (3, 32, 32)) -> Backbone:
    blob = load_checkpoint(path)
    model = build_backbone(blob["backbone"], blob["num_classes"])
    if blob["keep"] is not None:
        model = slim_copy(model, keep_from_json(prunable_sites(model, input_size), blob["keep"]), input_size)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


def save_decoder(path: Path, decoder: SelectorDecoder) -> None:
    atomic_torch_save({"kind": decoder.kind, "shape": asdict(decoder.shape),
                       "centre_margin": getattr(decoder.head, "centre_margin", None),
                       "state_dict": decoder.state_dict()}, path)


def load_decoder(path: Path, device: torch.device | str = "cpu") -> SelectorDecoder:
    blob = load_checkpoint(path)
    shape = blob["shape"]
    shape = DecoderShape(list(shape["stage_channels"]), [tuple(s) for s in shape["stage_sizes"]],
                         tuple(shape["image_size"]), shape["num_classes"])
    decoder = SelectorDecoder(shape, blob["kind"], centre_margin=blob["centre_margin"] or 2.0)
    decoder.load_state_dict(blob["state_dict"])
    return decoder.to(device).eval()


class Pipeline:
    """Runs (or resumes) every stage for one classifier, dataset, budget and settings."""

    def __init__(self, out_dir: str | Path, classifier: Backbone, data: DatasetSplits, budget: Budget,
                 settings: ISPSettings, device: torch.device, seed: int = 0, backbone_name: str | None = None):
        self.run_dir = RunDir(out_dir)
        self.log = self.run_dir.logger("isp")
        self.device = device
        self.seed = seed
        self.data = data
        self.budget = budget
        self.settings = settings
        self.name = backbone_name or identify_backbone(classifier)
        self.image_size = data.image_size
        self.input_size = (3, *self.image_size)
        self.classifier_path = self.run_dir.file("classifier.pt")
        if not self.classifier_path.is_file():
            save_backbone(self.classifier_path, self.name, classifier, None)
        # The run's own copy, so freezing it never touches the caller's model.
        self.classifier = load_backbone(self.classifier_path, device, self.input_size)
        self.seconds_path = self.run_dir.file("stage_seconds.json")
        self.channel_group = resolve_channel_group(settings.channel_group, device)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def path(self, stage: str) -> Path:
        return self.run_dir.file({"predictor": "predictor.pt", "selector": "selector.pt", "targets": "targets.pt",
                                  "gates": "gates.pt", "slim": "slim.pt", "finetune": "model.pt",
                                  "evaluate": "metrics.json"}[stage])

    def _record_seconds(self, stage: str, seconds: float) -> None:
        record = read_json(self.seconds_path) if self.seconds_path.is_file() else {}
        record[stage] = seconds
        atomic_write_json(record, self.seconds_path)

    def train_seconds(self) -> float:
        return float(sum(read_json(self.seconds_path).values())) if self.seconds_path.is_file() else 0.0

    def _steps(self, stage: str, per_epoch: int) -> int:
        epochs = self.settings.stage_epochs(stage, self.budget.epochs)
        return Budget(epochs, max_batches=self.budget.max_batches).batches(per_epoch)

    def _seconds(self, stage: str) -> float | None:
        if self.budget.seconds is None:
            return None
        return STAGE_SHARES.get(stage, 0.0) * self.budget.seconds

    def _loader(self, batch: int, train: bool = True, split: str = "train") -> BatchLoader:
        return BatchLoader(getattr(self.data, split), batch, train=train, device=self.device, seed=self.seed)

    def _require(self, stage: str) -> Path:
        path = self.path(stage)
        if not path.is_file():
            raise StageOrderError(f"stage {stage!r} has not been run in {self.run_dir.path} ({path.name} is missing);"
                                  f" run `python -m isp train` without --stage, or with --stage {stage} first")
        return path

    # --- stages ------------------------------------------------------------------------------------------
    def run(self, only: str | None = None) -> None:
        if only is not None and only not in STAGES:
            raise ValueError(f"unknown stage {only!r}; stages are {', '.join(STAGES)}")
        for stage in STAGES:
            if only is not None and stage != only:
                continue
            # Evaluation is cheap and re-run on request; training stages never repeat once their artefact exists.
            if self.path(stage).is_file() and not (stage == "evaluate" and only == "evaluate"):
                self.log.info("stage %s: %s exists, skipped", stage, self.path(stage).name)
                continue
            seed_everything(self.seed + STAGES.index(stage))
            self.log.info("stage %s: start", stage)
            getattr(self, f"_stage_{stage}")()
            self.log.info("stage %s: done", stage)

    def _stage_predictor(self) -> None:
        s = self.settings
        predictor = build_backbone(self.name, self.data.num_classes)
        if s.predictor_from_classifier:
            predictor.load_state_dict(self.classifier.state_dict())
        predictor.to(self.device)
        loader = self._loader(s.predictor_batch)
        state = stages.train_predictor(self.run_dir, self.classifier, predictor, loader,
                                       self._steps("predictor", len(loader)), lr=s.predictor_lr,
                                       weight_decay=s.predictor_weight_decay, kind=s.selector,
                                       tau=s.mask_tau, sigma_max=s.predictor_sigma_max,
                                       seconds=self._seconds("predictor"), log=self.log,
                                       save_every=min(SAVE_EVERY, len(loader)))
        save_backbone(self.path("predictor"), self.name, predictor, None)
        self._record_seconds("predictor", state.seconds)

    def _stage_selector(self) -> None:
        s = self.settings
        predictor = load_backbone(self._require("predictor"), self.device, self.input_size)
        shape = decoder_shape(self.classifier, self.image_size, self.data.num_classes)
        decoder = SelectorDecoder(shape, s.selector, s.centre_margin, s.sigma_bias).to(self.device)
        loader = self._loader(s.selector_batch)
        state = stages.train_selector(self.run_dir, self.classifier, predictor, decoder, loader,
                                      self._steps("selector", len(loader)), lr=s.selector_lr,
                                      weight_decay=s.selector_weight_decay, lambda1=s.lambda1,
                                      lambda2=s.lambda2 if s.selector == "rbf" else 0.0, tau=s.mask_tau,
                                      seconds=self._seconds("selector"), log=self.log,
                                      save_every=min(SAVE_EVERY, len(loader)))
        save_decoder(self.path("selector"), decoder)
        self._record_seconds("selector", state.seconds)

    def _stage_targets(self) -> None:
        decoder = load_decoder(self._require("selector"), self.device)
        indices = stages.subset_indices(len(self.data.train), self.settings.subset_fraction, self.seed)
        images = stages.images_as_float(self.data.train.subset(indices), self.device)
        codes, explained = stages.explanation_targets(self.classifier, decoder, images)
        atomic_torch_save({"indices": indices, "codes": codes.cpu(), "explained": explained.cpu()},
                          self.path("targets"))

    def _subset(self) -> stages.PruningSubset:
        blob = load_checkpoint(self._require("targets"))
        split = self.data.train.subset(blob["indices"])
        return stages.PruningSubset(stages.images_as_float(split, self.device), split.labels.to(self.device),
                                    blob["codes"].to(self.device), blob["explained"].to(self.device))

    def _gates(self) -> tuple[list, ChannelGates, PrunableMacs]:
        sites = prunable_sites(self.classifier, self.input_size)
        channels = [s.channels for s in sites]
        groups = group_sizes(channels, self.channel_group)
        gates = ChannelGates(channels, self.settings.gate_bias, self.settings.gate_tau, groups)
        return sites, gates.to(self.device), PrunableMacs(self.classifier, sites, self.input_size)

    def _stage_gates(self) -> None:
        s = self.settings
        decoder = load_decoder(self._require("selector"), self.device)
        subset = self._subset()
        sites, gates, macs = self._gates()
        per_epoch = max(1, len(subset.labels) // s.gate_batch)
        weights = stages.GateLossWeights(s.classification_weight, s.gamma1, s.gamma2, s.target_ratio,
                                        s.interpretation_units)
        state = stages.search_gates(self.run_dir, self.classifier, decoder, sites, gates, macs, subset,
                                    self._steps("gates", per_epoch), batch_size=s.gate_batch, lr=s.gate_lr,
                                    weights=weights, seed=self.seed, seconds=self._seconds("gates"), log=self.log,
                                    save_every=min(SAVE_EVERY, per_epoch))
        hard = gates.hard()
        keep = keep_to_json(sites, kept_indices(hard))
        ratio = float(macs(hard)) / macs.total
        self.log.info("gates: prunable MACs kept %.3f (target p = %.3f)", ratio, s.target_ratio)
        atomic_torch_save({"theta": gates.theta.detach().cpu(), "keep": keep, "prunable_kept_ratio": ratio,
                           "channel_groups": gates.groups,
                           "prunable_macs_total": macs.total}, self.path("gates"))
        self._record_seconds("gates", state.seconds)

    def _stage_slim(self) -> None:
        blob = load_checkpoint(self._require("gates"))
        sites = prunable_sites(self.classifier, self.input_size)
        keep = keep_from_json(sites, blob["keep"])
        slim = slim_copy(self.classifier, keep, self.input_size)
        hard = [torch.zeros(s.channels, device=self.device).index_fill_(0, k.to(self.device), 1.0)
                for s, k in zip(sites, keep)]
        x, _ = next(iter(self._loader(64, train=False, split="val")))
        difference = slim_vs_gated(self.classifier, slim, sites, hard, x)
        if difference > SLIM_TOLERANCE:
            raise RuntimeError(f"the slim network differs from the gated one by {difference:.2e} (> "
                               f"{SLIM_TOLERANCE}); physical pruning is broken for backbone {self.name}")
        self.log.info("slim: max |logit difference| to the gated network %.2e", difference)
        save_backbone(self.path("slim"), self.name, slim, blob["keep"])
        atomic_write_json({"max_abs_logit_difference": difference}, self.run_dir.file("slim_check.json"))

    def _stage_finetune(self) -> None:
        s = self.settings
        model = load_backbone(self._require("slim"), self.device, self.input_size)
        for p in model.parameters():
            p.requires_grad_(True)
        loader = self._loader(s.finetune_batch)
        val_loader = self._loader(256, train=False, split="val")
        steps = self._steps("finetune", len(loader))
        val_every = max(1, round(s.val_every_epochs * len(loader)))
        state = stages.finetune(self.run_dir, model, loader, val_loader, steps, lr=s.finetune_lr,
                                momentum=s.finetune_momentum, weight_decay=s.finetune_weight_decay,
                                schedule=s.finetune_schedule, val_every=min(val_every, steps),
                                seconds=self._seconds("finetune"), log=self.log,
                                save_every=min(SAVE_EVERY, len(loader)))
        save_backbone(self.path("finetune"), self.name, model, load_checkpoint(self.path("slim"))["keep"])
        self._record_seconds("finetune", state.seconds)

    def _stage_evaluate(self) -> None:
        metrics = evaluate_run(self)
        self.run_dir.write_metrics(metrics)

    # --- products ----------------------------------------------------------------------------------------
    def final_model(self) -> Backbone:
        return load_backbone(self._require("finetune"), self.device, self.input_size)

    def decoder(self) -> SelectorDecoder:
        return load_decoder(self._require("selector"), self.device)


@torch.no_grad()
def slim_vs_gated(classifier: Backbone, slim: Backbone, sites, hard, images: torch.Tensor) -> float:
    """Max |logit difference| between the classifier with hard gates and the physically pruned network."""
    classifier.eval()
    slim.eval()
    injector = GateInjector(sites)
    injector.values = hard
    with injector:
        gated = classifier(images)
    return float((gated - slim(images)).abs().max())


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


def cpu_latency(model: Backbone, input_size, batch: int, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_latency(copy.deepcopy(model).cpu(), input_size, batch, "cpu", repeats=15)
    finally:
        torch.set_num_threads(previous)


def evaluate_run(pipeline: Pipeline, max_explained: int = 2000) -> dict[str, Any]:
    """Everything metrics.json reports; selection already happened on the validation split."""
    s = pipeline.settings
    dev = pipeline.device
    original = pipeline.classifier
    final = pipeline.final_model()
    slim_before_ft = load_backbone(pipeline.path("slim"), dev, pipeline.input_size)
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
    lat_before = cpu_latency(original, pipeline.input_size, s.latency_batch, s.latency_threads)
    lat_after = cpu_latency(final, pipeline.input_size, s.latency_batch, s.latency_threads)
    explained = stages.images_as_float(pipeline.data.test, dev)[:max_explained]
    original_selector = Selector(original, decoder)
    metrics: dict[str, Any] = {
        "backbone": pipeline.name,
        "dataset": pipeline.data.name,
        "val_source": pipeline.data.val_source,
        "test_split_name": pipeline.data.test_split_name,
        "selector": decoder.kind,
        "top1_before": evaluate_top1(original, test),
        "top1_after": evaluate_top1(final, test),
        "top1_after_pruning_before_finetune": evaluate_top1(slim_before_ft, test),
        "val_top1_before": evaluate_top1(original, val),
        "val_top1_after": evaluate_top1(final, val),
        "macs_before": macs_before,
        "macs": macs_after,
        "params_before": count_params(original),
        "params": count_params(final),
        "pruned_macs_ratio": 1.0 - macs_after / macs_before,
        "prunable_macs_kept_ratio": float(prunable(hard)) / prunable.total,
        "target_ratio_p": s.target_ratio,
        "channels_kept": {site.name: len(k) for site, k in zip(sites, keep)},
        "channel_groups": gates_blob.get("channel_groups"),
        "cpu_latency_ms_before": 1000 * lat_before,
        "cpu_latency_ms_after": 1000 * lat_after,
        "cpu_speedup": lat_before / lat_after,
        "latency_setting": f"batch {s.latency_batch}, {s.latency_threads} CPU thread(s), median of 15",
        "explanation_distance": explanation_distance(original_selector, Selector(final, decoder), explained),
        "explanation_distance_before_finetune": explanation_distance(original_selector,
                                                                     Selector(slim_before_ft, decoder), explained),
        **selector_fidelity(original_selector, predictor, explained),
        "explained_test_images": len(explained),
        "stage_seconds": read_json(pipeline.seconds_path) if pipeline.seconds_path.is_file() else {},
    }
    metrics["rbf_distance"] = metrics["explanation_distance"]["mean_l2"]
    check = pipeline.run_dir.file("slim_check.json")
    if check.is_file():
        metrics["slim_max_abs_logit_difference"] = read_json(check)["max_abs_logit_difference"]
    metrics["evaluate_seconds"] = time.perf_counter() - started
    return metrics
