import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from common.method import Budget
from common.run import (
    CheckpointError,
    DiskFullError,
    MalformedFileError,
    NonFiniteLossError,
    RunDir,
    RunLockedError,
    UnsafeFileError,
    atomic_save_figure,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_finite,
    load_checkpoint,
    read_json,
    rebuild_hint,
    require_keys,
    run_lock,
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


# --- run files that cannot run code, malformed files, full disks, undefined figures (issue 26) ---------------


class _Payload:
    """Unpickling this object opens (creates) ``marker``: what a crafted run file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_refused_unread(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pt"
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError) as info:
        load_checkpoint(path, rebuild="rebuild it with python -m drib train --out RUN")
    message = str(info.value)
    assert str(path) in message and "refused" in message and "io.open" in message  # what it would have called
    assert "python -m drib train --out RUN" in message and "\n" not in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: unpickled the old way it creates the marker
    assert marker.exists()


def test_malformed_and_truncated_files_name_the_file_and_the_rebuild(tmp_path: Path) -> None:
    good = tmp_path / "model.pt"
    atomic_torch_save({"meta": {"steps": 3}, "w": torch.ones(2)}, good)
    with rebuild_hint("rebuild it with python -m picnn train --out RUN"):
        blob = load_checkpoint(good)
        assert blob["meta"] == {"steps": 3} and blob.get("config") is None  # a plain dict otherwise
        with pytest.raises(MalformedFileError, match="has no 'config' entry") as info:
            blob["config"]
        assert str(good) in str(info.value) and "python -m picnn train --out RUN" in str(info.value)
        with pytest.raises(MalformedFileError, match="lacks 'state_dict'"):
            load_checkpoint(good, keys=("meta", "state_dict"))
        listed = tmp_path / "list.pt"
        atomic_torch_save([1, 2], listed)
        with pytest.raises(MalformedFileError, match="holds a list, not the dict") as info:
            load_checkpoint(listed)
        assert str(listed) in str(info.value)
        truncated = tmp_path / "truncated.pt"
        truncated.write_bytes(good.read_bytes()[:200])
        with pytest.raises(CheckpointError, match="truncated") as info:
            load_checkpoint(truncated)
        message = str(info.value)
        assert str(truncated) in message and "python -m picnn train" in message and "\n" not in message
    with pytest.raises(MalformedFileError, match="command that wrote it"):  # outside the hint: the default
        require_keys({}, ("x",), good)
    # What was loaded saves again as plain data, loadable with weights_only.
    atomic_torch_save({"old": blob}, tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["old"]["meta"] == {"steps": 3}


def test_json_never_holds_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json({"top1": math.nan, "inf": [math.inf, 1.0], "t": torch.tensor([math.nan, 2.0]),
                       "n": {"x_reason": "why", "x": -math.inf}}, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict == {"top1": None, "inf": [None, 1.0], "t": [None, 2.0], "n": {"x_reason": "why", "x": None}}


def _open_dev_full(fd: int, mode: str):
    os.close(fd)
    return open("/dev/full", mode)  # every write: ENOSPC from the kernel, as on a full disk


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path: Path, monkeypatch, capsys) -> None:
    import common.run as run_module
    from common.cli import main_guard

    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 1}, path)
    monkeypatch.setattr(run_module.os, "fdopen", _open_dev_full)
    for write in (lambda: atomic_torch_save({"w": torch.ones(50_000)}, path),
                  lambda: atomic_write_json({"a": 1}, tmp_path / "metrics.json")):
        with pytest.raises(DiskFullError) as info:
            write()
        message = str(info.value)
        assert "no space left to write" in message and " free on its file system" in message, message
        assert message.startswith("no space") and "\n" not in message
    assert main_guard(lambda: atomic_torch_save({"w": torch.ones(10)}, path), prog="prog") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prog: error: no space left to write {path}") and "ICNN_TRACEBACK" not in err
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the good file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_concurrent_writers_use_unique_temporaries_and_failures_leave_none(tmp_path: Path) -> None:
    from common.run import _atomic_write

    path = tmp_path / "leaderboard.md"

    def outer(handle) -> None:  # a second writer of the same file starts and ends inside the first one
        atomic_write_text("inner\n", path)
        handle.write(b"outer\n")

    _atomic_write(path, outer)
    assert path.read_text() == "outer\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_path = tmp_path / "pareto.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_save_figure(fig, figure_path, dpi=50)
    assert figure_path.read_bytes()[:4] == b"\x89PNG"
    before = figure_path.read_bytes()
    fig, ax = plt.subplots()
    with pytest.raises(TypeError):  # a failing savefig
        atomic_save_figure(fig, figure_path, dpi=50, format_that_does_not_exist=1)
    assert figure_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.md", "pareto.png"]


# --- one process per run directory -------------------------------------------------------------------------


def _hold(folder: str, ready) -> None:  # runs in a forked child: hold the lock until killed
    with run_lock(folder):
        ready.set()
        time.sleep(600)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_second_process_is_refused_naming_the_holder_and_a_kill_releases_the_lock(tmp_path: Path,
                                                                                     capsys) -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    folder = tmp_path / "run"
    holder = context.Process(target=_hold, args=(str(folder), ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError) as info:
            with run_lock(folder, what="--out run"):
                pytest.fail("two processes hold one run directory")
        assert f"pid {holder.pid}" in str(info.value) and "--wait" in str(info.value)
        assert str(info.value).startswith("--out run is in use by another process")
        # --wait: blocks until the holder is gone; a kill -9 releases the lock (the kernel drops it).
        threading.Timer(0.5, lambda: os.kill(holder.pid, signal.SIGKILL)).start()
        with RunDir(folder).lock(wait=True) as lock_path:
            assert lock_path.read_text().strip() == str(os.getpid())
        assert "waiting for pid" in capsys.readouterr().err
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join()
    with run_lock(folder):  # free again after the block
        pass


def test_a_refused_start_leaves_no_folder_behind(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        with run_lock(folder):
            raise ValueError("a bad setting found after the lock")
    assert not (tmp_path / "new").exists()
    with run_lock(folder):
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "config.json"]
