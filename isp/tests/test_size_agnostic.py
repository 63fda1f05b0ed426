"""The selector explains images of another size than it was built for (a 64 x 64 GridPG mosaic), and gives
the same output as before at the size it was built for (the README's size-agnostic deviation)."""

import pytest
import torch

from common.backbones import build_backbone
from isp.rbf import centre_nonlinearity, rbf_bernoulli, sigma_nonlinearity
from isp.selector import RBFHead, Selector, SelectorDecoder, decoder_shape


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_backbone("resnet20").eval()


def _head_as_built(head: RBFHead, x: torch.Tensor) -> torch.Tensor:
    """The head's computation as written for its own size: whole-map conv, tanh centres, softplus sigma."""
    u = head.conv(x).flatten(1).float()
    h, w = head.image_size
    return torch.stack([centre_nonlinearity(u[:, 0], h, head.centre_margin),
                        centre_nonlinearity(u[:, 1], w, head.centre_margin), sigma_nonlinearity(u[:, 2])], 1)


def test_rbf_selector_is_unchanged_at_32_and_runs_on_a_64_mosaic(resnet20):
    torch.manual_seed(1)
    decoder = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "rbf").eval()
    selector = Selector(resnet20, decoder)
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 4, 9])
    features = torch.rand(3, 16, 32, 32)
    torch.testing.assert_close(decoder.head(features), _head_as_built(decoder.head, features), rtol=0, atol=0)
    _, code = selector(x, y)
    torch.testing.assert_close(selector.saliency(x, y), rbf_bernoulli(code, 32, 32), rtol=0, atol=0)

    mosaic = torch.rand(2, 3, 64, 64)
    maps = selector.saliency(mosaic, torch.tensor([1, 2]))
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    _, big = selector(mosaic, torch.tensor([1, 2]))
    assert torch.all(big[:, :2] >= 4) and torch.all(big[:, :2] <= 60)  # the 32 px frame's margin, scaled


def test_rbf_head_scales_its_parameters_with_the_map(resnet20):
    head = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "rbf").eval().head
    small = torch.rand(2, 16, 32, 32)
    doubled = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # the same map at twice the size
    torch.testing.assert_close(head(doubled), head(small) * 2, rtol=1e-5, atol=1e-5)


def test_realx_selector_maps_follow_the_image_size(resnet20):
    decoder = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "realx").eval()
    selector = Selector(resnet20, decoder)
    x = torch.rand(2, 3, 32, 32)
    _, code = selector(x, torch.tensor([0, 1]))
    torch.testing.assert_close(selector.saliency(x, torch.tensor([0, 1])), torch.sigmoid(code), rtol=0, atol=0)
    assert selector.saliency(torch.rand(2, 3, 64, 64), torch.tensor([0, 1])).shape == (2, 64, 64)
