"""ACC1/ACC2/ACC3 with planted probabilities (the authors' sampled definitions and the argmax variants), and
MIS on hand-built activations."""

import math

import torch
from torch import nn

from common.explain import mis
from picnn.evaluate import interpretation_accuracies, sampled_predictions, subsample_for_mis

REPEAT = 2000  # copies of each planted sample: every copy gets its own draws


def _identity_classifier(bias: tuple[float, float] = (0.0, 0.0)) -> nn.Linear:
    """Two filters, two classes: logit k = pooled activation of filter k (+ bias)."""
    classifier = nn.Linear(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(2))
        classifier.bias.copy_(torch.tensor(bias))
    return classifier


def _repeat(pooled: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(pooled).repeat(REPEAT, 1), torch.tensor(labels).repeat(REPEAT)


def test_acc2_draws_the_cluster_from_cat_y1():
    # Filter k is class k's only filter (P = I). Sample a (class 0): y1 = softmax(1 + ln 3, 1) = (.75, .25);
    # the drawn cluster 0 keeps [1 + ln 3, 0] -> class 0 (right), cluster 1 keeps [0, 1] -> class 1 (wrong).
    # Sample b (class 1): y1 = (.1, .9), right exactly when cluster 1 is drawn. E[ACC2] = (.75 + .9) / 2.
    # The argmax cluster of the predicted class is always right: ACC2_argmax = 100 while E[ACC2] = 82.5.
    pooled, labels = _repeat([[1 + math.log(3), 1.0], [1.0, 1 + math.log(9)]], [0, 1])
    acc = interpretation_accuracies(pooled, labels, _identity_classifier(), torch.eye(2), draws=2, seed=0)
    assert acc["acc1"] == 100.0
    sigma = 100 * math.sqrt((0.75 * 0.25 + 0.9 * 0.1) / 2 / (2 * len(labels)))
    assert abs(acc["acc2"] - 82.5) < 4 * sigma, acc["acc2"]
    assert acc["acc2_argmax"] == 100.0


def test_acc3_removes_a_draw_of_the_true_class_cluster():
    # P = 0.3 I: each class's filter joins its cluster with probability .3. Sample a (class 0, [2, 1], predicted
    # 0): removing a draw of cluster 0 drops filter 0 w.p. .3 -> [0, 1] -> wrong, else right: 1 - .3.
    # Sample b (class 1, [2, 1], misclassified as 0): removing filter 1 leaves class 0 on top either way: 0.
    # E[ACC3] = (.7 + 0) / 2 = 35. Removing the *predicted* class's cluster would give (.7 + .3) / 2 = 50.
    q = 0.3
    pooled, labels = _repeat([[2.0, 1.0], [2.0, 1.0]], [0, 1])
    acc = interpretation_accuracies(pooled, labels, _identity_classifier(), q * torch.eye(2), draws=2, seed=1)
    assert acc["acc1"] == 50.0
    sigma = 100 * math.sqrt(q * (1 - q) / 2 / (2 * len(labels)))
    assert abs(acc["acc3"] - 35.0) < 4 * sigma, acc["acc3"]
    # Argmax variant: filter k's argmax class is k; the predicted class is 0 for both, so filter 0 is removed
    # -> [0, 1] -> class 1: sample a wrong, sample b right.
    assert acc["acc3_argmax"] == 50.0


def test_acc3_draw_is_independent_of_the_acc2_draw():
    # One class-0 sample [2, 1], bias (0, .01) so that an all-zero input predicts class 1, P = 0.5 I.
    # ACC2 right <=> cluster 0 drawn and filter 0 in it: P = softmax(2, 1.01)[0] * .5.
    # ACC3 right <=> filter 0 not drawn for the true class: P = .5. A shared draw would make the two
    # mutually exclusive (joint 0); independent draws give the product.
    pooled, labels = torch.tensor([[2.0, 1.0]]).repeat(4 * REPEAT, 1), torch.zeros(4 * REPEAT, dtype=torch.long)
    classifier = _identity_classifier((0.0, 0.01))
    p = 0.5 * torch.eye(2)
    generator = torch.Generator().manual_seed(2)
    pred2, pred3 = sampled_predictions(pooled, labels, classifier, p, p.log(), generator)
    right2, right3 = (pred2 == 0).double(), (pred3 == 0).double()
    expected2 = torch.softmax(torch.tensor([2.0, 1.01]), 0)[0].item() * 0.5
    n = len(labels)
    assert abs(right2.mean().item() - expected2) < 4 * math.sqrt(expected2 * (1 - expected2) / n)
    assert abs(right3.mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    joint = (right2 * right3).mean().item()
    product = right2.mean().item() * right3.mean().item()
    assert abs(joint - product) < 4 * math.sqrt(product * (1 - product) / n), (joint, product)


def test_the_same_seed_gives_the_same_sampled_accuracies():
    pooled, labels = _repeat([[2.0, 1.0], [1.0, 2.5]], [0, 1])
    p = torch.tensor([[0.6, 0.2], [0.3, 0.7]])
    first = interpretation_accuracies(pooled, labels, _identity_classifier(), p, draws=2, seed=5)
    again = interpretation_accuracies(pooled, labels, _identity_classifier(), p, draws=2, seed=5)
    assert first == again


def test_mis_of_class_copying_filters_beats_shuffled_filters():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(100)
    copies = torch.nn.functional.one_hot(labels, 4).float() + 0.05 * torch.randn(400, 4, generator=generator)
    shuffled = copies[torch.randperm(400, generator=generator)]
    informative = mis(copies, labels, 4)
    assert informative > 0.4  # H(1/4 indicator) = 0.56 nats is the ceiling
    assert informative > mis(shuffled, labels, 4) + 0.3


def test_mis_subsample_is_seeded_and_capped():
    labels = torch.arange(50)
    assert torch.equal(subsample_for_mis(labels, None), torch.arange(50))
    first, again = subsample_for_mis(labels, 20, seed=3), subsample_for_mis(labels, 20, seed=3)
    assert len(first) == 20 and torch.equal(first, again)
