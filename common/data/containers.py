"""In-memory dataset containers: one split as uint8 tensors, and the train/val/test bundle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


@dataclass
class ImageTensors:
    """One split held in memory: ``images`` uint8 ``N x 3 x H x W``, ``labels`` int64 ``N``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        # Fail here, at construction, rather than deep inside a training loop.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: IndexLike) -> ImageTensors:
        """A copy holding only ``indices`` (in the given order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        return ImageTensors(self.images[idx], self.labels[idx])


@dataclass
class DatasetSplits:
    """A dataset ready for training. ``val_source`` says where ``val`` came from: ``"train"`` (a hold-out
    of the training set; ``test`` is the whole test set) or ``"test-half"`` (half of the test set; ``test``
    is the other, held-out half, and ``train`` the whole training set). ``load_dataset`` returns every split
    class-interleaved, so any prefix ``split.images[:N]`` mixes the classes in proportion."""

    name: str
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors
    classes: list[str]
    val_source: str = "train"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def test_split_name(self) -> str:
        """How the reported split is named next to a figure ("held-out test half (5,000)" or "test (10,000)")."""
        kind = "held-out test half" if self.val_source == "test-half" else "test"
        return f"{kind} ({len(self.test):,})"

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` shared by every split."""
        h, w = self.test.images.shape[-2:] if len(self.train) == 0 else self.train.images.shape[-2:]
        return int(h), int(w)
