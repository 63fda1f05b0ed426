"""Per-sample IBA on inputs of another size than its statistics were estimated at (a 2 x 2 mosaic), and the
same result as before at the estimated size (the README's size-agnostic deviation)."""

import torch
from torch import nn

from drib.bottleneck import FeatureStats, attribute, estimate_statistics, fit_statistics
from drib.config import BottleneckSettings


class BrightnessModel(nn.Module):
    """Class 1 iff the image is bright on average: evidence anywhere, read through a global average."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.features.weight.fill_(1 / 3)
            self.features.bias.zero_()

    def forward(self, x):
        evidence = self.features(x).mean(dim=(1, 2, 3)) - 0.3
        return torch.stack([-10 * evidence, 10 * evidence], dim=1)


def test_statistics_are_kept_at_their_own_shape_and_resized_otherwise():
    g = torch.Generator().manual_seed(0)
    stats = FeatureStats(torch.rand(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g) + 0.1,
                         (torch.rand(4, 8, 8, generator=g) > 0.3).float())
    same = fit_statistics(stats, (4, 8, 8))
    assert same.mean is stats.mean and same.std is stats.std and same.active is stats.active
    big = fit_statistics(stats, (4, 16, 16))
    assert big.mean.shape == (4, 16, 16) and set(big.active.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(big.active[:, ::2, ::2], stats.active)  # nearest neighbour, position for position
    flat = fit_statistics(FeatureStats(torch.full((4, 8, 8), 0.5), torch.ones(4, 8, 8), torch.ones(4, 8, 8)),
                          (4, 16, 16))
    torch.testing.assert_close(flat.mean, torch.full((4, 16, 16), 0.5))


def test_iba_at_the_estimated_size_is_unchanged_and_a_mosaic_points_at_its_bright_cell():
    torch.manual_seed(0)
    model = BrightnessModel()
    train = torch.rand(300, 3, 16, 16) * torch.rand(300, 1, 1, 1)  # bright and dark images
    stats = estimate_statistics(model, model.features, [(train, None)], samples=300)
    config = BottleneckSettings()
    image = 0.9 * torch.ones(3, 16, 16)

    def run(x):
        return attribute(model, model.features, x, 1, stats, config, generator=torch.Generator().manual_seed(0))

    # At the estimated size the statistics are used as they are: the same bits as the estimator's own shape.
    direct = attribute(model, model.features, image, 1, fit_statistics(stats, (4, 16, 16)), config,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(image).heatmap, direct.heatmap, rtol=0, atol=0)

    mosaic = 0.05 * torch.ones(3, 32, 32)
    mosaic[:, 16:, :16] = 0.95  # the bottom-left cell carries the evidence
    heat = run(mosaic).heatmap
    assert heat.shape == (32, 32) and torch.isfinite(heat).all()
    assert float(heat[16:, :16].sum() / heat.sum()) > 0.5  # chance: 0.25
