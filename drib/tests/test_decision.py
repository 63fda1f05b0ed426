import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from drib.decision import DecisionGate, gumbel_softmax_select


def _frequencies(logits: torch.Tensor, draws: int, tau: float) -> np.ndarray:
    generator = torch.Generator().manual_seed(1)
    hard, _ = gumbel_softmax_select(logits.expand(draws, -1), tau, generator=generator)
    return hard.sum(0).numpy()


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_gumbel_selection_frequencies_match_softmax(tau):
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]])
    probs = torch.softmax(logits.double(), -1)[0].numpy()
    probs = probs / probs.sum()
    draws = 40_000
    counts = _frequencies(logits, draws, tau)
    assert counts.sum() == draws  # exactly one action per draw
    # Gumbel-max is exact for every tau: a chi-square test must not reject the softmax probabilities ...
    assert chisquare(counts, probs * draws).pvalue > 1e-3
    # ... and has the power to reject a distribution that is off by a few points.
    wrong = probs.copy()
    wrong[0] -= 0.03
    wrong[1] += 0.03
    assert chisquare(counts, wrong * draws).pvalue < 1e-6


def test_straight_through_forward_is_one_hot_and_gradient_reaches_the_logits():
    logits = torch.randn(6, 4, requires_grad=True)
    hard, soft = gumbel_softmax_select(logits, 0.5)
    assert torch.equal(hard.sum(1), torch.ones(6)) and set(hard.unique().tolist()) <= {0.0, 1.0}
    (soft * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gate_mask_is_the_selected_codebook_row_exactly():
    gate = DecisionGate(in_channels=3, out_channels=5, actions=4)
    with torch.no_grad():
        gate.codebook.copy_(torch.tensor([[1, 0, 2, 0, 1], [0, 1, 0, 3, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 4.0]]))
    x = torch.rand(8, 3, 4, 4)
    gate.train()
    mask = gate.decide(x)
    chosen = gate.selection.argmax(1)
    assert torch.equal(mask.detach(), gate.codebook.detach()[chosen])  # skipped channels are exact zeros
    mask.sum().backward()
    assert gate.codebook.grad is not None and gate.head.weight.grad is not None
    gate.eval()
    first = gate.decide(x)
    assert torch.equal(first, gate.decide(x))  # inference is the deterministic argmax
    expected = gate.action_logits(x).argmax(1)
    assert torch.equal(gate.selection.argmax(1), expected)


def test_projection_clamps_codebook_and_normalises_head_rows():
    gate = DecisionGate(in_channels=3, out_channels=2, actions=3, codebook_max=5.0)
    with torch.no_grad():
        gate.codebook.copy_(torch.tensor([[-1.0, 7.0], [0.5, 2.0], [9.0, -3.0]]))
        gate.head.weight.mul_(10)
    gate.project_()
    assert gate.codebook.min() >= 0 and gate.codebook.max() <= 5
    assert torch.allclose(gate.head.weight.norm(dim=1), torch.ones(3))


def test_importance_initialisation_keeps_the_most_important_channels():
    gate = DecisionGate(in_channels=3, out_channels=6, actions=5)
    importance = torch.tensor([0.1, 5.0, 0.2, 3.0, 4.0, 0.05])
    gate.init_by_importance_(importance, keep=3, jitter=0.5, generator=torch.Generator().manual_seed(0))
    assert gate.codebook[0].tolist() == [0, 1, 0, 1, 1, 0]
    assert torch.equal(gate.codebook.sum(1), torch.full((5,), 3.0))


def test_entries_below_the_threshold_are_skipped_but_keep_their_gradient():
    gate = DecisionGate(in_channels=2, out_channels=3, actions=1, prune_below=0.05)
    with torch.no_grad():
        gate.codebook.copy_(torch.tensor([[0.01, 0.5, 0.0]]))
    gate.train()
    mask = gate.decide(torch.rand(4, 2, 3, 3))
    assert torch.equal(mask.detach()[0], torch.tensor([0.0, 0.5, 0.0]))
    mask.sum().backward()
    assert torch.equal(gate.codebook.grad, torch.full((1, 3), 4.0))
