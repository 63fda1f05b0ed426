"""Tests for common.explain: tiny hand-built models whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from sklearn.feature_selection import mutual_info_classif
from torch import Tensor, nn

from common.explain import (
    bbox_score,
    degradation_test,
    deletion_curve,
    grad_cam,
    insertion_curve,
    make_baseline,
    mis,
    mutual_information_matrix,
    pointing_game,
    pooled_activations,
    saliency_to_unit,
    scaled_tile,
    smooth_grad,
)


def sigmoid(values: list[float]) -> Tensor:
    return torch.sigmoid(torch.tensor(values, dtype=torch.float32))


def trapezoid(ys: list[float] | Tensor, xs: list[float]) -> float:
    ys = [float(y) for y in ys]
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


class PixelLinear(nn.Module):
    """Two logits: [sum_ij weight_ij * x[0, i, j], 0], so p(class 0) = sigmoid(weighted sum of channel 0)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float())

    def forward(self, x: Tensor) -> Tensor:
        logit = (x[:, 0] * self.weight).sum(dim=(1, 2))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class CamNet(nn.Module):
    """1x1 conv that copies channels 0 and 1 (plus a bias), optional ReLU, GAP, dropout, linear head."""

    def __init__(self, head: list[list[float]], bias: float = 0.0, inplace_relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.relu = nn.ReLU(inplace=True) if inplace_relu else nn.Identity()
        self.drop = nn.Dropout(0.9)  # would scramble the answer unless grad_cam runs the model in eval mode
        self.fc = nn.Linear(2, len(head))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
            self.conv.bias.fill_(bias)
            self.fc.weight.copy_(torch.tensor(head))
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.relu(self.conv(x)).mean(dim=(2, 3))))


# channel 0 and channel 1 of a 2 x 2 image; channel 2 is ignored by CamNet
X0 = [[0.1, 0.2], [0.3, 0.4]]
X1 = [[0.4, 0.0], [0.2, 0.1]]


def cam_image() -> Tensor:
    return torch.tensor([X0, X1, [[0.5, 0.5], [0.5, 0.5]]])[None]


# ---------------------------------------------------------------- Grad-CAM


def test_grad_cam_matches_closed_form_for_gap_linear_head():
    # alpha_k = w[t, k] / (h*w) = w[t, k] / 4, cam = relu(sum_k alpha_k A_k) with A_k = channel k.
    model = CamNet(head=[[1.0, -2.0], [-1.0, 1.0]])
    x = cam_image()
    cam = grad_cam(model, model.conv, x, targets=torch.tensor([0]))
    # (x0 - 2 x1) / 4 = [[-0.7, 0.2], [-0.1, 0.2]] / 4
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.05], [0.0, 0.05]]]))
    cam1 = grad_cam(model, model.conv, x, targets=1)
    # (-x0 + x1) / 4 = [[0.3, -0.2], [-0.1, -0.3]] / 4
    torch.testing.assert_close(cam1, torch.tensor([[[0.075, 0.0], [0.0, 0.0]]]))


def test_grad_cam_default_target_is_prediction():
    model = CamNet(head=[[1.0, -2.0], [-1.0, 1.0]])
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.0, 10.0]))  # class 1 always wins
    cam = grad_cam(model, model.conv, cam_image())
    torch.testing.assert_close(cam, torch.tensor([[[0.075, 0.0], [0.0, 0.0]]]))


def test_grad_cam_channel_subset():
    model = CamNet(head=[[1.0, -2.0], [-1.0, 1.0]])
    x = cam_image().repeat(2, 1, 1, 1)
    only_first = torch.tensor([[0.025, 0.05], [0.075, 0.1]])  # relu(x0 / 4)
    cam = grad_cam(model, model.conv, x, targets=0, channels=torch.tensor([True, False]))
    torch.testing.assert_close(cam, only_first.expand(2, 2, 2))
    cam = grad_cam(model, model.conv, x, targets=0, channels=torch.tensor([1]))  # relu(-2 x1 / 4) = 0
    torch.testing.assert_close(cam, torch.zeros(2, 2, 2))
    per_sample = torch.tensor([[True, False], [False, True]])
    cam = grad_cam(model, model.conv, x, targets=0, channels=per_sample)
    torch.testing.assert_close(cam, torch.stack([only_first, torch.zeros(2, 2)]))
    cam = grad_cam(model, model.conv, x, targets=0, channels=torch.tensor([[0], [1]]))
    torch.testing.assert_close(cam, torch.stack([only_first, torch.zeros(2, 2)]))


