"""The three CLI commands; argument parsing lives in ``__main__``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.method import Budget
from common.run import RunDir, pick_device, seed_everything

from .model import DecoupledNet, load_decoupled, save_decoupled
from .settings import resolve_settings
from .train import build_objective, train_decoupled


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def train(args: argparse.Namespace, recipe: dict[str, Any], overrides: dict[str, Any]) -> int:
    _threads(args)
    backbone = args.backbone or recipe.get("backbone")
    dataset = args.dataset or recipe.get("dataset")
    epochs = args.epochs if args.epochs is not None else recipe.get("epochs")
    if not backbone or not dataset or epochs is None:
        raise ValueError("train needs --backbone, --dataset and --epochs (or a --config that sets them)")
    seconds = args.seconds if args.seconds is not None else recipe.get("seconds")
    max_batches = args.max_batches if args.max_batches is not None else recipe.get("max_batches")
    settings = resolve_settings(backbone, {**recipe.get("settings", {}), **overrides})
    device = pick_device(args.device)
    seed_everything(args.seed)
    run = RunDir(args.out)
    config = {"backbone": backbone, "dataset": dataset, "data_root": args.data_root, "weights": args.weights,
              "epochs": epochs, "seconds": seconds, "max_batches": max_batches, "seed": args.seed,
              "settings": settings}
    if run.config_path.is_file() and run.checkpoint_path.is_file():
        previous = run.read_config()
        changed = [k for k in ("backbone", "dataset", "settings", "seed") if previous.get(k) != config[k]]
        if changed:
            raise ValueError(f"{run.path} holds a run with different {changed}; use another --out to start afresh")
    run.write_config(config)
    run.write_environment(device)
    logger = run.logger("decoupling")
    data = load_dataset(dataset, args.data_root)
    start = build_backbone(backbone, data.num_classes, args.weights)
    model = DecoupledNet(start, settings["reduction"], settings["init_bias"])
    objective = build_objective(model, data.num_classes, settings)
    logger.info("decoupling %s on %s: %d gated layers, %d filters", backbone, dataset, len(model.gated_layers),
                sum(model.layer_channels))
    outcome = train_decoupled(model, objective, data, Budget(epochs, seconds, max_batches), run, settings, device,
                              args.seed, logger)
    save_decoupled(model, run.model_path, backbone, data.num_classes, settings["reduction"], settings["init_bias"])
    logger.info("trained %d/%d steps in %.1f s%s", outcome.steps, outcome.total_steps, outcome.train_seconds,
                " (time budget reached)" if outcome.stopped_by_time else "")
    print(f"trained {outcome.steps}/{outcome.total_steps} steps in {outcome.train_seconds:.1f} s; "
          f"model in {run.model_path}")
    return 0


def _load_run(args: argparse.Namespace):
    run = RunDir(args.run)
    config = run.read_config()
    if not run.model_path.is_file():
        raise FileNotFoundError(f"{run.model_path} does not exist; train into {run.path} first")
    device = pick_device(args.device)
    model, meta = load_decoupled(run.model_path, device)
    data = load_dataset(config["dataset"], args.data_root or config.get("data_root"))
    return run, config, model.to(device), meta, data, device


def evaluate(args: argparse.Namespace) -> int:
    from .adversarial import adversarial_detection
    from .evaluate import evaluate_model

    _threads(args)
    run, _config, model, meta, data, device = _load_run(args)
    dense = build_backbone(meta["backbone"], meta["num_classes"])
    metrics = evaluate_model(model, dense, data.test, data.val, device, latency_images=args.latency_images)
    if args.adv_runs > 0:
        try:
            shots = tuple(int(k) for k in args.adv_shots.split(","))
        except ValueError:
            raise ValueError(f"--adv-shots expects comma-separated integers, got {args.adv_shots!r}") from None
        metrics["adv_auc"] = adversarial_detection(model, data.train, data.test, device, shots=shots,
                                                   runs=args.adv_runs, test_per_class=args.adv_test_per_class)
        metrics["adv_protocol"] = {"runs": args.adv_runs, "shots": shots, "test_per_class": args.adv_test_per_class,
                                   "eps": "8/255", "pgd_steps": 10, "pgd_step": "2/255"}
    run.write_metrics(metrics)
    summary = {k: metrics[k] for k in ("top1", "val_top1", "mac_reduction", "cpu_speedup", "dynamic_filters",
                                        "silent_filters", "energetic_filters") if k in metrics}
    print(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    print(f"metrics in {run.metrics_path}")
    return 0


def explain(args: argparse.Namespace) -> int:
    from .analysis import collect_paths, decision_tree, embed_paths, filter_states, format_tree, occlusion_analysis
    from .figures import explanation_figure

    _run, _config, model, _meta, data, device = _load_run(args)
    rng = np.random.default_rng(args.seed)
    labels = data.test.labels.numpy()
    picks = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=min(args.per_class, (labels == c).sum()),
                                       replace=False) for c in np.unique(labels)])
    subset = data.test.subset(torch.as_tensor(picks))
    paths = collect_paths(model, BatchLoader(subset, 256, train=False, device=device))
    states = filter_states(paths)
    embedding = embed_paths(paths.codes, seed=args.seed)
    tree_subset = np.concatenate([np.flatnonzero(paths.labels == c)[:10] for c in np.unique(paths.labels)])
    tree_paths = type(paths)(paths.codes[tree_subset], paths.labels[tree_subset], paths.layer_names,
                             paths.layer_slices)
    tree_text = format_tree(decision_tree(tree_paths, seed=args.seed), tree_paths, data.classes)
    image = subset.images[0].float().div(255).to(device)
    h, w = image.shape[-2:]
    box = (h // 4, w // 4, 3 * h // 4, 3 * w // 4)
    occlusion = occlusion_analysis(model, image, box)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    explanation_figure(out, states, paths, embedding, data.classes, image.cpu(), box, occlusion)
    np.savez_compressed(out.with_name(out.stem + "_paths.npz"), codes=paths.codes, labels=paths.labels,
                        layer_names=np.array(paths.layer_names),
                        layer_sizes=np.array([s.stop - s.start for s in paths.layer_slices]))
    out.with_name(out.stem + "_decision_tree.txt").write_text(tree_text + "\n")
    print(tree_text)
    print(f"figure in {out}; paths and decision tree next to it")
    return 0
