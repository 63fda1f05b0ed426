import math

import pytest
import torch

from common.method import Budget
from common.run import (
    CheckpointError,
    NonFiniteLossError,
    RunDir,
    atomic_torch_save,
    atomic_write_json,
    check_finite,
    load_checkpoint,
    read_json,
    seed_everything,
)


def test_atomic_save_and_load(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_torch_save({"epoch": 3, "w": torch.ones(2)}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary files left


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json({"top1": 90.0}, path)
    with pytest.raises(TypeError):
        atomic_write_json({"bad": object()}, path)
    assert read_json(path) == {"top1": 90.0}
    assert len(list(tmp_path.iterdir())) == 1


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.pt")


def test_check_finite():
    assert check_finite(torch.tensor(1.5)).item() == 1.5
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteLossError, match="learning rate"):
            check_finite(torch.tensor(bad))


def test_run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run.read_config()
    run.write_config({"a": 1})
    run.write_metrics({"top1": torch.tensor(3.0)})
    run.write_environment()
    run.logger().info("hello")
    assert run.read_config() == {"a": 1} and run.read_metrics() == {"top1": 3.0}
    assert "hello" in (run.path / "log.txt").read_text()
    assert read_json(run.path / "environment.json")["torch"] == torch.__version__


def test_seeding_is_reproducible():
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))


def test_budget_batches():
    assert Budget(epochs=2).batches(100) == 200
    assert Budget(epochs=0.5, max_batches=10).batches(100) == 5
    assert Budget(epochs=0.01).batches(10) == 1
