"""PICNN's own metrics (ACC1, ACC2, ACC3), MIS on the target layer and the cost, from one pass over a split.

ACC1: the discrimination pathway (reported as the shared ``top1``). ACC2 and ACC3 as the authors' evaluation
code computes them:

- ``acc2``: the interpretation pathway as in training: a cluster c ~ Cat(softmax y1) (Eq. 8-10), a mask
  z ~ Ber(P[c]) (Eq. 5-7), prediction classifier(GAP(H) * z);
- ``acc3``: every filter except a cluster of the **true** class, from an independent draw
  z' ~ Ber(P[y]): classifier(GAP(H) * (1 - z')).

Both are averaged over ``draws`` seeded draws (the authors make one per evaluation; the mean has the same
expectation and less noise). Extra, deterministic variants that use no sampling and no label:
``acc2_argmax`` / ``acc3_argmax`` keep only / remove the argmax cluster of the *predicted* class (filter i
belongs to argmax_y p_{y,i}). For a Gumbel-trained model the mask draw is the Gumbel-argmax (the
temperature -> 0 limit of its training relaxation). MIS (common.explain.mis) is computed on the spatially
averaged target-layer maps.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data import BatchLoader, ImageTensors
from common.explain import mis
from common.macs import count_macs, count_params
from common.method import shared_metrics
from common.precision import Precision, resolve_precision
from common.run import progress

from .model import PicnnNet


@torch.no_grad()
def collect_pooled(model: PicnnNet, split: ImageTensors, batch_size: int = 256,
                   device: torch.device | str = "cpu", policy: Precision | None = None) -> tuple[Tensor, Tensor]:
    """GAP of the target layer's maps for every image of ``split`` (M x N, float32, CPU) and the labels (M).

    The forward pass runs under ``policy`` (common.precision; None = float32); the features are float32."""
    was_training = model.training
    model.eval()
    pooled, labels = [], []
    try:
        loader = BatchLoader(split, batch_size, train=False, device=device)
        for x, y in progress(loader, "target-layer features", total=len(loader)):
            if policy is not None:
                x = policy.prepare_inputs(x)
                with policy.autocast():
                    features = model.pooled_features(x)
            else:
                features = model.pooled_features(x)
            pooled.append(features.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(pooled), torch.cat(labels)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def _draw_cluster(y1_prob: Tensor, generator: torch.Generator) -> Tensor:
    """c ~ Cat(K, y1) for every row (Eq. 10): the first class whose cumulative probability reaches xi."""
    xi = torch.rand(len(y1_prob), 1, generator=generator, dtype=y1_prob.dtype)
    cumulative = y1_prob.cumsum(dim=1)
    return torch.searchsorted(cumulative, xi).clamp_(max=y1_prob.shape[1] - 1).reshape(-1)


def _draw_mask(classes: Tensor, p: Tensor, class_logits: Tensor, assignment: str,
               generator: torch.Generator) -> Tensor:
    """One mask per sample for the cluster of ``classes`` (M), drawn as the model was trained: M x N."""
    if assignment == "bernoulli":
        rows = p[classes]
        return (rows >= torch.rand(rows.shape, generator=generator)).float()  # Eq. 7
    # Gumbel: a temperature -> 0 limit of the training relaxation, i.e. argmax of log P + Gumbel noise.
    u = torch.rand((len(classes), *class_logits.shape), generator=generator).clamp_(1e-12, 1 - 1e-7)
    owner = (F.log_softmax(class_logits, dim=0) - torch.log(-torch.log(u))).argmax(dim=1)  # M x N
    return (owner == classes[:, None]).float()


@torch.no_grad()
def sampled_predictions(pooled: Tensor, labels: Tensor, classifier: nn.Module, p: Tensor,
                        class_logits: Tensor, generator: torch.Generator, *, assignment: str = "bernoulli"
                        ) -> tuple[Tensor, Tensor]:
    """One draw of the authors' two pathways: (pred2, pred3), each M class indices.

    pred2 = argmax classifier(pooled * z), z ~ Ber(P[c]), c ~ Cat(softmax y1);
    pred3 = argmax classifier(pooled * (1 - z')), z' ~ Ber(P[y]) drawn independently of z.
    """
    y1_prob = torch.softmax(classifier(pooled), dim=1)
    cluster = _draw_cluster(y1_prob, generator)
    z = _draw_mask(cluster, p, class_logits, assignment, generator)
    z_true = _draw_mask(labels, p, class_logits, assignment, generator)
    return classifier(pooled * z).argmax(1), classifier(pooled * (1 - z_true)).argmax(1)


@torch.no_grad()
def interpretation_accuracies(pooled: Tensor, labels: Tensor, classifier: nn.Module, p: Tensor,
                              class_logits: Tensor | None = None, *, assignment: str = "bernoulli",
                              draws: int = 5, seed: int = 0) -> dict[str, float]:
    """ACC1, ACC2, ACC3 (authors' sampled definitions) and the argmax variants, in percent (module docstring).

    ``pooled`` is GAP(H) (M x N), ``p`` is P (K x N), ``class_logits`` the logits it is the class-softmax of
    (defaults to log p; used by the argmax clusters and the Gumbel draw).
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
        pred2, pred3 = sampled_predictions(pooled, labels, classifier, p, class_logits, generator,
                                           assignment=assignment)
        acc2 += 100.0 * (pred2 == labels).double().mean().item() / draws
        acc3 += 100.0 * (pred3 == labels).double().mean().item() / draws
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


def evaluate_picnn(model: PicnnNet, split: ImageTensors, *, split_name: str, assignment: str = "bernoulli",
                   draws: int = 5, mis_samples: int | None = None, batch_size: int = 256,
                   device: torch.device | str = "cpu", seed: int = 0, precision: str = "fp32") -> dict[str, Any]:
    """All PICNN metrics on ``split`` (named ``split_name`` in the result): the shared figures under
    ``common.method.SHARED_METRIC_KEYS`` (``top1`` is ACC1, ``macs`` counts the added target layer, the dense
    start is the plain backbone; PICNN has no MAC target), then its own: ACC2/ACC3 and their argmax variants,
    MIS, the MACs of the plain backbone and of the added layer, and the cluster sizes. The forward pass runs
    under the ``precision`` policy; the metrics in fp32."""
    policy = resolve_precision(precision, device)
    policy.prepare_model(model)
    pooled, labels = collect_pooled(model, split, batch_size, device, policy)
    p = model.correspondence().detach().cpu()
    accuracies = interpretation_accuracies(pooled, labels, model.classifier, p,
                                           model.correspondence.logits.detach().cpu(), assignment=assignment,
                                           draws=draws, seed=seed)
    height, width = split.images.shape[-2:]
    size = (3, int(height), int(width))
    macs, backbone_macs = count_macs(model, size), count_macs(model.backbone, size)  # backbone: the plain network
    metrics = shared_metrics(top1=accuracies.pop("acc1"), split=split_name, macs=macs, dense_macs=backbone_macs,
                             params=parameter_count(model), precision=policy.name)
    metrics.update(accuracies)
    keep = subsample_for_mis(labels, mis_samples, seed)
    metrics["mis"] = mis(pooled[keep], labels[keep], model.num_classes, random_state=0)
    metrics["mis_samples"] = len(keep)
    metrics["backbone_macs"] = backbone_macs
    metrics["added_macs"] = macs - backbone_macs
    metrics["mac_change_percent"] = 100.0 * metrics["added_macs"] / backbone_macs
    metrics["added_target_conv"] = bool(model.added_target_conv)
    metrics["target_layer"] = "added" if model.added_target_conv else "last_stage"
    metrics["filters"] = int(model.filters)
    metrics["expected_cluster_size"] = p.sum(dim=1).tolist()  # sum_i p_{y,i} per class
    metrics["argmax_cluster_size"] = model.correspondence.argmax_clusters().sum(dim=1).cpu().tolist()
    metrics["precision_policy"] = policy.describe()  # precision, memory layout and device of the forward pass
    return metrics
