import torch
from torch import nn

from common.sparse import conv_bn_subset, group_rows, scatter_channels


def _random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    return bn.eval()


def test_gathered_conv_equals_masked_dense_conv():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 8, 3, stride=2, padding=1), _random_bn(8)
    x = torch.randn(4, 6, 9, 9)
    in_mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    out_mask = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    dense = bn(conv(x * in_mask.view(1, -1, 1, 1))) * out_mask.view(1, -1, 1, 1)
    out_index, in_index = out_mask.nonzero().flatten(), in_mask.nonzero().flatten()
    sparse = scatter_channels(conv_bn_subset(x, conv, bn, out_index, in_index), out_index, 8)
    torch.testing.assert_close(sparse, dense.detach(), atol=1e-5, rtol=1e-5)


def test_depthwise_subset():
    conv, bn = nn.Conv2d(5, 5, 3, padding=1, groups=5), _random_bn(5)
    x = torch.randn(2, 5, 6, 6)
    index = torch.tensor([0, 2, 3])
    mask = torch.zeros(5, dtype=torch.bool)
    mask[index] = True
    dense = bn(conv(x)) * mask.view(1, -1, 1, 1)
    torch.testing.assert_close(scatter_channels(conv_bn_subset(x, conv, bn, index), index, 5), dense.detach())


def test_group_rows_partitions_the_batch():
    masks = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 0, 0]])
    groups = group_rows(masks)
    assert sorted(i for samples, _ in groups for i in samples.tolist()) == [0, 1, 2, 3]
    for samples, channels in groups:
        for i in samples.tolist():
            assert masks[i].nonzero().flatten().tolist() == channels.tolist()
