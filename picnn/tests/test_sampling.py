"""Statistical tests of the reparameterised samplers (Eq. 5-10) and the Gumbel-softmax ablation."""

import torch
from scipy.stats import chisquare

from picnn.sampling import bernoulli_assignment, gumbel_assignment, pseudo_label

DRAWS = 20000


def test_bernoulli_sample_is_binary_and_its_mean_matches_p():
    torch.manual_seed(0)
    p = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
    z = bernoulli_assignment(p.expand(DRAWS, -1).clone())
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    sigma = (p * (1 - p) / DRAWS).sqrt()
    assert ((z.mean(0) - p).abs() < 5 * sigma).all(), (z.mean(0), p)


def test_bernoulli_gradient_reaches_p_unchanged():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, requires_grad=True)
    p = torch.sigmoid(logits)
    weights = torch.randn(3, 6)
    z = bernoulli_assignment(p)
    (z * weights).sum().backward()
    # dz/dp = 1 (Eq. 5 with eta constant), so d/dlogits = weights * sigmoid'.
    expected = weights * p.detach() * (1 - p.detach())
    torch.testing.assert_close(logits.grad, expected)


def test_pseudo_label_frequencies_match_softmax_of_y1():
    torch.manual_seed(2)
    y1 = torch.softmax(torch.tensor([1.5, 0.2, -1.0, 0.7, 0.0]), dim=0)
    samples = pseudo_label(y1.expand(DRAWS, -1).clone())
    assert torch.equal(samples.sum(1), torch.ones(DRAWS))
    counts = samples.sum(0).numpy()
    assert chisquare(counts, y1.numpy() * DRAWS).pvalue > 1e-3
    # The same test has the power to reject a wrong distribution.
    assert chisquare(counts, torch.full((5,), DRAWS / 5).numpy()).pvalue < 1e-6


def test_pseudo_label_gradient_reaches_the_prediction():
    torch.manual_seed(3)
    logits = torch.randn(4, 5, requires_grad=True)
    onehot = pseudo_label(torch.softmax(logits, dim=1))
    p_matrix = torch.rand(5, 7)
    (onehot @ p_matrix).sum().backward()  # selecting a row of P, as the model does
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_assignment_is_nearly_one_hot_and_follows_p():
    torch.manual_seed(4)
    class_logits = torch.log(torch.tensor([[0.7, 0.2], [0.2, 0.5], [0.1, 0.3]]))  # K=3 classes, N=2 filters
    relaxed = gumbel_assignment(class_logits, batch=DRAWS, temperature=0.01)
    torch.testing.assert_close(relaxed.sum(1), torch.ones(DRAWS, 2))
    assert (relaxed.max(1).values > 0.99).float().mean() > 0.95
    freq = torch.nn.functional.one_hot(relaxed.argmax(1), 3).float().mean(0).T  # K x N
    assert (freq - class_logits.exp()).abs().max() < 0.02
