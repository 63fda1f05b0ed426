"""DRIB's attribution metrics (they live in common.explain) against values computed by hand on 2 x 2 images."""

import torch
from torch import nn

from common.explain import bbox_score, degradation_test, deletion_curve, insertion_curve, scaled_tile

WEIGHTS = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


class PixelSum(nn.Module):
    """logit_0 = sum_ij W_ij x[0, i, j], logit_1 = 0: p(class 0) = sigmoid(logit_0)."""

    def forward(self, x):
        s = (x[:, 0] * WEIGHTS).sum(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


IMAGE = torch.tensor([[[0.5, -0.25], [1.0, 0.25]]]).expand(3, 2, 2)[None].clone()  # channel 0 matters
SALIENCY = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])  # order: (0,1), (1,0), (1,1), (0,0)
CONTRIB = {(0, 0): 0.5, (0, 1): -0.5, (1, 0): 3.0, (1, 1): 1.0}  # W * x per pixel; total 4.0
ORDER = [(0, 1), (1, 0), (1, 1), (0, 0)]


def _trapezoid(ys, xs):
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def test_deletion_and_insertion_match_hand_values():
    model = PixelSum()
    total, kept, removed = 4.0, [], []
    remaining, inserted = total, 0.0
    kept.append(torch.sigmoid(torch.tensor(remaining)))
    removed.append(torch.sigmoid(torch.tensor(inserted)))
    for pixel in ORDER:
        remaining -= CONTRIB[pixel]
        inserted += CONTRIB[pixel]
        kept.append(torch.sigmoid(torch.tensor(remaining)))
        removed.append(torch.sigmoid(torch.tensor(inserted)))
    fractions = [0, 0.25, 0.5, 0.75, 1.0]
    deletion = deletion_curve(model, IMAGE, SALIENCY, 0, steps=4, step_fraction=0.25, baseline="zero")
    insertion = insertion_curve(model, IMAGE, SALIENCY, 0, steps=4, step_fraction=0.25, baseline="zero")
    assert torch.allclose(deletion.scores[0], torch.stack(kept), atol=1e-6)
    assert torch.allclose(insertion.scores[0], torch.stack(removed), atol=1e-6)
    assert abs(float(deletion.auc[0]) - float(_trapezoid(kept, fractions))) < 1e-6
    assert abs(float(insertion.auc[0]) - float(_trapezoid(removed, fractions))) < 1e-6


def test_degradation_test_matches_hand_values():
    model = PixelSum()
    mean = IMAGE[0, 0].mean()  # replaced pixels take the image's channel mean (0.375)
    def score(replaced):
        s = sum(WEIGHTS[p] * (mean if p in replaced else IMAGE[0, 0][p]) for p in CONTRIB)
        return torch.sigmoid(torch.as_tensor(s))
    morf = [score(set(ORDER[:k])) for k in range(5)]
    lerf = [score(set(ORDER[::-1][:k])) for k in range(5)]
    curves = degradation_test(model, IMAGE, SALIENCY, 0, tile=1, normalize=False)
    assert torch.allclose(curves.morf[0], torch.stack(morf), atol=1e-6)
    assert torch.allclose(curves.lerf[0], torch.stack(lerf), atol=1e-6)
    fractions = [0, 0.25, 0.5, 0.75, 1.0]
    assert abs(float(curves.score[0]) - float(_trapezoid(lerf, fractions) - _trapezoid(morf, fractions))) < 1e-6


def test_degradation_tiles_scale_with_the_input():
    assert scaled_tile(8, 224) == 8 and scaled_tile(14, 224) == 14
    assert (scaled_tile(8, 32), scaled_tile(14, 32)) == (1, 2)


def test_bbox_score_matches_hand_value():
    saliency = torch.tensor([[[0.9, 0.8, 0.0, 0.0], [0.7, 0.1, 0.0, 0.0], [0.0, 0.0, 0.6, 0.0], [0, 0, 0, 0]]])
    box = torch.zeros(1, 4, 4, dtype=torch.bool)
    box[0, :2, :2] = True  # n = 4 pixels; top-4 saliency = 0.9, 0.8, 0.7 (inside) and 0.6 (outside)
    assert float(bbox_score(saliency, box)[0]) == 0.75
