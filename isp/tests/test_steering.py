"""The interpretation term of Eq. 10 steers the gate search: its units, the authors' form, each term's gradient
share, and a toy search in which a planted explanation target is only reached when gamma1 > 0."""

import tempfile

import pytest
import torch
import torch.nn.functional as F

from common.backbones import build_backbone
from common.run import RunDir
from isp.losses import (
    AUTHORS_MSE_WEIGHT,
    GateLossWeights,
    gate_loss_terms,
    gradient_shares,
    pruning_loss,
    resource_loss,
)
from isp.model import ChannelGates, GateInjector, PrunableMacs, calibrated_hard, prunable_sites
from isp.selector import SelectorDecoder, decoder_shape, forward_with_stages
from isp.train import PruningSubset, freeze, search_gates

SIZE = 16
HEAD_GAIN = 30.0


def _decoder(size: int = 32) -> SelectorDecoder:
    return SelectorDecoder(decoder_shape(build_backbone("resnet20"), (size, size), 10), "rbf")


def test_pixel_units_weigh_the_term_image_side_squared_more_than_image_units():
    decoder = _decoder()
    target = torch.tensor([[16.0, 16.0, 10.0]])
    code = torch.tensor([[19.0, 12.0, 10.0]])  # 5 px off: ||.||^2 = 25 px^2
    args = (torch.zeros(1, 10), torch.zeros(1, dtype=torch.long), target, code, decoder, torch.tensor(1.0), 1.0)
    pixels = gate_loss_terms(*args, GateLossWeights(0.0, 0.5, 2.0, interpretation_units="pixels"))
    image = gate_loss_terms(*args, GateLossWeights(0.0, 0.5, 2.0, interpretation_units="image"))
    assert pixels["interpretation"].item() == pytest.approx(0.5 * 25)
    assert image["interpretation"].item() == pytest.approx(0.5 * 25 / 32**2)
    assert "classification" not in pixels  # weight 0: the paper's "w/o classification loss"


def test_authors_form_is_ten_mse_plus_resource_without_cross_entropy():
    decoder = _decoder()
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    target, code = torch.rand(4, 3) * 30, torch.rand(4, 3) * 30
    macs = torch.tensor(7.0)
    weights = GateLossWeights(1.0, 0.5, 2.0, 0.5, "image", "authors")  # classification, gamma1, units unused
    terms = gate_loss_terms(logits, labels, target, code, decoder, macs, 5.0, weights)
    assert set(terms) == {"interpretation", "resource"}
    expected = AUTHORS_MSE_WEIGHT * F.mse_loss(code, target) + 2.0 * resource_loss(macs, 5.0)
    assert pruning_loss(logits, labels, target, code, decoder, macs, 5.0, weights).item() == pytest.approx(
        expected.item())
    with pytest.raises(ValueError, match="gate objective"):
        gate_loss_terms(logits, labels, target, code, decoder, macs, 5.0, GateLossWeights(objective="nope"))


def test_gradient_shares_measure_each_term_against_the_logits():
    theta = torch.zeros(3, requires_grad=True)
    big = (theta * torch.tensor([3.0, 0.0, 4.0])).sum()  # gradient norm 5
    small = (theta * torch.tensor([0.0, 1.0, 0.0])).sum()  # gradient norm 1, orthogonal to the first
    shares = gradient_shares({"big": big, "small": small}, theta)
    assert shares["big"]["grad_norm"] == pytest.approx(5.0)
    assert shares["big"]["share"] == pytest.approx(5 / 6)
    assert shares["small"]["share"] == pytest.approx(1 / 6)
    assert shares["small"]["cosine_with_total"] == pytest.approx(1 / 26 ** 0.5)
    (big + small).backward()  # the graph is kept for the optimiser's step
    assert theta.grad.tolist() == [3.0, 1.0, 4.0]


