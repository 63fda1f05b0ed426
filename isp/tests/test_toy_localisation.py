"""The selector objective has an interior optimum: on a toy task whose class evidence is a small coloured
patch at a random, image-specific place, the trained selector centres its RBF kernel on the patch and keeps
neither almost nothing nor almost everything."""

import copy

import pytest
import torch
from torch import nn

from common.backbones.base import Backbone, Normalize
from common.data import BatchLoader, ImageTensors
from common.run import RunDir
from isp.rbf import rbf_bernoulli
from isp.selector import SelectorDecoder, decoder_shape, forward_with_stages
from isp.train import VALIDATION_SAMPLES, selector_validation, train_predictor, train_selector

# Every test here shares the ~40 s toy training of the ``trained`` fixture.
pytestmark = pytest.mark.slow

SIZE, PATCH, CLASSES = 16, 4, 3


class TinyNet(Backbone):
    """Two encoder scales (16 x 16 x 8, 8 x 8 x 16), global pooling, linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.4, 0.4, 0.4), (0.25, 0.25, 0.25))
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, CLASSES)

    def forward_features(self, x):
        return self.feature_out(self.stage2(self.stage1(self.normalize(x))))

    def forward_head(self, features):
        return self.classifier(features.amax((2, 3)))

    def feature_stages(self):
        return [self.stage1, self.stage2]

    def gate_sites(self):
        return []


def toy_images(n: int, seed: int) -> tuple[ImageTensors, torch.Tensor]:
    """Grey noise; a pure red, green or blue 4 x 4 patch (the class) whose centre lies in [4, 12]^2."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.4 + 0.2
    images = grey.repeat(1, 3, 1, 1)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    corner = torch.randint(2, SIZE - PATCH - 1, (n, 2), generator=g)
    for k in range(n):
        i, j = corner[k].tolist()
        images[k, :, i:i + PATCH, j:j + PATCH] = 0.0
        images[k, labels[k], i:i + PATCH, j:j + PATCH] = 1.0
    return ImageTensors((images * 255).round().to(torch.uint8), labels), corner.float() + PATCH / 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    train, _ = toy_images(1024, seed=0)
    loader = BatchLoader(train, 64, train=True, augment=False, seed=0)
    classifier = TinyNet()
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    for epoch in range(6):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(classifier(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    classifier.eval()
    run = RunDir(tmp_path_factory.mktemp("toy"))
    predictor = TinyNet()
    predictor.load_state_dict(classifier.state_dict())
    train_predictor(run, classifier, predictor, loader, 300, lr=3e-3, weight_decay=0.0, kind="rbf", tau=0.1,
                    sigma_max=2.0 * SIZE, seconds=None, log=None)
    decoder = SelectorDecoder(decoder_shape(classifier, (SIZE, SIZE), CLASSES), "rbf", sigma_bias=4.0)
    val, _ = toy_images(128, seed=7)
    # The checkpoint of the lowest validation objective is kept (as in the pipeline): the last step of a
    # noisy run can sit anywhere along the shallow basin; this held across fixture seeds 0-3 (distance
    # 1.1-1.5 px, 3.2-3.8% kept, patch coverage 25-40x the rest).
    train_selector(run, classifier, predictor, decoder, BatchLoader(train, 32, train=True, augment=False, seed=1),
                   800, lr=5e-4, weight_decay=0.0, lambda1=0.2, lambda2=0.3, tau=0.1, seconds=None, log=None,
                   val_images=val.images.float() / 255, val_every=25)
    return classifier, decoder, predictor


def test_classifier_solves_the_toy_task(trained):
    classifier, _, _ = trained
    test, _ = toy_images(256, seed=1)
    with torch.no_grad():
        accuracy = (classifier(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert accuracy > 0.95


def test_selector_learns_image_specific_masks_that_cover_the_evidence(trained):
    classifier, decoder, _ = trained
    test, centres = toy_images(256, seed=2)
    x = test.images.float() / 255
    with torch.no_grad():
        logits, stages = forward_with_stages(classifier, x)
        code = decoder.eval().code(stages, logits.argmax(1))
    distance = (code[:, :2] - centres).norm(dim=1)
    print("median distance", distance.median(), "centre sd", code[:, :2].std(0), "sigma", code[:, 2].median())
    # The kernel sits on the patch (half-width 2 px); a fixed guess at the middle would be ~3.3 px away.
    assert distance.median() < 2.0
    assert code[:, :2].std(0).min() > 1.5  # centres move with the patch: image-specific explanations
    probs = rbf_bernoulli(code, SIZE, SIZE)
    kept = probs.flatten(1).mean(1)
    # An interior optimum: neither all-off nor all-on. The evidence is 6.25% of the image (one 4 x 4 patch).
    assert PATCH**2 / SIZE**2 / 4 < kept.median() < 0.6
    patch_mask = torch.zeros(len(x), SIZE, SIZE)
    for k, (ci, cj) in enumerate(centres.long().tolist()):
        patch_mask[k, ci - PATCH // 2:ci + PATCH // 2, cj - PATCH // 2:cj + PATCH // 2] = 1
    coverage = (probs * patch_mask).flatten(1).sum(1) / patch_mask.flatten(1).sum(1)
    outside = (probs * (1 - patch_mask)).flatten(1).sum(1) / (1 - patch_mask).flatten(1).sum(1)
    print("kept", kept.median(), "coverage", coverage.median(), "outside", outside.median())
    # the patch's pixels are kept far more often than the rest of the image
    assert coverage.median() > 0.25 and coverage.median() > 10 * outside.median()


def test_validation_choice_returns_the_best_decoder_not_the_last(trained, tmp_path):
    """From the trained (interior) decoder, a far too large learning rate wrecks the selector within a few
    steps; with validation images the stage must hand back the decoder of the lowest validation objective."""
    classifier, trained_decoder, predictor = trained
    decoder = copy.deepcopy(trained_decoder)
    start = {k: v.clone() for k, v in decoder.state_dict().items()}
    train, _ = toy_images(256, seed=3)
    val, _ = toy_images(128, seed=4)
    val_images = val.images.float() / 255
    kwargs = {"lambda1": 0.2, "lambda2": 0.3, "tau": 0.1}
    state = train_selector(RunDir(tmp_path), classifier, predictor, decoder,
                           BatchLoader(train, 32, train=True, augment=False, seed=5), 40, lr=0.5,
                           weight_decay=0.0, seconds=None, log=None, val_images=val_images, val_every=10, **kwargs)
    history = state.extra["val_history"]
    assert [h["step"] for h in history] == [0, 10, 20, 30, 40]
    losses = [h["loss"] for h in history]
    assert history[-1]["loss"] > min(losses) + 0.05, "the large learning rate should have made the selector worse"
    assert state.extra["best_val_loss"] == min(losses)
    again = selector_validation(classifier, predictor, decoder, val_images, samples=VALIDATION_SAMPLES, **kwargs)
    assert again["loss"] == pytest.approx(min(losses), abs=1e-5)
    if losses.index(min(losses)) == 0:
        assert all(torch.equal(v, start[k]) for k, v in decoder.state_dict().items())


def test_selector_centre_follows_one_object_moved_across_the_frame(trained):
    """The same grey image with the same red patch, moved step by step across the frame (along the rows, then
    along the columns): the predicted centre must track the patch on the moving axis (not a fixed prior near
    the middle) and stay put on the other."""
    classifier, decoder, _ = trained
    g = torch.Generator().manual_seed(11)
    grey = (torch.rand(1, SIZE, SIZE, generator=g) * 0.4 + 0.2).repeat(3, 1, 1)
    offsets = list(range(2, SIZE - PATCH - 1))  # patch corner 2..11: centres 4..13
    for axis in (0, 1):
        images = []
        for k in offsets:
            x = grey.clone()
            i, j = (k, 6) if axis == 0 else (6, k)
            x[:, i:i + PATCH, j:j + PATCH] = 0.0
            x[0, i:i + PATCH, j:j + PATCH] = 1.0
            images.append(x)
        x = (torch.stack(images) * 255).round() / 255
        with torch.no_grad():
            logits, stages = forward_with_stages(classifier, x)
            code = decoder.eval().code(stages, logits.argmax(1))
        truth = torch.tensor(offsets, dtype=torch.float) + PATCH / 2
        moving, fixed = code[:, axis], code[:, 1 - axis]
        corr = torch.corrcoef(torch.stack([moving, truth]))[0, 1]
        print("axis", axis, "centres", [round(v, 1) for v in moving.tolist()], "corr", float(corr))
        assert corr > 0.9
        assert moving.max() - moving.min() > 0.6 * (truth.max() - truth.min())  # it travels with the object
        assert (moving - truth).abs().median() < 2.0
        assert fixed.std() < moving.std() / 2
