"""Eq. 9-12 against hand computations on tiny tensors."""

import math

import pytest
import torch
from torch import nn

from decoupling.losses import DecouplingObjective, kl_divergence_loss, mutual_information_loss, sparsity_loss

Z1 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
Z2 = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
Y1 = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
Y2 = torch.tensor([[0.0, 1.0], [3.0, 1.0]])


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_mutual_information_loss_is_per_layer_cross_entropy():
    head1 = nn.Linear(3, 2, bias=False)
    head2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head1.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]]))
        head2.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    targets = torch.tensor([0, 1])
    # layer 1 scores: sample 0 [1, 1], sample 1 [0, 1]; layer 2: sample 0 [0.5, 2], sample 1 [0.25, 0]
    expected = (-math.log(_softmax([1, 1])[0]) - math.log(_softmax([0, 1])[1])) / 2 \
        + (-math.log(_softmax([0.5, 2])[0]) - math.log(_softmax([0.25, 0])[1])) / 2
    loss = mutual_information_loss([Z1, Z2], [head1, head2], targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kl_loss_is_kl_of_softmaxed_code_to_softmaxed_output():
    expected = 0.0
    for z, y in ((Z1, Y1), (Z2, Y2)):
        per_sample = []
        for zi, yi in zip(z.tolist(), y.tolist()):
            p, q = _softmax(zi), _softmax(yi)
            per_sample.append(sum(pk * math.log(pk / qk) for pk, qk in zip(p, q)) / len(p))  # mean over N
        expected += sum(per_sample) / len(per_sample)
    assert kl_divergence_loss([Z1, Z2], [Y1, Y2]).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence_loss([Y1], [Y1]).item() == pytest.approx(0.0, abs=1e-7)


def test_sparsity_loss_l1_and_target_ratio():
    # R = 0: mean over samples of ||z||_1, summed over layers: (2 + 1)/2 + (2 + 0.5)/2
    assert sparsity_loss([Z1, Z2]).item() == pytest.approx(1.5 + 1.25)
    # R = 0.5: hinge at R N^l = 1.5 (layer 1) and 1 (layer 2): (0.5 + 0)/2 + (1 + 0)/2
    assert sparsity_loss([Z1, Z2], 0.5).item() == pytest.approx(0.25 + 0.5)
    with pytest.raises(ValueError, match="target ratio"):
        sparsity_loss([Z1], 1.5)


def test_total_loss_is_eq12():
    torch.manual_seed(0)
    objective = DecouplingObjective([3, 2], num_classes=2, lambda_m=0.1, lambda_k=2.0, lambda_s=0.01,
                                    target_ratio=0.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1])
    terms = objective(logits, targets, [Z1, Z2], [Y1, Y2])
    ce = (-math.log(_softmax([2, 0])[0]) - math.log(_softmax([0, 1])[1])) / 2
    assert terms.ce.item() == pytest.approx(ce, rel=1e-6)
    expected = ce + 0.1 * terms.mi.item() + 2.0 * terms.kl.item() + 0.01 * 2.75
    assert terms.total.item() == pytest.approx(expected, rel=1e-6)
    assert terms.mi.item() == pytest.approx(
        mutual_information_loss([Z1, Z2], objective.mi_heads, targets).item())


def _planted_codes_run(full_objective: bool, lr: float, steps: int):
    """Two controllers read inputs whose pooled channels depend on the class (K = 4 prototypes + noise);
    train them (and the L_mi heads) through Improved SemHash. Returns (first L_mi, last L_mi averaged over
    the final 20 steps, linear-probe accuracy of the inference codes on fresh inputs)."""
    from sklearn.linear_model import LogisticRegression

    from decoupling.model import ArchitectureController
    from decoupling.semhash import improved_semhash

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    k, c, n, b = 4, 16, 12, 64
    prototypes = torch.randn(k, c, generator=gen)

    def batch(size):
        y = torch.randint(0, k, (size,), generator=gen)
        x = (prototypes[y] + 0.5 * torch.randn(size, c, generator=gen)).relu()
        return x[:, :, None, None], y

    controllers = [ArchitectureController(c, n, init="authors") for _ in range(2)]
    # Paper balance (Table 5, ResNet-56 row): lambda_m 0.01, lambda_k 1, lambda_s 0.00015.
    objective = DecouplingObjective([n, n], k, lambda_m=0.01, lambda_k=1.0, lambda_s=0.00015)
    params = [p for ctrl in controllers for p in ctrl.parameters()] + list(objective.parameters())
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        x, y = batch(b)
        masks = [improved_semhash(ctrl(x), True) for ctrl in controllers]
        if full_objective:  # Eq. 12 without L_ce; y^l carries no class information here
            terms = objective(torch.zeros(b, k), y, masks, [torch.rand(b, n, generator=gen) for _ in masks])
            loss, mi = terms.total - terms.ce, terms.mi
        else:
            loss = mi = mutual_information_loss(masks, objective.mi_heads, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(mi.detach()))
    with torch.no_grad():
        (x_fit, y_fit), (x_test, y_test) = batch(1000), batch(1000)
        fit = torch.cat([(ctrl(x_fit) > 0).float() for ctrl in controllers], 1).numpy()
        test = torch.cat([(ctrl(x_test) > 0).float() for ctrl in controllers], 1).numpy()
    probe = LogisticRegression(max_iter=500).fit(fit, y_fit.numpy()).score(test, y_test.numpy())
    return history[0], sum(history[-20:]) / 20, probe


def test_mutual_information_loss_learns_planted_class_dependent_codes():
    first, last, probe = _planted_codes_run(full_objective=False, lr=0.1, steps=200)
    assert first > 2 * math.log(4) * 0.9  # two layers at (or above) chance at the start
    assert last < 0.25 * 2 * math.log(4)
    assert probe > 0.9  # the inference codes (Eq. 5) now tell the class (chance 0.25)


def test_l_mi_is_not_drowned_by_l_kl_at_the_paper_balance():
    # Eq. 12 with Table 5's lambdas and L_kl averaged over B x N^l: L_mi still falls and the codes become
    # class-dependent although L_kl pulls them towards class-free targets.
    first, last, probe = _planted_codes_run(full_objective=True, lr=1.0, steps=300)
    assert first > 2 * math.log(4) * 0.9
    assert last < 0.6 * 2 * math.log(4)
    assert probe > 0.8
