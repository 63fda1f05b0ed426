"""Grid pointing game and the randomisation sanity test read against its floor: hand-built models whose
answers are known, the controls at their values by construction, and a peer check of the Quantus reset."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from common.explain import (
    Mosaics,
    build_mosaics,
    cell_masks,
    centre_saliency,
    gradcam_saliency,
    grid_pointing_game,
    random_saliency,
    randomisation_sanity,
    tile_mosaic,
)


class QuadrantMask(nn.Module):
    """Keeps channel c only in quadrant c (row-major) of its map."""

    def forward(self, x: Tensor) -> Tensor:
        return x * cell_masks(*x.shape[-2:], device=x.device).to(x)[None]


class QuadrantNet(nn.Module):
    """Four classes; the logit of class c is the mean brightness of quadrant c only (at half resolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2), QuadrantMask())
        with torch.no_grad():
            self.features[0].weight.fill_(1 / 3)
            self.features[0].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return 4 * self.features(x).mean(dim=(2, 3))


def _quadrant_mosaics(n: int = 6, side: int = 16) -> Mosaics:
    g = torch.Generator().manual_seed(0)
    cells = 0.2 + 0.8 * torch.rand(n, 4, 3, side, side, generator=g)
    labels = torch.arange(4).expand(n, 4).clone()  # class c sits in cell c, where the network looks for it
    return Mosaics(tile_mosaic(cells), labels, torch.arange(4 * n).view(n, 4), 4 * n, 4 * n)


def test_gradcam_points_at_the_quadrant_and_the_controls_score_a_quarter() -> None:
    model, mosaics = QuadrantNet(), _quadrant_mosaics()
    cam = grid_pointing_game(gradcam_saliency(model, model.features), mosaics)
    assert cam.mean > 0.95 and cam.empty == 0
    random, centre = grid_pointing_game(random_saliency(0), mosaics), grid_pointing_game(centre_saliency(), mosaics)
    assert random.mean == pytest.approx(0.25, abs=0.01)
    assert centre.mean == pytest.approx(0.25, abs=1e-6) and centre.se == pytest.approx(0.0, abs=1e-6)
    mean, se = cam  # unpacks as (mean, se)
    assert mean == cam.mean and se > 0 and cam.scores.shape == (len(mosaics), 4)
    # The game can fail: ask for the class of another cell and the same Grad-CAM points away.
    swapped = Mosaics(mosaics.images, mosaics.labels.roll(1, dims=1), mosaics.indices, 0, 0)
    assert grid_pointing_game(gradcam_saliency(model, model.features), swapped).mean < 0.05


def test_gridpg_resizes_small_maps_and_scores_empty_maps_zero() -> None:
    mosaics = _quadrant_mosaics(2)
    half = torch.zeros(16, 16)
    half[:8, :8] = 1.0  # a half-resolution map of the top-left cell, upsampled to the 32 x 32 mosaic
    top_left = lambda x, y: half.expand(len(x), 16, 16)  # noqa: E731
    score = grid_pointing_game(top_left, mosaics)
    assert float(score.scores[:, 0].min()) > 0.9 and float(score.scores[:, 1:].max()) < 0.1
    empty = grid_pointing_game(lambda x, y: -torch.ones(len(x), 32, 32), mosaics)
    assert empty.mean == 0.0 and empty.empty == 8
    with pytest.raises(ValueError, match="no mosaics"):
        grid_pointing_game(top_left, Mosaics(torch.zeros(0, 3, 32, 32), torch.zeros(0, 4), torch.zeros(0, 4), 0, 0))


class BrightnessClassifier(nn.Module):
    """Predicts class round(10 * mean of channel 0): an image's class is written into its brightness."""

    def forward(self, x: Tensor) -> Tensor:
        guess = (10 * x[:, 0].mean(dim=(1, 2))).round().long().clamp(0, 9)
        return nn.functional.one_hot(guess, 10).float()


