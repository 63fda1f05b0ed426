"""Side-by-side timing and the class-mixed image sampler (behaviour only, never wall-clock figures)."""

import pytest
import torch

from common.data import ImageTensors
from common.speed import class_mixed_images, class_mixed_indices, format_table, time_side_by_side


def _sorted_split(per_class: int = 6, classes: int = 5) -> ImageTensors:
    labels = torch.arange(classes).repeat_interleave(per_class)  # sorted by class, like an image folder
    images = torch.randint(0, 256, (len(labels), 3, 4, 4), dtype=torch.uint8)
    return ImageTensors(images, labels)


def test_every_prefix_of_the_sample_mixes_all_classes():
    split = _sorted_split()
    idx = class_mixed_indices(split, 20, seed=0)
    assert len(set(idx.tolist())) == 20
    counts = torch.bincount(split.labels[idx], minlength=5)
    assert counts.tolist() == [4, 4, 4, 4, 4]
    assert torch.equal(idx, class_mixed_indices(split, 20, seed=0))
    assert not torch.equal(idx, class_mixed_indices(split, 20, seed=1))


def test_class_mixed_images_are_pixels_in_unit_range_and_cycle_when_short():
    split = _sorted_split(per_class=2, classes=3)
    images = class_mixed_images(split, 10, seed=0)
    assert images.shape == (10, 3, 4, 4) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        class_mixed_indices(split, 0)


def test_forms_are_timed_interleaved_and_ratios_refer_to_the_reference():
    calls = []

    def form(name):
        def run(x):
            calls.append((name, len(x)))
            return x.sum()
        return run

    result = time_side_by_side({"a": form("a"), "b": form("b")}, torch.rand(3, 2), (1, 4), min_repeats=3,
                               reference="b")
    assert result["reference"] == "b" and set(result["batches"]) == {1, 4}
    for b, rows in result["batches"].items():
        assert rows["b"]["ratio"] == pytest.approx(1.0)
        assert rows["a"]["images_per_s"] == pytest.approx(b / rows["a"]["seconds"])
    assert {size for _, size in calls} == {1, 4}  # a batch of 4 is cycled out of 3 images
    # After the warm-up of each form the rounds alternate a, b, a, b (runs of equal calls in between).
    names = [name for name, size in calls if size == 4]
    runs = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert runs[-6:] == ["a", "b"] * 3
    assert "| a |" in format_table("t", result)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="at least one"):
        time_side_by_side({}, torch.rand(2, 2))
    with pytest.raises(ValueError, match="reference 'c'"):
        time_side_by_side({"a": lambda x: x}, torch.rand(2, 2), reference="c")
