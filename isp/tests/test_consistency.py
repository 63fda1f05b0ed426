"""Predictor and selector see the same masks: one sampler (``rbf.sample_mask``) at one temperature trains the
predictor (Eq. 6-7) and scores the selector (Eq. 8-9), and both loops run under the precision policy with their
losses in fp32."""

import torch

import isp.losses
import isp.rbf
import isp.train
from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.precision import resolve_precision
from common.run import RunDir
from isp.selector import SelectorDecoder, decoder_shape
from isp.train import train_predictor, train_selector


def _spy(monkeypatch):
    calls = []
    original = isp.rbf.sample_mask

    def spy(probs, tau, generator=None):
        mask = original(probs, tau, generator)
        calls.append((tau, mask.dtype, float(mask.detach().min()), float(mask.detach().max())))
        return mask

    monkeypatch.setattr(isp.train, "sample_mask", spy)
    monkeypatch.setattr(isp.losses, "sample_mask", spy)
    return calls


def test_predictor_and_selector_draw_masks_with_one_sampler_and_temperature(monkeypatch, tmp_path):
    torch.manual_seed(0)
    calls = _spy(monkeypatch)
    data = load_dataset("digits")
    classifier = build_backbone("resnet20", data.num_classes).eval()
    predictor = build_backbone("resnet20", data.num_classes)
    loader = BatchLoader(data.train, 8, train=True, seed=0)
    tau = 0.1
    train_predictor(RunDir(tmp_path / "p"), classifier, predictor, loader, 2, lr=1e-3, weight_decay=0.0,
                    kind="rbf", tau=tau, seconds=None, log=None)
    predictor_calls = list(calls)
    decoder = SelectorDecoder(decoder_shape(classifier, data.image_size, data.num_classes))
    losses = []
    original_loss = isp.train.selector_loss

    def recording_loss(*args, **kwargs):
        parts = original_loss(*args, **kwargs)
        losses.append(parts.total)
        return parts

    monkeypatch.setattr(isp.train, "selector_loss", recording_loss)
    policy = resolve_precision("auto", "cpu")  # bf16 where native: the loss must still be fp32
    train_selector(RunDir(tmp_path / "s"), classifier, predictor, decoder, loader, 2, lr=1e-3, weight_decay=0.0,
                   lambda1=1.5, lambda2=0.1, tau=tau, seconds=None, log=None, policy=policy)
    selector_calls = calls[len(predictor_calls):]
    assert len(predictor_calls) == 2 and len(selector_calls) == 2
    # the same temperature, fp32 relaxed masks in [0, 1] with intermediate values (not hard, not tau = 1 mush)
    for t, dtype, lo, hi in predictor_calls + selector_calls:
        assert t == tau and dtype == torch.float32 and 0.0 <= lo < hi <= 1.0
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)


def test_more_mask_samples_average_the_same_objective_with_less_variance():
    """selector_loss(samples=K) is the mean of K relaxed draws per image: the same expectation (Eq. 8) and a
    Monte-Carlo variance about K times smaller."""
    from isp.losses import selector_loss

    torch.manual_seed(0)
    predictor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = torch.rand(6, 3, 8, 8)
    logits = torch.randn(6, 4)
    probs = torch.rand(6, 8, 8)
    generator = torch.Generator().manual_seed(1)

    def draws(samples: int) -> torch.Tensor:
        return torch.stack([selector_loss(logits, predictor, images, probs, lambda1=0.5, lambda2=0.5, tau=0.1,
                                          generator=generator, samples=samples).total.detach()
                            for _ in range(400)])

    one, four = draws(1), draws(4)
    assert abs(float(one.mean() - four.mean())) < 3 * float(one.std()) / 400**0.5
    ratio = float(one.var() / four.var())
    assert 2.8 < ratio < 5.5, ratio
