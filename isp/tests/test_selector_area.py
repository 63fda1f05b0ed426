"""``selector_area = "plane"`` (not the paper, a control): R(m') of Eq. 9 plus the RBF kernel's mass outside the
frame, so moving a kernel out of the image saves no area, while the paper's R over the frame ("frame") falls."""

import pytest
import torch

import isp.train
from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.run import RunDir
from isp.config import IspSettings
from isp.losses import outside_area_penalty, selector_loss
from isp.rbf import rbf_bernoulli
from isp.selector import SelectorDecoder, decoder_shape, forward_with_stages
from isp.train import check_selector_area, outside_area, selector_validation, train_selector

SIZE = 32


def _area(c_z: float, plane: bool, sigma: float = 6.0, repeats: int = 256) -> float:
    """The ``area`` part of selector_loss for one kernel, averaged over ``repeats`` relaxed masks with fixed noise."""
    code = torch.tensor([[c_z, SIZE / 2, sigma]]).expand(repeats, 3)
    probs = rbf_bernoulli(code, SIZE, SIZE)
    predictor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 4))
    parts = selector_loss(torch.zeros(repeats, 4), predictor, torch.rand(repeats, 3, SIZE, SIZE), probs,
                          lambda1=1.0, lambda2=0.0, tau=0.1, generator=torch.Generator().manual_seed(0),
                          outside_area=outside_area_penalty(code, SIZE, SIZE) if plane else None)
    return float(parts.area)


@pytest.mark.parametrize("c_z", [6.0, 2.0, 0.0, -4.0])  # towards the top edge, on it, over it
def test_plane_area_does_not_fall_as_the_kernel_leaves_the_frame_while_frame_area_does(c_z):
    centred_plane, centred_frame = _area(SIZE / 2, True), _area(SIZE / 2, False)
    assert _area(c_z, True) >= 0.98 * centred_plane
    assert _area(c_z, False) < 0.9 * centred_frame


def test_plane_term_has_no_pull_on_a_kernel_well_inside_and_pushes_one_at_the_edge_back_in():
    inside = torch.tensor([[16.0, 15.0, 3.0]], requires_grad=True)
    outside_area_penalty(inside, SIZE, SIZE).sum().backward()
    assert inside.grad[0, :2].abs().max() < 1e-6
    edge = torch.tensor([[3.0, 16.0, 3.0]], requires_grad=True)
    outside_area_penalty(edge, SIZE, SIZE).sum().backward()
    assert edge.grad[0, 0] < -1e-3 and abs(float(edge.grad[0, 1])) < 1e-6  # lower c_z: more mass outside


def test_plane_needs_an_rbf_selector_and_unknown_areas_are_refused():
    IspSettings.from_dict({"selector_area": "plane"})
    with pytest.raises(ValueError, match="selector_area must be"):
        IspSettings.from_dict({"selector_area": "disk"})
    with pytest.raises(ValueError, match="needs an RBF kernel"):
        IspSettings.from_dict({"selector": "realx", "selector_area": "plane"})
    classifier = build_backbone("resnet20").eval()
    realx = SelectorDecoder(decoder_shape(classifier, (SIZE, SIZE), 10), "realx")
    assert outside_area("frame", realx, torch.zeros(1, SIZE, SIZE), torch.zeros(1, SIZE, SIZE)) is None
    check_selector_area("frame", realx)
    with pytest.raises(ValueError, match="needs an RBF decoder"):  # what every selector stage checks first
        check_selector_area("plane", realx)
    with pytest.raises(ValueError, match="selector_area must be"):
        check_selector_area("disk", realx)


def test_validation_objective_with_plane_is_frame_plus_lambda1_times_the_outside_mass():
    torch.manual_seed(0)
    classifier, predictor = build_backbone("resnet20").eval(), build_backbone("resnet20").eval()
    decoder = SelectorDecoder(decoder_shape(classifier, (SIZE, SIZE), 10), "rbf")  # sigma starts near 10 px
    images = torch.rand(6, 3, SIZE, SIZE)
    kwargs = dict(lambda1=0.7, lambda2=0.1, tau=0.1, batch_size=4)
    frame = selector_validation(classifier, predictor, decoder, images, **kwargs)
    plane = selector_validation(classifier, predictor, decoder, images, selector_area="plane", **kwargs)
    with torch.no_grad():
        logits, stages = forward_with_stages(classifier, images)
        code = decoder.eval().code(stages, logits.argmax(1))
    # same mask noise, same KL: the objectives differ by lambda1 x the mean outside mass (batches weighted)
    outside = outside_area_penalty(code, SIZE, SIZE)
    assert float(outside.mean()) > 0.05
    assert plane["loss"] - frame["loss"] == pytest.approx(0.7 * float(outside.mean()), rel=1e-3)
    assert plane["kept"] == frame["kept"]


def test_train_selector_charges_the_outside_mass_only_with_plane(monkeypatch, tmp_path):
    torch.manual_seed(0)
    data = load_dataset("digits")
    classifier, predictor = build_backbone("resnet20", data.num_classes).eval(), build_backbone("resnet20", 10)
    loader = BatchLoader(data.train, 4, train=True, seed=0)
    seen = []
    original = isp.train.selector_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["outside_area"])
        return original(*args, **kwargs)

    monkeypatch.setattr(isp.train, "selector_loss", spy)
    for area in ("frame", "plane"):
        decoder = SelectorDecoder(decoder_shape(classifier, data.image_size, data.num_classes), "rbf")
        train_selector(RunDir(tmp_path / area), classifier, predictor, decoder, loader, 1, lr=1e-3,
                       weight_decay=0.0, lambda1=1.0, lambda2=0.1, tau=0.1, seconds=None, log=None,
                       selector_area=area)
    assert seen[0] is None
    assert seen[1].shape == (4,) and bool((seen[1] > 0).all())  # sigma ~10 px hangs out of the digits' frame
