"""Tests run on one CPU thread (the machine is shared) and without progress bars."""

import os

import torch

os.environ.setdefault("ICNN_PROGRESS", "0")
torch.set_num_threads(1)
