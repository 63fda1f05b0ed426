"""PICNN's own metrics (ACC1, ACC2, ACC3) and MIS on the target layer, from one pass over a split.

ACC1: the discrimination pathway. ACC2: the classifier fed only the cluster of the *predicted* class.
ACC3: the classifier fed every filter except that cluster. The cluster is chosen two ways at test time:
``sampled`` (as in training: z ~ Ber(p_{y^}), averaged over ``draws`` seeded draws; Gumbel-argmax for a
Gumbel-trained model) and ``argmax`` (deterministic: each filter belongs to the class of its largest p).
MIS (common.explain.mis) is computed on the spatially averaged target-layer maps.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data import BatchLoader, ImageTensors
from common.explain import mis
from common.macs import count_macs, count_params
from common.run import progress

from .model import PicnnNet


@torch.no_grad()
def collect_pooled(model: PicnnNet, split: ImageTensors, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """GAP of the target layer's maps for every image of ``split`` (M x N, CPU) and the labels (M)."""
    was_training = model.training
    model.eval()
    pooled, labels = [], []
    try:
        loader = BatchLoader(split, batch_size, train=False, device=device)
        for x, y in progress(loader, "target-layer features", total=len(loader)):
            pooled.append(model.pooled_features(x).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(pooled), torch.cat(labels)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def _sampled_clusters(pred: Tensor, p: Tensor, class_logits: Tensor, assignment: str,
                      generator: torch.Generator) -> Tensor:
    """One test-time draw of the predicted class's cluster, as the model was trained to draw it: M x N."""
    if assignment == "bernoulli":
        rows = p[pred]
        return (rows >= torch.rand(rows.shape, generator=generator)).float()
    # Gumbel: a temperature -> 0 limit of the training relaxation, i.e. argmax of log P + Gumbel noise.
    u = torch.rand((len(pred), *class_logits.shape), generator=generator).clamp_(1e-12, 1 - 1e-7)
    owner = (F.log_softmax(class_logits, dim=0) - torch.log(-torch.log(u))).argmax(dim=1)  # M x N
    return (owner == pred[:, None]).float()


@torch.no_grad()
def interpretation_accuracies(pooled: Tensor, labels: Tensor, classifier: nn.Module, p: Tensor,
                              class_logits: Tensor | None = None, *, assignment: str = "bernoulli",
                              draws: int = 5, seed: int = 0) -> dict[str, float]:
    """ACC1, ACC2, ACC3 in percent (see module docstring) from pooled target features (M x N).

    ``p`` is P (K x N); ``class_logits`` the logits it is the class-softmax of (defaults to log p).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    classifier = copy.deepcopy(classifier).cpu().float().eval()
    pooled, labels, p = pooled.float().cpu(), labels.cpu(), p.detach().float().cpu()
    class_logits = p.clamp_min(1e-12).log() if class_logits is None else class_logits.detach().float().cpu()
    y1 = classifier(pooled)
    pred = y1.argmax(1)
    generator = torch.Generator().manual_seed(seed)
    acc2 = acc3 = 0.0
    for _ in range(draws):
        z = _sampled_clusters(pred, p, class_logits, assignment, generator)
        acc2 += _accuracy(classifier(pooled * z), labels) / draws
        acc3 += _accuracy(classifier(pooled * (1 - z)), labels) / draws
    owner = class_logits.argmax(dim=0)  # deterministic Z: filter i -> argmax_y p_{y,i}
    z_det = (owner[None, :] == pred[:, None]).float()
    return {
        "acc1": _accuracy(y1, labels),
        "acc2": acc2,
        "acc3": acc3,
        "acc2_argmax": _accuracy(classifier(pooled * z_det), labels),
        "acc3_argmax": _accuracy(classifier(pooled * (1 - z_det)), labels),
    }


def subsample_for_mis(labels: Tensor, limit: int | None, seed: int = 0) -> Tensor:
    """Indices of at most ``limit`` samples (a seeded random subset; all of them when limit is None)."""
    n = len(labels)
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.from_numpy(np.sort(np.random.RandomState(seed).permutation(n)[:limit]))


def parameter_count(model: PicnnNet) -> int:
    """Parameters the PICNN model uses (the replaced backbone classifier is not counted; P is)."""
    return count_params(model) - sum(p.numel() for p in model.unused_parameters())


def evaluate_picnn(model: PicnnNet, split: ImageTensors, *, assignment: str = "bernoulli", draws: int = 5,
                   mis_samples: int | None = None, batch_size: int = 256, device: torch.device | str = "cpu",
                   seed: int = 0) -> dict[str, float | int | list[float]]:
    """All PICNN metrics on ``split``: accuracies, MIS, MACs, params and the cluster sizes."""
    pooled, labels = collect_pooled(model, split, batch_size, device)
    p = model.correspondence().detach().cpu()
    metrics: dict[str, float | int | list[float]] = interpretation_accuracies(
        pooled, labels, model.classifier, p, model.correspondence.logits.detach().cpu(),
        assignment=assignment, draws=draws, seed=seed)
    keep = subsample_for_mis(labels, mis_samples, seed)
    metrics["mis"] = mis(pooled[keep], labels[keep], model.num_classes, random_state=0)
    metrics["mis_samples"] = len(keep)
    height, width = split.images.shape[-2:]
    metrics["macs"] = count_macs(model, (3, int(height), int(width)))
    metrics["params"] = parameter_count(model)
    metrics["expected_cluster_size"] = p.sum(dim=1).tolist()  # sum_i p_{y,i} per class
    metrics["argmax_cluster_size"] = model.correspondence.argmax_clusters().sum(dim=1).cpu().tolist()
    return metrics
