import os

import pytest
import torch

os.environ.setdefault("ICNN_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)
