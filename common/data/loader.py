"""``BatchLoader``: batches straight from an in-memory uint8 tensor, augmented in torch on its device.

No worker processes and no per-image Python: the whole split is moved to the device once, and each batch
is one gather plus one float conversion. On a GPU this keeps the accelerator fed without a CPU pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .containers import ImageTensors

CROP_PADDING = 4


def random_crop_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int = CROP_PADDING
) -> torch.Tensor:
    """Crop each ``B x C x H x W`` image at ``(dy, dx)`` of its zero-padded copy, then flip where ``flip``.

    Offsets run over ``0..2*padding`` (``padding`` means no shift). Done as one gather for the whole batch.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dev = images.device
    rows = dy[:, None] + torch.arange(h, device=dev)  # B x H
    cols_fwd = torch.arange(w, device=dev)
    cols = dx[:, None] + torch.where(flip[:, None], cols_fwd.flip(0), cols_fwd)  # B x W
    batch = torch.arange(b, device=dev)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: result is B x H x W x C.
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class BatchLoader:
    """Iterate ``(x, y)``: ``x`` float32 in [0, 1] ``B x 3 x H x W`` and ``y`` int64, both on ``device``.

    ``train=True`` reshuffles every epoch with a ``torch.Generator`` seeded ``seed + epoch`` (epoch counts the
    passes made so far, see :meth:`set_epoch` to resume), augments by default (random crop with 4-pixel zero
    padding and horizontal flip) and drops the last partial batch by default, unless that leaves no batch.
    ``train=False`` keeps the order, never augments unless asked, and keeps the last partial batch.
    Random numbers come from a CPU generator, so a seed gives the same batches on every device.
    """

    def __init__(
        self,
        split: ImageTensors,
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cpu",
        augment: bool | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.seed = seed
        # Dropping the ragged batch keeps batch-norm statistics sane, but never at the cost of an empty epoch.
        self.drop_last = (train and len(split) >= batch_size) if drop_last is None else drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s shuffle and augmentation (for resumed runs)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Draw every random number now (not lazily) so the epoch counter advances at iter() time.
        n = len(self.labels)
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.train:
            self.epoch += 1
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        jitter = None
        if self.augment:
            span = 2 * CROP_PADDING + 1
            jitter = (
                torch.randint(0, span, (n,), generator=gen),
                torch.randint(0, span, (n,), generator=gen),
                torch.randint(0, 2, (n,), generator=gen).bool(),
            )
        return self._batches(order, jitter)

    def _batches(
        self, order: torch.Tensor, jitter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = order.to(self.device)
        if jitter is not None:
            jitter = tuple(t.to(self.device) for t in jitter)  # type: ignore[assignment]
        for i in range(len(self)):
            sel = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sel]
            x = self.images[idx]
            if jitter is not None:
                dy, dx, flip = (t[sel] for t in jitter)
                x = random_crop_flip(x, dy, dx, flip)
            yield x.float().div_(255.0).contiguous(), self.labels[idx]
