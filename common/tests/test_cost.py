"""Training steps timed side by side (behaviour only, on a fake clock: never wall-clock figures) and the
cross-entropy reference step."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.cost import cross_entropy_step, time_steps, timed_call
from common.precision import Precision


class FakeClock:
    """A clock that only moves when a step says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_step_sees_every_batch_in_alternating_order_and_warmup_is_not_counted():
    clock, calls = FakeClock(), []
    durations = {"a": iter([9.0, 9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 9.0, 5.0, 5.0, 7.0])}

    def step(name):
        def run(x, y):
            calls.append((name, int(x), int(y)))
            clock.now += next(durations[name])
        return run

    batches = iter([(torch.tensor(i), torch.tensor(-i)) for i in range(10)])
    medians = time_steps({"a": step("a"), "b": step("b")}, batches, rounds=3, warmup=2, clock=clock)
    assert medians == {"a": 2.0, "b": 5.0}  # the two warm-up rounds (9 s) are dropped
    assert calls == [("a", 0, 0), ("b", 0, 0), ("b", 1, -1), ("a", 1, -1), ("a", 2, -2), ("b", 2, -2),
                     ("b", 3, -3), ("a", 3, -3), ("a", 4, -4), ("b", 4, -4)]
    assert next(batches)[0] == 5  # one batch per round, no more


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one step"):
        time_steps({}, iter([]), rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_steps({"a": lambda x, y: None}, iter([]), rounds=0)


def test_timed_call_passes_the_arguments_and_measures_on_the_clock():
    clock, seen = FakeClock(), []

    def fn(*args):
        seen.append(args)
        clock.now += 0.25

    assert timed_call(fn, 1, 2, clock=clock) == 0.25 and seen == [(1, 2)]


def test_cross_entropy_step_is_one_plain_sgd_step_in_the_policys_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    reference = copy.deepcopy(model)
    x, y = torch.rand(5, 3, 6, 6), torch.tensor([0, 1, 2, 1, 0])
    step = cross_entropy_step(model, Precision("fp32", torch.device("cpu"), True), lr=0.1, momentum=0.9,
                              weight_decay=1e-3)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # the policy's layout
    model.eval()  # the step trains in train mode whatever mode it finds
    loss = step(x, y)
    assert model.training
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    expected = F.cross_entropy(reference.train()(x), y)
    expected.backward()
    optimizer.step()
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(got, want, atol=1e-6)
