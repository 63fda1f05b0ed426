"""Every row of the benchmark's registry honours ``common.method``'s contract (as timm's tests run over its
registry): on digits with a 3-batch budget, ``run_method`` takes the one signature, returns a ``MethodResult``
whose model maps pixels to logits, whose ``metrics`` hold the shared figures under the shared keys, whose
``macs`` is what its own per-input execution (or its static count) costs, and whose saliency has the input's
spatial shape."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch

from benchmark.presets import COMPRESSING
from benchmark.registry import default_registry
from common.macs import count_macs
from common.method import MethodResult, shared_metric_problems
from common.run import seed_everything
from common.speed import class_mixed_indices

ROWS = tuple(default_registry())
TARGET = 0.5


@pytest.mark.parametrize("row", ROWS)
def test_run_method_has_the_one_signature(row: str) -> None:
    entry = default_registry()[row]()
    params = inspect.signature(entry).parameters
    assert list(params)[:4] == ["start", "data", "budget", "out_dir"], row
    for name, default in (("device", None), ("seed", 0), ("settings", None)):
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, (row, name)
        assert params[name].default == default, (row, name, params[name].default)


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_every_registered_row_honours_the_contract(row: str, smoke, tmp_path: Path) -> None:
    preset, data, start = smoke
    seed_everything(0)
    target = TARGET if row in COMPRESSING else None
    result = default_registry()[row]()(copy.deepcopy(start), data, preset.budget(), tmp_path / row, device="cpu",
                                       seed=0, settings=preset.method_settings(row, target))
    assert isinstance(result, MethodResult)

    assert shared_metric_problems(result.metrics) == [], row
    assert result.metrics["split"] == data.test_split_name
    assert result.metrics["target_mac_reduction"] == target

    pick = class_mixed_indices(data.test, 16)  # every class, not a prefix of the split
    images = data.test.images[pick].float().div(255.0)
    labels = data.test.labels[pick]
    model = result.model.cpu().eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (16, data.num_classes) and torch.isfinite(logits).all(), row

    input_size = (3, *data.image_size)
    if result.dynamic_forward is None:
        own = float(count_macs(model, input_size))
    else:
        with torch.no_grad():
            test = data.test.images.float().div(255.0)
            macs = torch.cat([result.dynamic_forward(test[i:i + 128])[1] for i in range(0, len(test), 128)])
        assert macs.shape == (len(test),) and (macs > 0).all(), row
        own = float(macs.double().mean())
    assert result.metrics["macs"] == pytest.approx(own, rel=1e-3), row
    dense = float(count_macs(start, input_size))
    assert result.metrics["mac_reduction"] == pytest.approx(1.0 - own / dense, abs=1e-3), row

    if result.saliency is not None:
        maps = result.saliency(images[:4], labels[:4])
        assert maps.shape == (4, *data.image_size) and torch.isfinite(maps).all(), row
    if result.mis_layer is not None:
        assert any(m is result.mis_layer for m in model.modules()), f"{row}: mis_layer is not part of the model"