def test_grad_cam_inplace_relu_after_layer_train_mode_frozen_params_and_cleanup():
    # A_k = x_k - 0.25 is followed by ReLU(inplace=True): dy/dA = w_k / 4 * [A > 0], so
    # alpha_0 = 1/4 * 2/4 = 0.125, alpha_1 = -2/4 * 1/4 = -0.125, cam = 0.125 * relu(A_0 - A_1).
    model = CamNet(head=[[1.0, -2.0], [-1.0, 1.0]], bias=-0.25, inplace_relu=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.weight.requires_grad_(True)
    model.train()
    with torch.no_grad():
        cam = grad_cam(model, model.conv, cam_image(), targets=0)
    torch.testing.assert_close(cam, torch.tensor([[[0.0, 0.025], [0.0125, 0.0375]]]))
    assert model.training and model.drop.training
    assert not model.conv._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_restores_per_module_flags_and_upsamples_bilinearly():
    torch.manual_seed(0)  # the layers' initialisation must not depend on which tests ran before
    model = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model.train()
    model[0].eval()  # a deliberately frozen submodule stays frozen
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    small = grad_cam(model, model[1], x, targets=torch.tensor([0, 2]), upsample=False)
    big = grad_cam(model, model[1], x, targets=torch.tensor([0, 2]))
    assert small.shape == (2, 4, 4) and big.shape == (2, 8, 8)
    expected = F.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(big, expected)
    assert (small >= 0).all() and small.max() > 0
    assert model.training and model[1].training and not model[0].training


def test_grad_cam_agrees_with_captum_layer_gradcam():
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    ).eval()
    x = torch.rand(3, 3, 8, 8)
    targets = torch.tensor([0, 1, 2])
    ours = grad_cam(model, model[2], x, targets=targets, upsample=False)
    reference = captum_attr.LayerGradCam(model, model[2]).attribute(x, target=targets, relu_attributions=True)
    assert ours.max() > 0
    torch.testing.assert_close(ours, reference[:, 0], atol=1e-6, rtol=1e-5)
    ours_up = grad_cam(model, model[2], x, targets=targets)
    ref_up = captum_attr.LayerAttribution.interpolate(reference, (8, 8), interpolate_mode="bilinear")
    torch.testing.assert_close(ours_up, ref_up[:, 0], atol=1e-6, rtol=1e-5)


def test_saliency_to_unit():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]], [[-2.0, 0.0], [0.0, 2.0]]])
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.5], [0.5, 1.0]]])
    torch.testing.assert_close(saliency_to_unit(maps), expected)


# ---------------------------------------------------------------- deletion / insertion

# channel 0 contributions weight * x = [[1, 1], [0.75, 0]] to the class-0 logit (clean logit 2.75)
WEIGHT = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
IMAGE = torch.tensor([[[1.0, 0.5], [0.25, 0.0]], [[0.3, 0.3], [0.3, 0.3]], [[0.6, 0.6], [0.6, 0.6]]])[None]
SALIENCY = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])  # order: pixel 1, pixel 2, pixel 3, pixel 0


def test_deletion_curve_by_hand():
    model = PixelLinear(WEIGHT)
    curves = deletion_curve(model, IMAGE, SALIENCY, torch.tensor([0]), steps=4, step_fraction=0.25)
    # delete pixel 1 (-1), pixel 2 (-0.75), pixel 3 (-0), pixel 0 (-1): logits 2.75, 1.75, 1.0, 1.0, 0
    expected = sigmoid([2.75, 1.75, 1.0, 1.0, 0.0])
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(curves.fractions, torch.tensor(xs))
    torch.testing.assert_close(curves.scores, expected[None])
    torch.testing.assert_close(curves.auc, torch.tensor([trapezoid(expected, xs)]))
    assert curves.scores[0, -1] == pytest.approx(0.5)  # the all-black image's score
    # same game for class 1 reads 1 - p
    curves1 = deletion_curve(model, IMAGE, SALIENCY, 1, steps=4, step_fraction=0.25)
    torch.testing.assert_close(curves1.scores, 1 - expected[None])


