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


def _row(gamma1: float, gamma2: float = 80.0, term: float = 10.0, finetuned: bool = False) -> dict:
    """A run_summary row as compare prints it (keep popped)."""
    row = {"gamma1": gamma1, "gamma2": gamma2, "interpretation_units": "pixels", "gate_objective": "eq10",
           "seed": 0, "interpretation_term_subset": term, "interpretation_term_images": 1.5 * term,
           "top1_before_finetune": 60.0 + gamma1, "gradcam_drift_before_finetune": {"spearman": 0.5,
                                                                                  "top_overlap": 0.4},
           "selector_drift_before_finetune": {"spearman": 0.8, "top_overlap": 0.7, "code_l2_px": 2.0}}
    if finetuned:
        row |= {"top1_after_finetune": 88.0, "gradcam_drift_after_finetune": {"spearman": 0.6, "top_overlap": 0.5},
                "selector_drift_after_finetune": {"spearman": 0.9, "top_overlap": 0.8, "code_l2_px": 1.0}}
    return row


def test_sweep_figure_draws_three_runs_into_a_png(tmp_path):
    from isp.figures import sweep_figure

    rows = {"g0": _row(0.0, term=40.0), "g05": _row(0.5, term=5.0, finetuned=True),
            "g05-gamma2-400": _row(0.5, gamma2=400.0, term=3.0)}
    unsteered = {f"u{seed}": _row(0.0, term=30.0 + seed) for seed in range(3)}
    path = sweep_figure(rows, unsteered, tmp_path / "sweep.png")
    assert path == tmp_path / "sweep.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000 and [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temporary
    assert sweep_figure(rows, None, tmp_path / "plain.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="must end in one of"):
        sweep_figure(rows, None, tmp_path / "sweep.json")


def test_compare_figure_writes_the_figure_and_its_json(monkeypatch, tmp_path, capsys):
    import json

    import common.speed
    from isp.__main__ import build_parser

    args = build_parser().parse_args(["compare", "--run", "a=runs/a", "--run", "b=runs/b", "--figure",
                                      str(tmp_path / "out" / "sweep.png")])
    assert args.figure == str(tmp_path / "out" / "sweep.png")

    class Fake:
        data = type("data", (), {"test": None, "val": None})
        device = "cpu"

    summaries = {"a": _row(0.0, term=40.0) | {"keep": {"s": [0]}}, "b": _row(5.0, term=2.0) | {"keep": {"s": [1]}}}
    monkeypatch.setattr(isp.studies, "reopen_pipeline", lambda path, *_a, **_k: Fake())
    monkeypatch.setattr(common.speed, "class_mixed_images", lambda *_a, **_k: torch.zeros(1, 3, 32, 32))
    rows = iter(summaries.values())
    monkeypatch.setattr(isp.studies, "run_summary", lambda *_a, **_k: dict(next(rows)))
    isp.studies.compare_command(args)
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert written == printed and set(written["runs"]) == {"a", "b"} and "keep" not in written["runs"]["a"]
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--figure must end in"):
        isp.studies.compare_command(build_parser().parse_args(["compare", "--run", "x", "--figure", "f.json"]))
