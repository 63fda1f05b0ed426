"""Datasets as in-memory uint8 tensors, and a batch loader that augments on the training device.

splits = load_dataset("cifar10")             # root: argument, else $DATA_ROOT, else ./data
loader = BatchLoader(splits.train, 128, train=True, device="cuda")
for x, y in loader: ...                      # x float32 in [0, 1], B x 3 x H x W, on the device
"""

from .containers import DatasetSplits, ImageTensors
from .loader import BatchLoader
from .paths import DatasetNotFoundError, resolve_cache_dir, resolve_data_root
from .registry import TEST_HALF_SEED, VAL_SOURCES, default_val_source, list_datasets, load_dataset

__all__ = [
    "TEST_HALF_SEED",
    "VAL_SOURCES",
    "BatchLoader",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageTensors",
    "default_val_source",
    "list_datasets",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_root",
]