def test_insertion_curve_by_hand_ends_at_clean_score():
    model = PixelLinear(WEIGHT)
    curves = insertion_curve(model, IMAGE, SALIENCY, torch.tensor([0]), steps=4, step_fraction=0.25, baseline="zero")
    expected = sigmoid([0.0, 1.0, 1.75, 1.75, 2.75])
    torch.testing.assert_close(curves.scores, expected[None])
    torch.testing.assert_close(curves.auc, torch.tensor([trapezoid(expected, [0, 0.25, 0.5, 0.75, 1])]))
    assert curves.scores[0, -1] == pytest.approx(torch.sigmoid(torch.tensor(2.75)).item())


def test_ties_follow_pixel_index_and_steps_saturate():
    model = PixelLinear(WEIGHT)
    flat = torch.zeros(1, 2, 2)
    curves = deletion_curve(model, IMAGE, flat, 0, steps=4, step_fraction=0.25)
    # ties -> pixels 0, 1, 2, 3: logits 2.75, 1.75, 0.75, 0, 0
    torch.testing.assert_close(curves.scores, sigmoid([2.75, 1.75, 0.75, 0.0, 0.0])[None])
    # 0.3 of 4 pixels -> ceil(1.2) = 2 per step; 3 steps -> counts 0, 2, 4, 4 (zero-width last segment)
    curves = deletion_curve(model, IMAGE, SALIENCY, 0, steps=3, step_fraction=0.3)
    expected = sigmoid([2.75, 1.0, 0.0, 0.0])
    torch.testing.assert_close(curves.fractions, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(curves.scores, expected[None])
    torch.testing.assert_close(curves.auc, torch.tensor([trapezoid(expected, [0, 0.5, 1, 1])]))
    # 0.07 * 100 is 7.000000000000001 in floating point: must still be 7 pixels per step, not 8
    square = PixelLinear(torch.ones(10, 10))
    curves = deletion_curve(square, torch.ones(1, 3, 10, 10), torch.zeros(1, 10, 10), 0, steps=15, step_fraction=0.07)
    torch.testing.assert_close(curves.fractions, (torch.arange(16) * 7).clamp_max(100) / 100)


def test_perturbation_batched_chunks_baselines_and_mode():
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    model = PixelLinear(weight).train()
    images = torch.rand(3, 3, 8, 8)
    saliency = torch.rand(3, 8, 8)
    targets = torch.tensor([0, 1, 0])
    kwargs = {"steps": 10, "step_fraction": 0.1}
    full = deletion_curve(model, images, saliency, targets, batch_size=64, **kwargs)
    chunked = deletion_curve(model, images, saliency, targets, batch_size=5, **kwargs)
    torch.testing.assert_close(full.scores, chunked.scores)
    assert model.training
    # row b of a batch equals the same image alone
    alone = deletion_curve(model, images[1:2], saliency[1:2], targets[1:2], **kwargs)
    torch.testing.assert_close(full.scores[1:2], alone.scores)
    # a low-resolution map is bilinearly resized before ranking
    low = torch.rand(3, 4, 4)
    resized = F.interpolate(low[:, None], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        deletion_curve(model, images, low, targets, **kwargs).scores,
        deletion_curve(model, images, resized, targets, **kwargs).scores,
    )
    # insertion starts from the blurred image (kernel 11, sigma 5) by default
    blurred = TF.gaussian_blur(images, kernel_size=[11, 11], sigma=[5.0, 5.0])
    ins = insertion_curve(model, images, saliency, targets, **kwargs)
    p = torch.softmax(model(blurred), dim=1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ins.scores[:, 0], p)
    p_clean = torch.softmax(model(images), dim=1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(ins.scores[:, -1], p_clean)
    # mean baseline: per-image per-channel mean; tensor baseline broadcast
    mean = make_baseline(images, "mean")
    torch.testing.assert_close(mean[1, 2], images[1, 2].mean().expand(8, 8))
    grey = make_baseline(images, torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1))
    assert grey.shape == images.shape and grey[2, 1, 7, 7] == 0.25
    dele = deletion_curve(model, images, saliency, targets, baseline="mean", **kwargs)
    p_mean = torch.softmax(model(mean), dim=1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(dele.scores[:, -1], p_mean)
    # the blur kernel shrinks on images too small for reflect padding; a constant image stays constant
    tiny = torch.full((1, 3, 3, 3), 0.3)
    torch.testing.assert_close(make_baseline(tiny, "blur"), tiny)


# ---------------------------------------------------------------- degradation (MoRF / LeRF)


def degradation_setup(tile_weights: list[float]) -> tuple[nn.Module, Tensor, Tensor]:
    """4 x 4 image of four constant 2 x 2 tiles (values 1, 0.5, 0.25, 0, row-major) and a model with
    weight w_t / 4 per pixel of tile t, so the logit is sum_t w_t * v_t and the tile mean is 0.4375."""
    tile_values = torch.tensor([[1.0, 0.5], [0.25, 0.0]])
    weights = torch.tensor(tile_weights).view(2, 2) / 4
    up = torch.ones(2, 2)
    # channels 1 and 2 are ignored by the model but make the per-channel mean differ from the global one
    image = torch.stack([torch.kron(tile_values, up), torch.full((4, 4), 0.9), torch.full((4, 4), 0.1)])[None]
    model = PixelLinear(torch.kron(weights, up))
    # tile mean saliency 0.2, 0.8, 0.5, 0.1 (MoRF 1, 2, 0, 3; LeRF 3, 0, 2, 1), but tile maxima would
    # order 1 (1.6), 3 (0.9), 2 (0.5), 0 (0.2): only the mean gives the orders checked below
    sal = torch.tensor(
        [
            [0.2, 0.2, 1.6, 0.0],
            [0.2, 0.2, 0.8, 0.8],
            [0.5, 0.5, 0.9, 0.0],
            [0.5, 0.5, 0.0, -0.5],
        ]
    )[None]
    return model, image, sal


def test_degradation_morf_lerf_by_hand():
    model, image, sal = degradation_setup([1.0, 2.0, -1.0, 0.5])
    # logits: clean 1*1 + 2*0.5 - 0.25 + 0 = 1.75; all tiles at 0.4375: 0.4375 * 2.5 = 1.09375
    morf_logits = [1.75, 1.625, 1.4375, 0.875, 1.09375]
    lerf_logits = [1.75, 1.96875, 1.40625, 1.21875, 1.09375]
    raw = degradation_test(model, image, sal, 0, tile=2, normalize=False)
    xs = [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(raw.fractions, torch.tensor(xs))
    torch.testing.assert_close(raw.morf, sigmoid(morf_logits)[None])
    torch.testing.assert_close(raw.lerf, sigmoid(lerf_logits)[None])

    curves = degradation_test(model, image, sal, torch.tensor([0]), tile=2)
    s = sigmoid(morf_logits)
    s0, s_end = s[0], s[-1]
    morf = (sigmoid(morf_logits) - s_end) / (s0 - s_end)
    lerf = (sigmoid(lerf_logits) - s_end) / (s0 - s_end)
    torch.testing.assert_close(curves.morf, morf[None])
    torch.testing.assert_close(curves.lerf, lerf[None])
    assert curves.morf[0, 0] == pytest.approx(1.0) and curves.lerf[0, -1] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(curves.morf_auc, torch.tensor([trapezoid(morf, xs)]))
    torch.testing.assert_close(curves.lerf_auc, torch.tensor([trapezoid(lerf, xs)]))
    # score: the raw area between the curves; normalised_score: IBA's, the normalised curves' area
    torch.testing.assert_close(curves.normalised_score, curves.lerf_auc - curves.morf_auc)
    raw_area = trapezoid(sigmoid(lerf_logits), xs) - trapezoid(sigmoid(morf_logits), xs)
    torch.testing.assert_close(curves.score, torch.tensor([raw_area]))
    assert not curves.degenerate.any() and curves.excluded == 0

    # 3 points -> 0, 2 and 4 tiles replaced
    sparse = degradation_test(model, image, sal, 0, tile=2, points=3)
    torch.testing.assert_close(sparse.fractions, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(sparse.morf, curves.morf[:, [0, 2, 4]])


def test_degradation_score_stays_bounded_on_a_near_constant_image():
    # clean logit 4 - 16 * 0.25 = 0; fully degraded (4 - 16 + 12.03) * 0.4375 = 0.013: the clean and degraded
    # scores differ by 0.003, yet replacing single tiles swings the logit by 2 to 5 on the way
    model, planted, sal = degradation_setup([4.0, 0.0, -16.0, 12.03])
    normal = planted.clone()  # the same model on an ordinary image: only tile 0 bright (span 0.48)
    normal[:, 0] = torch.kron(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 2))
    images = torch.cat([planted, normal])
    curves = degradation_test(model, images, sal.expand(2, 4, 4), 0, tile=2)
    raw = degradation_test(model, images, sal.expand(2, 4, 4), 0, tile=2, normalize=False)
    span = float(raw.morf[0, 0] - raw.morf[0, -1])
    assert 0.002 < abs(span) < 0.004
    assert not curves.degenerate[0]  # the old eps rule (1e-3) lets it through ...
    assert abs(float(raw.score[0]) / span) > 10  # ... and IBA's normalised area of this one image explodes
    assert curves.score.abs().max() <= 1.0 and abs(float(curves.score.mean())) <= 1.0
    torch.testing.assert_close(curves.score, raw.score)  # the score does not depend on `normalize`
    assert torch.isnan(curves.normalised_score[0]) and torch.isfinite(curves.normalised_score[1])
    assert curves.excluded == 1
    with pytest.raises(ValueError, match="min_span"):
        degradation_test(model, images, sal.expand(2, 4, 4), 0, tile=2, min_span=-1)


def test_degradation_degenerate_and_ragged_tiles():
    # uniform weights: replacing every tile by the image mean keeps the logit, s_0 == s_end
    model, image, sal = degradation_setup([1.0, 1.0, 1.0, 1.0])
    curves = degradation_test(model, image, sal, 0, tile=2)
    assert curves.degenerate.all() and torch.isfinite(curves.morf).all()
    # logits 1.75 -> 1.6875 (tile 1) -> 1.875 (tile 2) -> 1.3125 (tile 0) -> 1.75
    s = sigmoid([1.75, 1.6875, 1.875, 1.3125, 1.75])
    torch.testing.assert_close(curves.morf, (s - s[-1])[None])
    # 5 x 5 with 2 px tiles: a 3 x 3 grid whose last row / column are 1 px wide
    ragged = PixelLinear(torch.ones(5, 5) / 25)
    curves = degradation_test(ragged, torch.rand(2, 3, 5, 5), torch.rand(2, 5, 5), 0, tile=2, normalize=False)
    assert curves.morf.shape == (2, 10) and curves.fractions[-1] == 1.0


def test_scaled_tile():
    assert [scaled_tile(8, 224), scaled_tile(14, 224), scaled_tile(8, 32), scaled_tile(14, 32)] == [8, 14, 1, 2]
    assert scaled_tile(8, 42) == 2  # 1.5 rounds half up
    assert scaled_tile(1, 16) == 1


# ---------------------------------------------------------------- localisation


def test_bbox_score_and_pointing_game():
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True  # n = 4 box pixels
    sal = torch.zeros(4, 4, 4)
    sal[0, 0, 0], sal[0, 0, 1], sal[0, 1, 1], sal[0, 3, 3] = 5, 4, 3, 2  # top-4: 3 inside
    sal[0, 2, 2] = 1
    sal[1, 3, 3], sal[1, 0, 0] = 9, 8  # peak outside, the others tie at 0
    mask[2] = False  # empty mask
    sal[2, 1, 1] = 1
    sal[3] = 1.0  # all ties: the first 4 pixels in row-major order are row 0, 2 of them inside
    score = bbox_score(sal, mask)
    # sample 1: top-4 = (3,3), (0,0), then ties by index (0,1), (0,2) -> 2 inside
    torch.testing.assert_close(score[[0, 1, 3]], torch.tensor([0.75, 0.5, 0.5]))
    assert torch.isnan(score[2])
    assert pointing_game(sal, mask).tolist() == [True, False, False, True]
    # B x 1 x H x W inputs and a low-resolution map (resized bilinearly to the mask)
    low = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert pointing_game(low, mask[:1, None]).tolist() == [True]
    assert bbox_score(low, mask[:1, None]).item() == 1.0


# ---------------------------------------------------------------- MIS


def planted_activations(n: int = 300, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    acts = (labels[:, None] == np.arange(classes)[None]).astype(float) + 0.05 * rng.standard_normal((n, classes))
    return acts, labels


def test_mis_planted_filters_vs_shuffled_labels():
    acts, labels = planted_activations()
    matrix = mutual_information_matrix(acts, labels)
    assert matrix.shape == (3, 3)
    assert (matrix.argmax(axis=1) == np.arange(3)).all()
    # filter i vs its own class: ~H(1/3) = 0.6365 nats; vs another class: I([y=i]; [y=j]) = 0.174 nats
    entropy = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert np.diag(matrix) == pytest.approx([entropy] * 3, abs=0.06)
    score = mis(torch.as_tensor(acts), torch.as_tensor(labels))
    assert score == pytest.approx(np.diag(matrix).mean())
    shuffled = np.random.default_rng(1).permutation(labels)
    assert score > 0.5 and mis(acts, shuffled) < 0.1
    # definition: one sklearn call per class over all filters, same random_state
    direct = mutual_info_classif(acts, labels == 2, discrete_features=False, n_neighbors=3, random_state=0)
    np.testing.assert_allclose(matrix[:, 2], direct)
    # an absent class gets a zero column
    wide = mutual_information_matrix(acts, labels, num_classes=4)
    assert wide.shape == (3, 4) and (wide[:, 3] == 0).all()
    np.testing.assert_allclose(wide[:, :3], matrix)


def test_pooled_activations_pools_before_inplace_ops():
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[1, 1] = -1.0
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).train()
    images = torch.rand(5, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    expected_mean = torch.stack([images[:, 0].mean((1, 2)), -images[:, 1].mean((1, 2))], dim=1)
    torch.testing.assert_close(pooled_activations(model, conv, images, batch_size=2), expected_mean)
    summed = pooled_activations(model, conv, images, pool="sum")
    torch.testing.assert_close(summed, 4 * expected_mean)
    maxed = pooled_activations(model, conv, images, pool="max")
    torch.testing.assert_close(maxed[:, 1], -images[:, 1].amin((1, 2)))
    loader = [(images[:3], labels[:3]), (images[3:], labels[3:])]
    acts, got_labels = pooled_activations(model, conv, loader, return_labels=True)
    torch.testing.assert_close(acts, expected_mean)
    assert got_labels.tolist() == labels.tolist()
    first = pooled_activations(model, conv, loader, max_batches=1)
    assert first.shape == (3, 2)
    assert model.training and not conv._forward_hooks


# ---------------------------------------------------------------- SmoothGrad


class Quadratic(nn.Module):
    """Logits [sum a * x0^2 + sum b * x1, 0]: d/dx0 = 2 a x0, d/dx1 = b, d/dx2 = 0."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, x: Tensor) -> Tensor:
        logit = (self.a * x[:, 0] ** 2 + self.b * x[:, 1]).sum(dim=(1, 2))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def folded_normal_mean(mu: Tensor, sigma: float) -> Tensor:
    """E|N(mu, sigma^2)|."""
    z = mu / sigma
    phi = torch.special.ndtr(-z)
    return sigma * math.sqrt(2 / math.pi) * torch.exp(-(z**2) / 2) + mu * (1 - 2 * phi)


def test_smooth_grad_closed_form_and_captum():
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    b = torch.tensor([[0.3, -0.1], [0.0, 0.2]])
    model = Quadratic(a, b)
    x = torch.tensor([[[0.0, 1.0], [0.2, 0.6]], [[0.5, 0.5], [0.5, 0.5]], [[0.1, 0.9], [0.4, 0.4]]])[None]
    # range of x is 1, so sigma = noise
    sigma = 0.15
    expected = 2 * a.abs() * folded_normal_mean(x[0, 0], sigma) + b.abs()
    gen = torch.Generator().manual_seed(0)
    ours = smooth_grad(model, x, 0, samples=4000, noise=sigma, batch_size=4000, generator=gen)
    torch.testing.assert_close(ours[0], expected, atol=0.02, rtol=0.03)
    # reproducible with the same generator seed
    again = smooth_grad(model, x, 0, samples=4000, noise=sigma, batch_size=1000, generator=gen.manual_seed(0))
    torch.testing.assert_close(ours, again)
    # a linear model has a noise-free gradient: exactly |b| on channel 1
    linear = Quadratic(torch.zeros(2, 2), b)
    torch.testing.assert_close(smooth_grad(linear, x, 0, samples=3)[0], b.abs())

    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(model))
    reference = nt.attribute(x, nt_type="smoothgrad", nt_samples=4000, stdevs=sigma, target=0).sum(dim=1)
    torch.testing.assert_close(ours, reference, atol=0.03, rtol=0.04)
    nt_linear = captum_attr.NoiseTunnel(captum_attr.Saliency(linear))
    reference_linear = nt_linear.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=sigma, target=0)
    torch.testing.assert_close(reference_linear.sum(dim=1)[0], b.abs())
