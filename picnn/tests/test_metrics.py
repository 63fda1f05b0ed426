"""ACC1/ACC2/ACC3 on a hand-built model, and MIS on hand-built activations."""

import torch
from torch import nn

from common.explain import mis
from picnn.metrics import interpretation_accuracies, subsample_for_mis


def _hand_built():
    classifier = nn.Linear(4, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        classifier.bias.copy_(torch.tensor([0.0, 0.1]))
    # Filter 0 belongs to class 0; filters 1, 2, 3 to class 1 (filter 1 is "misassigned").
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    pooled = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    return pooled, labels, classifier, p


def test_accuracies_match_the_hand_computation():
    # By hand: y1 = [3,.1] [3,1.1] [0,3.1] [1,.6] -> predictions 0 0 1 0: ACC1 = 3/4.
    # Cluster of the predicted class: [2,0,0,0]->0 ok, [0,0,0,0]->1 wrong, [0,0,2,1]->1 ok, [1,0,0,0]->0 wrong.
    # Complement: [0,1,0,0]->0 ok, [0,3,1,0]->0 ok, [0,0,0,0]->1 ok, [0,0,0,.5]->1 ok.
    pooled, labels, classifier, p = _hand_built()
    acc = interpretation_accuracies(pooled, labels, classifier, p, draws=3)
    assert acc["acc1"] == 75.0
    assert acc["acc2"] == 50.0 and acc["acc2_argmax"] == 50.0
    assert acc["acc3"] == 100.0 and acc["acc3_argmax"] == 100.0


def test_sampled_accuracies_average_over_bernoulli_draws():
    pooled, labels, classifier, p = _hand_built()
    # Filter 1 also joins class 0's cluster with probability 1/2 (its argmax class stays 1). By hand:
    # ACC2: s0 always right, s1 right only when filter 1 is drawn, s2 right, s3 wrong -> (1 + .5 + 1 + 0) / 4.
    # ACC3: s0 and s1 right only when filter 1 is not drawn, s2 and s3 right -> (.5 + .5 + 1 + 1) / 4.
    p_half = p.clone()
    p_half[0, 1] = 0.5
    acc = interpretation_accuracies(pooled, labels, classifier, p_half, draws=4000, seed=0)
    assert abs(acc["acc2"] - 62.5) < 1.0 and abs(acc["acc3"] - 75.0) < 1.0
    assert acc["acc2_argmax"] == 50.0 and acc["acc3_argmax"] == 100.0  # the deterministic clusters differ


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
