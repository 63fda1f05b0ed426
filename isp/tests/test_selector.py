"""The selector's U-Net decoder: feature filter, upsampling blocks, RBF and REAL-X heads."""

import pytest
import torch

from common.backbones import build_backbone
from isp.selector import FeatureFilter, Selector, SelectorDecoder, decoder_shape, forward_with_stages


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_backbone("resnet20").eval()


def test_forward_with_stages_returns_the_three_encoder_scales(resnet20):
    logits, stages = forward_with_stages(resnet20, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [tuple(s.shape[1:]) for s in stages] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_decoder_follows_the_supplementary_layout(resnet20):
    shape = decoder_shape(resnet20, (32, 32), 10)
    decoder = SelectorDecoder(shape, "rbf")
    assert decoder.feature_filter.embedding.weight.shape == (10, 64)  # 10 x 64 class embedding for ResNets
    blocks = [(b.upsample[0].in_channels, b.upsample[0].out_channels // 4,
               b.bottlenecks[0].body[0].in_channels - b.upsample[0].out_channels // 4) for b in decoder.up_blocks]
    assert blocks == [(64, 32, 32), (32, 16, 16)]  # (input, output, pass-through) = (64,32,32), (32,16,16)
    assert all(len(b.bottlenecks) == 3 for b in decoder.up_blocks)
    assert decoder.head.conv.kernel_size == (32, 32) and decoder.head.conv.out_channels == 3
    assert decoder.head.conv.bias[2].item() == pytest.approx(10.0)  # sigma bias initialisation


def test_rbf_selector_outputs_centres_in_frame_and_initial_sigma_near_ten(resnet20):
    decoder = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "rbf").eval()
    selector = Selector(resnet20, decoder)
    x = torch.rand(4, 3, 32, 32)
    _, code = selector(x)
    assert code.shape == (4, 3)
    assert torch.all(code[:, :2] >= 2) and torch.all(code[:, :2] <= 30)
    assert torch.all((code[:, 2] - 10).abs() < 5)  # softplus(10 + small conv output)
    saliency = selector.saliency(x, torch.tensor([0, 1, 2, 3]))
    assert saliency.shape == (4, 32, 32) and saliency.min() >= 0 and saliency.max() <= 1
    # the encoder is not part of the selector's state: only the decoder is saved and trained
    assert all(k.startswith("decoder.") for k in selector.state_dict())


def test_realx_selector_predicts_an_independent_map(resnet20):
    decoder = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "realx").eval()
    _, code = Selector(resnet20, decoder)(torch.rand(2, 3, 32, 32))
    assert code.shape == (2, 32, 32)
    probs = decoder.probabilities(code)
    assert probs.shape == (2, 32, 32) and torch.all((probs > 0) & (probs < 1))


def test_feature_filter_is_eq13():
    ff = FeatureFilter(3, 4)
    x = torch.randn(2, 4, 5, 5)
    y = torch.tensor([2, 0])
    out = ff(x, y)
    c = ff.embedding.weight
    for b in range(2):
        for i, j in [(0, 0), (3, 1)]:
            expected = x[b, :, i, j] * torch.sigmoid(x[b, :, i, j] @ c[y[b]])
            assert torch.allclose(out[b, :, i, j], expected, atol=1e-6)


def test_decoder_for_mobilenetv2_matches_the_paper_channels():
    shape = decoder_shape(build_backbone("mobilenetv2"), (32, 32), 10)
    assert shape.stage_channels == [32, 96, 1280]
    decoder = SelectorDecoder(shape, "rbf")
    assert decoder.feature_filter.embedding.weight.shape == (10, 1280)
    assert [b.upsample[0].in_channels for b in decoder.up_blocks] == [1280, 96]


def test_unknown_selector_kind_is_a_clear_error(resnet20):
    with pytest.raises(ValueError, match="unknown selector kind"):
        SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "lime")


def test_interpretation_code_units(resnet20):
    from isp.losses import comparable_code

    decoder = SelectorDecoder(decoder_shape(resnet20, (32, 32), 10), "rbf")
    code = torch.tensor([[16.0, 8.0, 32.0]])
    assert comparable_code(code, decoder, "image").tolist() == [[0.5, 0.25, 1.0]]
    assert torch.equal(comparable_code(code, decoder, "pixels"), code)
    with pytest.raises(ValueError, match="interpretation_units"):
        comparable_code(code, decoder, "inches")
