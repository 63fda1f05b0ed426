"""Adversarial sample detection from calculation paths (paper Section 4.4, Table 6).

Adversarial examples (FGSM, PGD under an L-infinity budget) change the path an input takes. A binary
classifier (random forest, AdaBoost, gradient boosting) trained on the paths of k clean images per class
and of their adversarial versions tells clean from adversarial paths; we report its ROC AUC on held-out
images, averaged over independent runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.data import ImageTensors
from common.precision import Precision, resolve_precision

from .model import DecoupledNet

CLASSIFIERS = ("random_forest", "adaboost", "gradient_boosting")


def fgsm(model: torch.nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method: one step of size ``eps`` up the loss gradient, clipped to [0, 1]."""
    return pgd(model, x, y, eps=eps, step=eps, steps=1, random_start=False)


def pgd(model: torch.nn.Module, x: Tensor, y: Tensor, eps: float, step: float, steps: int,
        random_start: bool = True) -> Tensor:
    """Projected gradient descent in the L-infinity ball of radius ``eps`` (inference-mode model)."""
    was_training = model.training
    model.eval()
    adv = x.clone()
    if random_start:
        adv = (adv + torch.empty_like(adv).uniform_(-eps, eps)).clamp(0, 1)
    try:
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    finally:
        model.train(was_training)
    return adv.detach()


def make_classifier(name: str, seed: int):
    from sklearn.ensemble import AdaBoostClassifier, GradientBoostingClassifier, RandomForestClassifier

    if name == "random_forest":
        return RandomForestClassifier(n_estimators=100, random_state=seed)
    if name == "adaboost":
        return AdaBoostClassifier(n_estimators=50, random_state=seed)
    if name == "gradient_boosting":
        return GradientBoostingClassifier(random_state=seed)
    raise ValueError(f"unknown classifier {name!r}; choose from {CLASSIFIERS}")


def detection_auc(train_clean: np.ndarray, train_adv: np.ndarray, test_clean: np.ndarray,
                  test_adv: np.ndarray, classifier: str, seed: int = 0) -> float:
    """ROC AUC of ``classifier`` trained on clean (label 0) vs adversarial (label 1) paths."""
    from sklearn.metrics import roc_auc_score

    x_train = np.concatenate([train_clean, train_adv]).astype(np.float32)
    y_train = np.r_[np.zeros(len(train_clean)), np.ones(len(train_adv))]
    x_test = np.concatenate([test_clean, test_adv]).astype(np.float32)
    y_test = np.r_[np.zeros(len(test_clean)), np.ones(len(test_adv))]
    if np.ptp(x_train, axis=0).max() == 0:
        return 0.5  # every training path is identical: nothing to learn, the detector is at chance
    try:
        model = make_classifier(classifier, seed).fit(x_train, y_train)
    except ValueError as exc:  # AdaBoost refuses when no stump beats chance on the training paths
        if "worse than random" in str(exc):
            return 0.5
        raise
    return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))


def per_class_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} images, fewer than the {per_class} requested")
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return np.concatenate(picks)


Attack = Callable[[torch.nn.Module, Tensor, Tensor], Tensor]
Features = Callable[[Tensor], np.ndarray]  # images in [0, 1] -> one feature row per image


def attacks(eps: float = 8 / 255, pgd_steps: int = 10) -> dict[str, Attack]:
    return {"fgsm": lambda m, x, y: fgsm(m, x, y, eps),
            "pgd": lambda m, x, y: pgd(m, x, y, eps, step=2.5 * eps / pgd_steps, steps=pgd_steps)}


@torch.no_grad()
def _paths_of(model: DecoupledNet, images: Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([model.paths(images[i:i + batch])[1].cpu().numpy() for i in range(0, len(images), batch)])


def pooled_features_of(backbone: torch.nn.Module, precision: Precision | None = None) -> Features:
    """The control's features: the plain backbone's globally pooled last feature map, under ``precision``
    (common.precision; None: fp32) like the decoupled network's paths."""
    precision = precision or resolve_precision("fp32", "cpu", channels_last=False)

    @torch.no_grad()
    def features(images: Tensor, batch: int = 256) -> np.ndarray:
        backbone.eval()
        out = []
        for i in range(0, len(images), batch):
            with precision.autocast():
                pooled = backbone.forward_features(precision.prepare_inputs(images[i:i + batch]))
            out.append(pooled.float().mean(dim=(2, 3)).cpu().numpy())
        return np.concatenate(out)
    return features


def _clean_and_adversarial(attacked: torch.nn.Module, features: Features, split: ImageTensors,
                           indices: np.ndarray, attack: Attack, device: torch.device, batch: int = 128
                           ) -> tuple[np.ndarray, np.ndarray]:
    x = split.images[torch.as_tensor(indices)].float().div(255).to(device)
    y = split.labels[torch.as_tensor(indices)].to(device)
    adv = torch.cat([attack(attacked, x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])
    return features(x), features(adv)


def adversarial_detection(model: torch.nn.Module, train: ImageTensors, test: ImageTensors, device: torch.device,
                          shots: Sequence[int] = (1, 5, 10), runs: int = 5, test_per_class: int = 10,
                          eps: float = 8 / 255, seed: int = 0, features: Features | None = None,
                          classifiers: Sequence[str] = CLASSIFIERS) -> dict[str, dict[str, dict[str, float]]]:
    """Table 6 protocol: for each attack, classifier and k in ``shots``, the mean ROC AUC over ``runs``
    random draws of k training images per class (train split) and ``test_per_class`` test images per
    class (test split). Returns {attack: {classifier: {str(k): auc}}}.

    ``model`` is attacked (white box) and ``features`` (default: its calculation paths, for a
    ``DecoupledNet``) feed the detector. The control is the plain backbone attacked and described by its
    pooled features: ``adversarial_detection(plain, ..., features=pooled_features_of(plain))``."""
    if features is None:
        if not isinstance(model, DecoupledNet):
            raise ValueError("features must be given for a model that is not a DecoupledNet")
        decoupled = model

        def features(images: Tensor) -> np.ndarray:
            return _paths_of(decoupled, images)
    results: dict[str, dict[str, dict[str, float]]] = {}
    train_labels, test_labels = train.labels.numpy(), test.labels.numpy()
    for attack_name, attack in attacks(eps).items():
        scores = {c: {str(k): [] for k in shots} for c in classifiers}
        for run in range(runs):
            rng = np.random.default_rng(seed + run)
            test_idx = per_class_indices(test_labels, test_per_class, rng)
            test_clean, test_adv = _clean_and_adversarial(model, features, test, test_idx, attack, device)
            train_idx = per_class_indices(train_labels, max(shots), rng).reshape(-1, max(shots))
            train_clean, train_adv = _clean_and_adversarial(model, features, train, train_idx.ravel(), attack,
                                                            device)
            train_clean = train_clean.reshape(len(train_idx), max(shots), -1)
            train_adv = train_adv.reshape(len(train_idx), max(shots), -1)
            for k in shots:  # the first k of each class: nested training sets within a run
                tc = train_clean[:, :k].reshape(-1, train_clean.shape[-1])
                ta = train_adv[:, :k].reshape(-1, train_adv.shape[-1])
                for c in classifiers:
                    scores[c][str(k)].append(detection_auc(tc, ta, test_clean, test_adv, c, seed + run))
        results[attack_name] = {c: {k: float(np.mean(v)) for k, v in per_k.items()} for c, per_k in scores.items()}
    return results
