import torch
from torch import nn

from common.macs import ChannelActivity, count_macs, dynamic_macs, layer_shapes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)             # 3*4*9*8*8 = 6912
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)   # 4*6*9*4*4 = 3456
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # 1*6*9*4*4 = 864
        self.fc = nn.Linear(6, 5)                          # 30

    def forward(self, x):
        x = self.dw(self.b(self.a(x)))
        return self.fc(x.mean((2, 3)))


def test_static_macs_hand_count():
    assert count_macs(Tiny(), (3, 8, 8)) == 6912 + 3456 + 864 + 30


def test_dynamic_macs_hand_count():
    shapes = layer_shapes(Tiny(), (3, 8, 8))
    a_out = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    b_out = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
    activity = {"a": ChannelActivity(outputs=a_out), "b": ChannelActivity(inputs=a_out, outputs=b_out),
                "dw": ChannelActivity(inputs=b_out, outputs=b_out)}
    macs = dynamic_macs(shapes, activity, batch_size=2)
    sample0 = 3 * 2 * 9 * 64 + 2 * 3 * 9 * 16 + 3 * 9 * 16 + 30
    sample1 = 3 * 4 * 9 * 64 + 4 * 1 * 9 * 16 + 1 * 9 * 16 + 30
    assert macs.tolist() == [sample0, sample1]


def test_dynamic_macs_with_everything_active_equals_static():
    model = Tiny()
    shapes = layer_shapes(model, (3, 8, 8))
    full = {"b": ChannelActivity(inputs=torch.ones(3, 4), outputs=torch.ones(3, 6))}
    assert dynamic_macs(shapes, full, 3).tolist() == [count_macs(model, (3, 8, 8))] * 3


def test_dynamic_count_equals_static_count_of_a_physically_slimmed_copy():
    model = Tiny()
    keep = torch.tensor([0, 3])  # channels of `a` kept for this sample
    slim = Tiny()
    slim.a = nn.Conv2d(3, 2, 3, padding=1)
    slim.b = nn.Conv2d(2, 6, 3, stride=2, padding=1)
    mask = torch.zeros(1, 4)
    mask[0, keep] = 1
    activity = {"a": ChannelActivity(outputs=mask), "b": ChannelActivity(inputs=mask)}
    assert dynamic_macs(layer_shapes(model, (3, 8, 8)), activity, 1).item() == count_macs(slim, (3, 8, 8))


def test_module_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x.flatten(1)[:, :4]))

    assert count_macs(Twice(), (4, 1, 1)) == 32
