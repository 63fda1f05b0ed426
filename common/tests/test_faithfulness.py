"""Faithfulness metrics and controls: they rank a planted truth above noise, and the controls behave."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from common.explain import (
    build_mosaics,
    cascading_randomisation,
    centre_saliency,
    explanation_drift,
    gradcam_saliency,
    grid_pointing_game,
    linear_probe,
    noisy_linear_imputation,
    random_saliency,
    randomisation_sanity,
    rank_correlation,
    road,
    tile_deletion_insertion,
    top_overlap,
)


class RegionDetector(nn.Module):
    """Class 0's logit is the brightness of one 8 x 8 region: the evidence sits there only."""

    def forward(self, x: Tensor) -> Tensor:
        score = 12.0 * (x[:, :, 12:20, 4:12].mean(dim=(1, 2, 3)) - 0.6)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def _planted_images(n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 0.4 * torch.rand(n, 3, 32, 32, generator=g) + 0.1
    x[:, :, 12:20, 4:12] = 1.0
    truth = torch.zeros(n, 32, 32)
    truth[:, 12:20, 4:12] = 1.0
    return x, truth


def test_planted_region_beats_random_on_every_metric() -> None:
    model, (x, truth) = RegionDetector(), _planted_images()
    targets = torch.zeros(len(x), dtype=torch.long)
    noise = random_saliency(0)(x, targets)
    game_truth, game_noise = (tile_deletion_insertion(model, x, m, targets) for m in (truth, noise))
    road_truth, road_noise = (road(model, x, m, targets) for m in (truth, noise))
    assert game_truth.deletion_auc.mean() < game_noise.deletion_auc.mean() - 0.05
    assert game_truth.insertion_auc.mean() > game_noise.insertion_auc.mean() + 0.05
    assert road_truth.morf_auc.mean() < road_noise.morf_auc.mean() - 0.05
    assert road_truth.gap.mean() > road_noise.gap.mean() + 0.1
    # Both ends of the tile games are the clean image and the full canvas, whatever the map.
    assert torch.allclose(game_truth.deletion[:, 0], game_noise.deletion[:, 0])
    assert torch.allclose(game_truth.insertion[:, -1], game_noise.deletion[:, 0])


def test_linear_imputation_is_exact_on_a_linear_image_and_keeps_kept_pixels() -> None:
    ramp = (torch.arange(32.0)[None, :] * 0.02 + torch.arange(32.0)[:, None] * 0.01).expand(1, 3, 32, 32)
    removed = torch.zeros(1, 32, 32, dtype=torch.bool)
    removed[0, 10:20, 5:25] = True  # interior hole: every neighbour set is symmetric
    filled = noisy_linear_imputation(ramp, removed, noise=0.0)
    assert torch.allclose(filled, ramp, atol=1e-5)
    noisy = noisy_linear_imputation(ramp, removed, noise=0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, :, ~removed[0]], ramp[:, :, ~removed[0]])
    assert 0.03 < float((noisy - ramp)[:, :, removed[0]].std()) < 0.07
    with pytest.raises(ValueError, match="kept pixel"):
        noisy_linear_imputation(ramp, torch.ones(1, 32, 32, dtype=torch.bool))


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_randomisation_catches_an_explainer_that_ignores_the_weights_and_restores_them() -> None:
    model = _tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(8, dtype=torch.long)
    edge_detector = lambda images, targets: images.mean(1)  # noqa: E731  (a map blind to the model)
    blind = cascading_randomisation(model, edge_detector, x, y, stages=3)
    assert blind.spearman == pytest.approx([1.0, 1.0, 1.0])
    cam = cascading_randomisation(model, gradcam_saliency(model, model[3]), x, y, stages=3)
    assert len(cam.layers) == 3 and cam.final < 0.9
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_drift_rank_correlation_and_overlap() -> None:
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert explanation_drift(maps, maps) == pytest.approx({"spearman": 1.0, "top_overlap": 1.0})
    assert rank_correlation(maps, -maps).mean().item() == pytest.approx(-1.0)
    assert top_overlap(maps, -maps, 0.1).max().item() == 0.0
    assert rank_correlation(maps, torch.zeros_like(maps)).abs().max().item() == 0.0  # constant: no ranking


