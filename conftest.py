"""Project-wide test set-up: tests never write into the user's real decode cache.

Unless ``ICNN_CACHE`` is set, decoded image folders go to ``.pytest_cache/icnn-cache`` in the checkout (ignored
by git, kept between test runs so that the CIFAR-10 PNGs are decoded once, not once per run).
"""

from __future__ import annotations

import os
from pathlib import Path

if not os.environ.get("ICNN_CACHE"):
    os.environ["ICNN_CACHE"] = str(Path(__file__).resolve().parent / ".pytest_cache" / "icnn-cache")