def _codes(classifier, decoder, injector, images, values):
    injector.values = values
    with injector, torch.no_grad():
        _, stages = forward_with_stages(classifier, images)
        return decoder.code(stages, torch.zeros(len(images), dtype=torch.long))


@pytest.mark.slow
def test_a_planted_explanation_target_is_approached_only_when_gamma1_is_positive():
    """The planted signal: a selector head whose code moves by many pixels with the encoder's features, so
    which channels survive decides how far the pruned code lands from C_x (the unpruned codes). The resource
    term asks for half the prunable MACs; without the classification loss a gamma1 = 0 search closes gates by
    noise alone, so at the same cost (hard gates calibrated to it) the gamma1 > 0 search must land much nearer.
    Measured: 392 px^2 at gamma1 = 0 against 136 at gamma1 = 5 (HEAD_GAIN 30, 40 steps); with an unscaled head
    the code barely depends on the gates and the two arms tie (the test fails)."""
    torch.manual_seed(0)
    classifier = freeze(build_backbone("resnet20", 10))
    decoder = SelectorDecoder(decoder_shape(classifier, (SIZE, SIZE), 10), "rbf")
    with torch.no_grad():  # the planted signal: a head whose code moves by pixels with the encoder's features
        decoder.head.conv.weight.mul_(HEAD_GAIN)
    freeze(decoder)
    sites = prunable_sites(classifier, (3, SIZE, SIZE))
    macs = PrunableMacs(classifier, sites, (3, SIZE, SIZE))
    injector = GateInjector(sites)
    images = torch.rand(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    half = [torch.ones(s.channels) for s in sites]
    for v in half:
        v[: v.numel() // 2] = 0
    target = _codes(classifier, decoder, injector, images, [torch.ones(s.channels) for s in sites])
    with torch.no_grad():
        labels = classifier(images).argmax(1)
    subset = PruningSubset(images, labels, target, torch.zeros(len(images), dtype=torch.long))
    p = float(macs(half)) / macs.total  # the search must remove half the prunable MACs
    term, share = {}, {}
    for gamma1 in (0.0, 5.0):
        torch.manual_seed(0)
        gates = ChannelGates([s.channels for s in sites])
        state = search_gates(RunDir(tempfile.mkdtemp()), classifier, decoder, sites, gates, macs, subset, 40,
                             batch_size=16, lr=0.2, weights=GateLossWeights(0.0, gamma1, 2.0, p, "pixels"), seed=0,
                             seconds=None, log=None, share_every=10)
        hard = calibrated_hard(gates, macs, p * macs.total)  # both arms at the planted cost
        term[gamma1] = float((_codes(classifier, decoder, injector, images, hard) - target).pow(2).sum(1).mean())
        history = state.extra["gradient_shares"]
        assert [h["step"] for h in history] == [0, 10, 20, 30]
        share[gamma1] = sum(h.get("interpretation", {"share": 0.0})["share"] for h in history) / len(history)
    print("interpretation term under hard gates", term, "interpretation gradient share", share)
    assert share[0.0] == 0.0 and share[5.0] > 0.5
    assert term[5.0] < 0.5 * term[0.0]


def test_manipulation_check_works_only_below_the_whole_unsteered_spread():
    from isp.studies import manipulation_check

    def row(subset, images):
        return {"interpretation_term_subset": subset, "interpretation_term_images": images}

    unsteered = {"u0": row(70.0, 80.0), "u1": row(75.0, 90.0), "u2": row(68.0, 85.0)}
    below = manipulation_check({"s": row(40.0, 60.0)}, unsteered)
    assert below["works"] and below["interpretation_term_subset"]["unsteered_min"] == 68.0
    inside = manipulation_check({"s": row(40.0, 82.0)}, unsteered)  # below on the subset, inside on held-out
    assert not inside["works"] and inside["interpretation_term_subset"]["below_spread"] == {"s": True}
    with pytest.raises(ValueError, match=">= 3 unsteered"):
        manipulation_check({"s": row(1.0, 1.0)}, dict(list(unsteered.items())[:2]))
