"""Shared fixtures: one scratch-trained smoke start per test session, copied into each test's results."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from benchmark.jobs import Context, load_data
from benchmark.presets import get_preset
from benchmark.start import prepare_start, start_path


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICNN_PROGRESS", "0")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's start (ResNet-20 briefly trained on digits), trained once per session."""
    preset = get_preset("smoke")
    results = tmp_path_factory.mktemp("start") / preset.name
    ctx = Context(preset, results, device="cpu")
    prepare_start(preset, load_data(ctx), results, weights_dir=None, device=torch.device("cpu"))
    return start_path(preset, results)


@pytest.fixture
def smoke(results_with_start: Path):
    """The smoke preset, its data and its (cached) scratch-trained start."""
    preset = get_preset("smoke")
    ctx = Context(preset, results_with_start / preset.name, device="cpu")
    data = load_data(ctx)
    start = prepare_start(preset, data, ctx.results_dir, weights_dir=None, device=torch.device("cpu"))
    return preset, data, start


@pytest.fixture
def results_with_start(tmp_path: Path, smoke_start: Path) -> Path:
    """A results folder whose smoke preset already holds the cached start."""
    preset = get_preset("smoke")
    target = start_path(preset, tmp_path / preset.name)
    target.parent.mkdir(parents=True)
    shutil.copy(smoke_start, target)
    return tmp_path