def test_build_mosaics_uses_only_correct_images_of_four_distinct_classes_seeded() -> None:
    labels = torch.arange(60) % 6
    images = torch.zeros(60, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = (labels * 25.5).round().to(torch.uint8)[:, None, None]
    images[:10, 0] = 255  # written as class 10 -> predicted 9: wrong, must never be used
    images[:, 1] = torch.arange(60, dtype=torch.uint8)[:, None, None]  # names the image
    model = BrightnessClassifier()
    mosaics = build_mosaics(model, images, labels, 100, seed=3, indices=torch.arange(100, 160))
    assert mosaics.qualified == 50 and mosaics.candidates == 60
    assert len(mosaics) == 12  # 50 images over 6 classes of 8 or 9 each: as many mosaics as fit
    assert mosaics.images.shape == (12, 3, 16, 16)
    used = mosaics.indices.flatten() - 100
    assert len(set(used.tolist())) == len(used) and used.min() >= 10  # no repeats, no misclassified image
    for m in range(len(mosaics)):
        assert len(set(mosaics.labels[m].tolist())) == 4
        for cell, (r, c) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
            source = int(mosaics.indices[m, cell]) - 100
            assert int(labels[source]) == int(mosaics.labels[m, cell])
            torch.testing.assert_close(mosaics.images[m, :, r:r + 8, c:c + 8], images[source].float() / 255)
    again = build_mosaics(model, images, labels, 100, seed=3, indices=torch.arange(100, 160))
    assert torch.equal(again.indices, mosaics.indices)
    assert not torch.equal(build_mosaics(model, images, labels, 100, seed=4).indices, mosaics.indices - 100)
    assert len(build_mosaics(model, images, labels, 2, seed=3)) == 2


# ---------------------------------------------------------------- randomisation sanity test


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_random_map_is_deterministic_per_image_whatever_the_batch_or_model() -> None:
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.long)
    noise = random_saliency(0)
    maps = noise(x, y)
    torch.testing.assert_close(noise(x.flip(0), y).flip(0), maps)  # another order
    torch.testing.assert_close(noise(x[2:4], y[2:4]), maps[2:4])  # another batch
    torch.testing.assert_close(random_saliency(0)((x * 255).round() / 255, y), maps)  # the same 8-bit image
    assert not torch.allclose(maps[0], maps[1])  # different images, different noise
    assert not torch.allclose(random_saliency(1)(x, y), maps)  # the seed still matters


def test_sanity_test_reads_the_same_image_against_its_floor() -> None:
    model = _tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(12, dtype=torch.long)
    for reset in ("kaiming", "quantus"):
        for blind in (random_saliency(0), centre_saliency(), lambda images, targets: images.mean(1)):
            result = randomisation_sanity(model, blind, x, y, reset=reset)
            assert result.same_image == pytest.approx(1.0) and not result.depends_on_weights, result
            assert result.verdict == "blind to the weights" and result.reset == reset
        # A map drawn from the first conv's weights alone: what the reset changes, nothing of the image.
        def weights_only(images: Tensor, targets: Tensor) -> Tensor:
            pattern = model[0].weight.sum(dim=(0, 1))  # 3 x 3
            return pattern.repeat(6, 6)[None].expand(len(images), 18, 18)[:, :16, :16].clone()

        result = randomisation_sanity(model, weights_only, x, y, reset=reset)
        assert result.same_image == pytest.approx(result.floor) and result.depends_on_weights, result
    noise = randomisation_sanity(model, random_saliency(0), x, y)
    assert abs(noise.floor) < 3 * noise.floor_se + 0.05 and noise.floor_se > 0  # other images' noise
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="reset"):
        randomisation_sanity(model, centre_saliency(), x, y, reset="zeros")
    with pytest.raises(ValueError, match="two images"):
        randomisation_sanity(model, centre_saliency(), x[:1], y[:1])


def test_quantus_reset_matches_quantus_model_parameter_randomisation() -> None:
    """Peer check: the "quantus" reset leaves the weights Quantus 0.6's top-down randomisation ends with."""
    pytorch_model = pytest.importorskip("quantus.helpers.model.pytorch_model")
    model = _tiny_cnn()
    *_, (_, theirs) = pytorch_model.PyTorchModel(model, device="cpu").get_random_layer_generator("top_down", seed=7)
    seen = {}

    def record(images: Tensor, targets: Tensor) -> Tensor:
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return images.mean(1)

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    randomisation_sanity(model, record, x, torch.zeros(2, dtype=torch.long), reset="quantus", seed=7)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(seen[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(seen["0.weight"], trained["0.weight"])  # it did reset
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # and restored
