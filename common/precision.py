"""One precision and memory-layout policy for every training and evaluation loop.

What runs in which precision under a ``bf16`` policy (``fp32`` changes nothing but the layout):

- **bf16** (inside ``policy.autocast()``): the forward pass of the network, i.e. convolutions and linear
  layers and the element-wise work between them, and the matching parts of the backward pass.
- **fp32, always**: the weights and the optimizer state (autocast casts copies, it never stores bf16
  weights; only :func:`common.deploy.deploy` with ``bf16=True`` keeps bf16 weights, for inference),
  BatchNorm running statistics (fp32 buffers, updated with fp32 accumulation), losses (cast the logits
  with ``logits.float()`` before every loss, or compute the loss outside ``autocast()``), MAC and
  parameter counting (``common.macs``), metrics, saliency maps and anything a test compares numerically.

The layout: ``channels_last`` (NHWC) where it was measured faster for conv nets (this project's CPU and
CUDA GPUs; see the fast-path table in common/README.md). ``prepare_model`` converts a model once,
``prepare_inputs`` converts each batch (a no-op for inputs that are not 4-D).

``auto`` picks bf16 on CUDA devices that support it and on CPUs with native bf16 instructions
(AVX512_BF16 or AMX); it never picks bf16 where it would be emulated (slow), and fp32 elsewhere.
A training step under the policy::

    policy = resolve_precision(args.precision, device)
    model = policy.prepare_model(model)
    for x, y in loader:
        x = policy.prepare_inputs(x)
        with policy.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16")
CHOICES = ("auto", *PRECISIONS)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 arithmetic in hardware (AVX512_BF16 or AMX), so bf16 is fast."""
    capability = ""
    with contextlib.suppress(Exception):
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def device_supports_bf16(device: torch.device) -> bool:
    """Native (fast) bf16 on ``device``: CUDA with bf16 support, or a CPU with bf16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def _default_channels_last(device: torch.device) -> bool:
    # Measured faster for the project's conv nets on this CPU (oneDNN NHWC kernels) and on CUDA (cuDNN).
    return device.type in ("cpu", "cuda")


@dataclass(frozen=True)
class Precision:
    """``name``: "fp32" or "bf16" (autocast); ``device``: where the model runs; ``channels_last``: NHWC."""

    name: str
    device: torch.device
    channels_last: bool

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the forward pass under :meth:`autocast`."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the policy's device; a ``nullcontext`` for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """``model`` (in place, returned) in the policy's memory format; weights stay fp32."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def prepare_inputs(self, x: Tensor) -> Tensor:
        """``x`` in the policy's memory format (4-D image batches only; dtype unchanged: autocast casts)."""
        if self.channels_last and isinstance(x, Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        """One line for logs and leaderboards, e.g. ``bf16 autocast, channels_last, cpu``."""
        mode = "bf16 autocast" if self.name == "bf16" else "fp32"
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{mode}, {layout}, {self.device.type}"

    def as_dict(self) -> dict[str, object]:
        return {"precision": self.name, "channels_last": self.channels_last, "device": str(self.device)}


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region that runs in fp32 even inside ``policy.autocast()``: for the few ops a method needs exact
    (Gumbel noise and straight-through masks, log-variances). Cast its bf16 inputs with ``.float()``."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def resolve_precision(name: str = "auto", device: torch.device | str | None = None, *,
                      channels_last: bool | None = None) -> Precision:
    """The policy for ``name`` ("auto", "fp32" or "bf16") on ``device`` (default: CUDA if present, else CPU).

    ``auto``: bf16 where ``device`` has native bf16, else fp32. An explicit ``bf16`` on a device without
    native support raises (it would be emulated, slower than fp32). ``channels_last`` defaults to the
    layout measured faster on the device type.
    """
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(CHOICES)}, got {name!r}")
    name = name.lower()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    native = device_supports_bf16(device)
    if name == "auto":
        name = "bf16" if native else "fp32"
    elif name == "bf16" and not native:
        raise ValueError(f"--precision bf16: {device} has no native bf16 support (it would be emulated and "
                         "slower than fp32); use --precision fp32 or auto")
    if channels_last is None:
        channels_last = _default_channels_last(device)
    return Precision(name, device, bool(channels_last))


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "auto") -> argparse.ArgumentParser:
    """Add the shared ``--precision {auto,fp32,bf16}`` flag; resolve it with :func:`resolve_precision`."""
    parser.add_argument("--precision", choices=CHOICES, default=default,
                        help="compute precision of training and evaluation: auto (bf16 where the device has "
                             "native bf16, else fp32), fp32 or bf16 (default: %(default)s)")
    return parser
