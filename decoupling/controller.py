"""The architecture controlling module (paper Eq. 2) and the gated conv layer it drives.

For layer l with input X^l (C channels) and N filters: s = GAP(X^l), G(s) = W2 (W1 s)_+ with
W1: C/gamma x C and W2: N x C/gamma (gamma = 4), then z^l = SemHash(G(s)) selects the filters, and the
layer output is Y^l * z^l. The controller reads the layer's *input*, so at inference the filter selection
is known before the convolution runs and unselected filters are never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.sparse import bn_affine, conv_bn_subset, group_rows

from .semhash import improved_semhash


class ArchitectureController(nn.Module):
    """Eq. 2: GAP -> FC(C -> C/gamma) -> ReLU -> FC(-> N), returning the real vector G(s) (B x N).

    Initialisation: W2 = 0 and its bias = ``init_bias`` > 0, so every gate starts open for every input
    (G(s) = init_bias > 0) and the pretrained network is unchanged at inference until training moves it.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, init_bias: float = 1.0):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction ratio gamma must be >= 1, got {reduction}")
        if init_bias <= 0:
            raise ValueError(f"init_bias must be > 0 so that the gates start open, got {init_bias}")
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(s)))


class GatedConvBN(nn.Module):
    """conv -> BN -> mask by z, with z from an ``ArchitectureController`` on the conv's input.

    Replaces a backbone's conv (its BN becomes an identity). After each forward it keeps, for the losses
    and the analysis tools: ``last_logits`` (G(s)), ``last_mask`` (z) and ``last_pooled`` (y^l = GAP of
    (BN(conv(x)))_+ before masking, used by L_kl; masked execution only).

    ``gathered`` (inference only) computes just the selected filters from just the active input
    channels (the producer's mask when the input comes from another gated layer), with gathered weights.
    """

    def __init__(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, reduction: int = 4,
                 init_bias: float = 1.0):
        super().__init__()
        self.name = name
        self.conv = conv
        self.bn = bn
        self.controller = ArchitectureController(conv.in_channels, conv.out_channels, reduction, init_bias)
        self.gathered = False
        self.hard_gates = False  # training with inference-mode gates (the fine-tuning phase)
        self.keep_maps = False
        # The gated layer whose mask zeroes this layer's input channels; a tuple so that nn.Module does
        # not register it as a child a second time.
        self._producer: tuple[GatedConvBN, ...] = ()
        self.last_logits: Tensor | None = None
        self.last_mask: Tensor | None = None
        self.last_pooled: Tensor | None = None
        self.last_map: Tensor | None = None

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    @property
    def producer(self) -> GatedConvBN | None:
        return self._producer[0] if self._producer else None

    def set_producer(self, producer: GatedConvBN) -> None:
        if producer.channels != self.conv.in_channels:
            raise ValueError(f"{producer.name} has {producer.channels} filters but {self.name} reads "
                             f"{self.conv.in_channels} channels")
        self._producer = (producer,)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.controller(x)
        z = improved_semhash(logits, self.training and not self.hard_gates)
        self.last_logits, self.last_mask = logits, z
        if self.gathered and not self.training:
            out = self._gathered_forward(x, z)
            self.last_pooled = None
        else:
            out = self.bn(self.conv(x))
            self.last_pooled = F.relu(out).mean(dim=(2, 3))
            out = out * z[:, :, None, None]
        self.last_map = out.detach() if self.keep_maps else None
        return out

    def input_mask(self) -> Tensor | None:
        """Active input channels of the current forward (B x C), or None when the input is dense."""
        producer = self.producer
        return None if producer is None else producer.last_mask

    def _gathered_forward(self, x: Tensor, z: Tensor) -> Tensor:
        conv = self.conv
        in_mask = self.input_mask()
        h_out = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) \
            // conv.stride[0] + 1
        w_out = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) \
            // conv.stride[1] + 1
        out = x.new_zeros(x.shape[0], conv.out_channels, h_out, w_out)
        keys = z if in_mask is None else torch.cat([in_mask, z], dim=1)
        offset = 0 if in_mask is None else in_mask.shape[1]
        for rows, active in group_rows(keys):
            out_index = active[active >= offset] - offset
            if out_index.numel() == 0:
                continue  # every filter of this layer is off for these samples: nothing to compute
            in_index = None if in_mask is None else active[active < offset]
            if in_index is not None and in_index.numel() == 0:
                # No active input channel: the conv yields its bias only, which BN maps to a constant.
                scale, shift = bn_affine(self.bn)
                bias = conv.bias[out_index] if conv.bias is not None else 0.0
                value = bias * scale[out_index] + shift[out_index]
                compact = value.view(1, -1, 1, 1).expand(len(rows), -1, h_out, w_out)
            else:
                compact = conv_bn_subset(x[rows], conv, self.bn, out_index, in_index)
            out[rows[:, None], out_index[None, :]] = compact
        return out