def test_linear_probe_reads_planted_classes_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    planted = torch.nn.functional.one_hot(labels, 4).float() + 0.3 * torch.randn(600, 4, generator=g)
    noise = torch.randn(600, 4, generator=g)
    assert linear_probe(planted[:400], labels[:400], planted[400:], labels[400:]) > 0.9
    assert linear_probe(noise[:400], labels[:400], noise[400:], labels[400:]) < 0.4


def _pretrained_resnet20():
    root = Path(os.environ.get("DATA_ROOT", "data"))
    weights = root / "weights" / "resnet20-12fca82f.th"
    if not weights.is_file() or not (root / "cifar10").is_dir():
        pytest.skip("needs DATA_ROOT with cifar10 and weights/resnet20-12fca82f.th")
    from common.backbones import build_backbone
    from common.data import load_dataset

    data = load_dataset("cifar10", root, val_source="test-half")
    return build_backbone("resnet20", 10, weights=str(weights)).eval(), data


@pytest.mark.data
def test_random_ranks_below_gradcam_on_pretrained_resnet20_held_out_half() -> None:
    model, data = _pretrained_resnet20()
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[:64]
    x, y = data.test.images[idx].float() / 255, data.test.labels[idx]
    scores = {}
    for name, fn in {"random": random_saliency(0), "centre": centre_saliency(),
                     "gradcam": gradcam_saliency(model, model.cam_layer())}.items():
        maps = fn(x, y)
        game, ro = tile_deletion_insertion(model, x, maps, y), road(model, x, maps, y)
        scores[name] = (game.deletion_auc.mean(), game.insertion_auc.mean(), ro.gap.mean())
    rand, cam = scores["random"], scores["gradcam"]
    assert cam[0] < rand[0] and cam[1] > rand[1] and cam[2] > rand[2], scores
    assert scores["centre"][1] > rand[1], scores  # the centre bias alone already beats noise


@pytest.mark.data
@pytest.mark.slow
def test_gridpg_and_sanity_separate_gradcam_from_the_controls_on_pretrained_resnet20() -> None:
    """Held-out test half, a seeded subset: 320 candidates -> 64 mosaics (256 cells), 64 sanity images."""
    torch.set_num_threads(1)
    model, data = _pretrained_resnet20()
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))[:320]
    mosaics = build_mosaics(model, data.test.images[idx], data.test.labels[idx], 64, seed=0, indices=idx)
    assert len(mosaics) == 64 and mosaics.qualified > 256
    explainers = {"random": random_saliency(0), "centre": centre_saliency(),
                  "gradcam": gradcam_saliency(model, model.cam_layer())}
    games = {name: grid_pointing_game(fn, mosaics) for name, fn in explainers.items()}
    for control in ("random", "centre"):
        assert games[control].mean == pytest.approx(0.25, abs=0.02), games[control]
        lift = (games["gradcam"].scores - games[control].scores).flatten().double()  # paired, same cells
        assert float(lift.mean()) > 2 * float(lift.std() / lift.numel() ** 0.5), (control, games)

    x, y = data.test.images[idx[:64]].float() / 255, data.test.labels[idx[:64]]
    for control in ("random", "centre"):
        sanity = randomisation_sanity(model, explainers[control], x, y)
        assert sanity.same_image >= 0.9 and not sanity.depends_on_weights, sanity
    for reset in ("kaiming", "quantus"):
        sanity = randomisation_sanity(model, explainers["gradcam"], x, y, reset=reset)
        assert abs(sanity.same_image - sanity.floor) <= 2 * sanity.diff_se and sanity.depends_on_weights, sanity


def test_imputation_agrees_with_quantus_road_imputation() -> None:
    """Peer check: Quantus 0.6's ROAD imputation solves the same system (test-only extra `peers`)."""
    perturb = pytest.importorskip("quantus.functions.perturb_func")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    removed = torch.rand(1, 16, 16, generator=g) < 0.4
    theirs = perturb.noisy_linear_imputation(x[0].numpy(), removed[0].reshape(-1).nonzero()[:, 0].numpy(), noise=0.0)
    mine = noisy_linear_imputation(x, removed, noise=0.0)[0]
    torch.testing.assert_close(mine, torch.from_numpy(theirs), atol=1e-10, rtol=0)
