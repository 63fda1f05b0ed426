"""The embedded dataset trains a ResNet-20 for one epoch on CPU."""

import torch
import torch.nn.functional as F

from common.backbones import build_backbone
from common.data import BatchLoader, load_dataset
from common.run import check_finite, seed_everything
from common.training import evaluate_top1


def test_resnet20_learns_embedded_digits_in_one_epoch():
    # One thread, whatever an earlier test in this process left: one epoch at this size is sensitive to the
    # order of CPU sums (lr 0.05: 52.1% at 1 thread, 52.8% at 2; lr 0.01 gave 57% at 2 threads, 33% at 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seed_everything(0)
    data = load_dataset("digits")
    model = build_backbone("resnet20", data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    before = evaluate_top1(model, BatchLoader(data.val, 256, train=False))
    model.train()
    for x, y in BatchLoader(data.train, 32, train=True, seed=0, augment=False):
        loss = check_finite(F.cross_entropy(model(x), y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate_top1(model, BatchLoader(data.val, 256, train=False))
    torch.set_num_threads(threads)
    # Ten balanced classes: chance is 10%. One epoch of real digits gets far above it (52% measured).
    assert after > 40.0 and after > before + 20.0, (before, after)


def test_measure_latency_times_a_bigger_batch_as_slower():
    import pytest

    from common.training import measure_latency

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    model.train()
    small = measure_latency(model, (3, 32, 32), 1, repeats=5, warmup=1)
    large = measure_latency(model, (3, 32, 32), 32, repeats=5, warmup=1)
    assert 0 < small < large and model.training  # mode restored
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, (3, 32, 32), 1, repeats=0)
