"""The channel block of the hardware a pruned network will run on, and the measurement that chose it.

oneDNN stores CPU activations in blocked layouts (nChw16c on AVX-512, nChw8c on AVX2): a conv's output
channels are computed in whole blocks, so 6, 7 or 9 of 16 output channels cost what 16 do. Pruning in groups
of the block turns fewer MACs into less time (README, "channel groups").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

# Blocks by CPU capability (torch.backends.cpu.get_cpu_capability()); measured on AVX-512 (README table).
CPU_BLOCKS = {"AVX512": 16, "AVX512_BF16": 16, "AVX512_VNNI": 16, "AMX": 16, "AVX2": 8}
CUDA_BLOCK = 8  # tensor-core friendly multiple; not measured here


def hardware_channel_block(device: torch.device | str = "cpu") -> int:
    """Channel block of ``device``: 16 on AVX-512 CPUs, 8 on other CPUs and on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return CUDA_BLOCK
    return CPU_BLOCKS.get(torch.backends.cpu.get_cpu_capability().upper(), 8)


def resolve_channel_group(setting: int | str, device: torch.device | str) -> int:
    """``"auto"``: the hardware block on CPU runs, 1 (per channel, the paper) elsewhere; an int: itself."""
    if setting == "auto":
        return hardware_channel_block(device) if torch.device(device).type == "cpu" else 1
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"channel_group must be 'auto' or an integer >= 1, got {setting!r}")
    return setting


@torch.no_grad()
def conv_output_channel_times(in_channels: int, out_channels: Sequence[int], size: int, batch: int,
                              repeats: int = 20, warmup: int = 3) -> dict[int, float]:
    """Median seconds of a 3x3 conv + BN + ReLU (eval) from ``in_channels`` to each width in ``out_channels``
    on ``size`` x ``size`` maps, timed interleaved (one round over all widths per repetition)."""
    x = torch.rand(batch, in_channels, size, size)
    layers = {c: nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                               nn.ReLU()).eval() for c in out_channels}
    times: dict[int, list[float]] = {c: [] for c in out_channels}
    for r in range(warmup + repeats):
        for c, layer in layers.items():
            start = time.perf_counter()
            layer(x)
            if r >= warmup:
                times[c].append(time.perf_counter() - start)
    return {c: statistics.median(t) for c, t in times.items()}
