"""The studies' measurements on planted inputs: where the selector's kernels sit (``centre_statistics``, as
``selector_report`` reports it)."""

import pytest
import torch

import isp.studies
from common.backbones import build_backbone
from isp.selector import SelectorDecoder, decoder_shape
from isp.studies import centre_statistics, selector_report


def test_a_centre_planted_six_pixels_off_is_six_pixels_off():
    one = centre_statistics(torch.tensor([[22.0, 16.0, 4.0]]), 32, 32)
    assert one["centre_offset_mean"] == pytest.approx(6.0)
    assert (one["centre_offset_z_mean"], one["centre_offset_t_mean"]) == pytest.approx((6.0, 0.0))
    # Euclidean per image, signed per axis: (+6, 0) and (0, -6) are 6 px off each, their signed means +3 and -3
    two = centre_statistics(torch.tensor([[22.0, 16.0, 4.0], [16.0, 10.0, 4.0]]), 32, 32)
    assert two["centre_offset_mean"] == pytest.approx(6.0)
    assert (two["centre_offset_z_mean"], two["centre_offset_t_mean"]) == pytest.approx((3.0, -3.0))
    diagonal = centre_statistics(torch.tensor([[19.0, 20.0, 4.0]]), 32, 32)  # (3, 4) off: 5 px
    assert diagonal["centre_offset_mean"] == pytest.approx(5.0)


def test_a_kernel_off_the_frame_has_more_of_its_mass_outside():
    def outside(c_z: float, c_t: float, sigma: float = 4.0) -> float:
        return centre_statistics(torch.tensor([[c_z, c_t, sigma]]), 32, 32)["kernel_mass_outside_frame_mean"]

    assert outside(16, 16) < 1e-3
    assert outside(16, 16) < outside(16, 4) < outside(0, 16) < outside(0, 0) < outside(-8, 16) <= 1.0
    assert outside(0, 16) == pytest.approx(0.5, abs=0.01)
    assert outside(16, 16, sigma=16.0) > 0.3  # a wide centred kernel hangs out of a 32 px frame too


def test_selector_report_adds_the_centre_statistics_for_rbf_only(monkeypatch):
    torch.manual_seed(0)
    classifier = build_backbone("resnet20").eval()
    images = torch.rand(4, 3, 32, 32)
    planted = torch.tensor([[22.0, 16.0, 4.0], [16.0, 10.0, 4.0], [22.0, 16.0, 4.0], [16.0, 10.0, 4.0]])
    keys = ("centre_offset_mean", "centre_offset_z_mean", "centre_offset_t_mean", "kernel_mass_outside_frame_mean",
            "centre_sd_z", "sigma_mean")
    for kind in ("rbf", "realx"):
        decoder = SelectorDecoder(decoder_shape(classifier, (32, 32), 10), kind).eval()
        codes = planted if kind == "rbf" else torch.randn(4, 32, 32)
        monkeypatch.setattr(isp.studies, "selector_codes",
                            lambda *_a, codes=codes, **_k: (codes, torch.zeros(4, dtype=torch.long)))
        out = selector_report(classifier, decoder, images)
        if kind == "rbf":
            assert out["centre_offset_mean"] == pytest.approx(6.0)
            assert (out["centre_offset_z_mean"], out["centre_offset_t_mean"]) == pytest.approx((3.0, -3.0))
            expected = centre_statistics(planted, 32, 32)
            assert {k: out[k] for k in expected} == pytest.approx(expected)
        else:
            assert not set(keys) & set(out)
