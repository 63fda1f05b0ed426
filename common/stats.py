"""Paired differences and the project's one verdict rule: "beats" only beyond two standard errors.

Every comparison of a method with its control (the benchmark's mechanism table, DRIB's credibility controls and
seed pairs, Decoupling's static twin) reads a mean paired difference against its standard error here, so the
rule is written once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

VERDICT_SE = 2.0  # a difference counts only beyond this many standard errors


def paired_difference(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> tuple[float, float, int]:
    """(mean of a - b, its standard error = sample sd / sqrt(n), n) over the pairs where both are finite; the
    mean is NaN for no pair and the standard error NaN for fewer than two."""
    a, b = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs two sequences of equal length, got {len(a)} and {len(b)}")
    d = a - b
    d = d[torch.isfinite(d)]
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    se = float(d.std() / math.sqrt(n)) if n > 1 else math.nan
    return mean, se, n


def beyond_two_se(difference: float, se: float) -> int:
    """+1 where ``difference`` > VERDICT_SE x ``se``, -1 where it is below minus that, else 0 (also when the
    standard error is not finite: an unmeasured spread judges nothing)."""
    if not (math.isfinite(difference) and math.isfinite(se)):
        return 0
    return 1 if difference > VERDICT_SE * se else -1 if difference < -VERDICT_SE * se else 0
