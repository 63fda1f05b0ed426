"""common.cli: shared flags, one-line errors naming the flag, type-checked --set, main_guard."""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from common.cli import (
    CLIError,
    MissingInputsError,
    MissingWeightsError,
    add_budget_arguments,
    add_common_arguments,
    apply_overrides,
    budget_from_args,
    check_out_dir,
    gather_inputs,
    main_guard,
    parse_args,
    require_weights,
    resolve_val_source,
)
from common.method import Budget
from common.run import (
    ConfigMismatchError,
    DeviceError,
    RunDir,
    atomic_write_json,
    check_config,
    config_diff,
    pick_device,
    progress,
    read_json,
)


def _parser(**flags: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    add_common_arguments(parser, **flags)
    add_budget_arguments(parser)
    return parser


@pytest.mark.parametrize(("argv", "flag"), [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--epochs", "nan"], "--epochs"),
    (["--max-batches", "0"], "--max-batches"), (["--max-batches", "-3"], "--max-batches"),
    (["--budget-seconds", "-5"], "--budget-seconds"), (["--budget-seconds", "0"], "--budget-seconds"),
    (["--threads", "0"], "--threads"),
])
def test_non_positive_budgets_are_errors_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(CLIError, match=f"^{flag} must be a positive number"):
        parse_args(_parser(), argv)


def test_a_valid_budget_passes_and_becomes_a_budget() -> None:
    args = parse_args(_parser(), ["--epochs", "0.5", "--max-batches", "3", "--budget-seconds", "10"])
    assert budget_from_args(args) == Budget(epochs=0.5, seconds=10.0, max_batches=3)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_malformed_devices_are_one_line_errors(device: str) -> None:
    with pytest.raises(DeviceError, match="--device") as info:
        parse_args(_parser(), ["--device", device])
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error() -> None:
    with pytest.raises(DeviceError, match="--device 'cuda': CUDA is not available"):
        pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


def test_out_pointing_at_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CLIError, match=r"--out .* is a file"):
        parse_args(_parser(out=True), ["--out", str(tmp_path / "file")])
    with pytest.raises(CLIError, match=r"is below .* which is a file"):
        check_out_dir(tmp_path / "file" / "run")
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_seed_is_applied_at_parse_time() -> None:
    parse_args(_parser(), ["--seed", "7"])
    a = torch.rand(4)
    parse_args(_parser(), ["--seed", "7"])
    assert torch.equal(a, torch.rand(4))


def test_weights_policy(tmp_path: Path) -> None:
    parser = _parser(weights=True)
    with pytest.raises(CLIError, match=r"--weights PATH is required.*--from-scratch"):
        require_weights(parse_args(parser, []))
    assert require_weights(parse_args(parser, ["--from-scratch"])) is None
    with pytest.raises(CLIError, match="exclude each other"):
        require_weights(parse_args(parser, ["--from-scratch", "--weights", "w.th"]))
    with pytest.raises(CLIError, match=r"does not exist.*akamaster.*curl -L -o"):
        require_weights(parse_args(parser, ["--weights", str(tmp_path / "resnet20-12fca82f.th")]))
    (tmp_path / "w.th").write_bytes(b"x")
    assert require_weights(parse_args(parser, ["--weights", str(tmp_path / "w.th")])) == tmp_path / "w.th"


def test_gather_inputs_reports_every_missing_input_at_once(tmp_path: Path) -> None:
    from common.data import DatasetNotFoundError, load_dataset

    def weights() -> Path | None:
        return require_weights(parse_args(_parser(weights=True), ["--weights", str(tmp_path / "w.th")]))

    def data() -> object:
        return load_dataset("cifar10", tmp_path / "data")

    with pytest.raises(MissingWeightsError):
        weights()
    with pytest.raises(MissingInputsError) as info:
        gather_inputs(weights, data, what="tool train")
    text = str(info.value)
    assert text.startswith("tool train cannot start; 2 inputs are missing:")
    assert "w.th does not exist" in text and "cifar-10-python.tar.gz" in text
    with pytest.raises(MissingInputsError, match=r"^Dataset 'cifar10' not found"):
        gather_inputs(lambda: 1, data)
    assert gather_inputs(lambda: 1, lambda: 2) == [1, 2]
    assert issubclass(MissingInputsError, FileNotFoundError) and not issubclass(DatasetNotFoundError, CLIError)


def test_val_source_auto_follows_the_start() -> None:
    assert resolve_val_source("auto", pretrained=True) == "test-half"
    assert resolve_val_source("auto", pretrained=False) == "train"
    assert resolve_val_source("train", pretrained=True) == "train"
    args = parse_args(_parser(val_source=True), [])
    assert args.val_source == "auto"


@dataclass(frozen=True)
class _Train:
    lr: float = 0.1
    steps: int = 10
    nesterov: bool = False
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[int, ...] = (5, 8)
    clip: float | None = None


@dataclass(frozen=True)
class _Config:
    name: str = "x"
    train: _Train = field(default_factory=_Train)
    extra: dict = field(default_factory=lambda: {"alpha": 1.0})

    def __post_init__(self) -> None:
        if self.train.lr <= 0:
            raise ValueError("train.lr must be positive")


def test_set_converts_to_the_declared_types() -> None:
    config = apply_overrides(_Config(), ["train.lr=0.05", "train.steps=3", "train.nesterov=true",
                                         "train.schedule=step", "train.milestones=1,2,3", "train.clip=none",
                                         "name=y", "extra.alpha=2", "extra.new=[1, 2]"])
    assert config.train == _Train(lr=0.05, steps=3, nesterov=True, schedule="step", milestones=(1, 2, 3))
    assert config.name == "y" and config.extra == {"alpha": 2.0, "new": [1, 2]}
    assert isinstance(config.extra["alpha"], float)
    assert apply_overrides(_Config(), ["train.clip=2.5"]).train.clip == 2.5
    assert _Config().train.lr == 0.1  # the original is untouched


@pytest.mark.parametrize(("pair", "needle"), [
    ("train.lr=fast", "--set train.lr=fast: expected a number, got 'fast'"),
    ("train.steps=1.5", "expected an integer"),
    ("train.nesterov=maybe", "expected true or false"),
    ("train.schedule=linear", "expected one of cosine, step"),
    ("train.momentum=0.9", "unknown key 'momentum'; known: lr, steps"),
    ("lr", "expected KEY=VALUE"),
    ("train=1", "is a section"),
    ("train.lr=-1", "train.lr must be positive"),
    ("extra.alpha=fast", "expected a number"),
])
def test_set_errors_name_the_flag_and_the_key(pair: str, needle: str) -> None:
    with pytest.raises(CLIError) as info:
        apply_overrides(_Config(), [pair])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_main_guard_turns_errors_and_ctrl_c_into_one_line(capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICNN_TRACEBACK", raising=False)

    def fails() -> int:
        raise CLIError("--epochs must be a positive number, got -1")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert main_guard(fails, prog="tool") == 2
    assert capsys.readouterr().err == "tool: error: --epochs must be a positive number, got -1\n"
    assert main_guard(interrupted, prog="tool") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main_guard(lambda: 3, prog="tool") == 3
    monkeypatch.setenv("ICNN_TRACEBACK", "1")
    with pytest.raises(CLIError):
        main_guard(fails, prog="tool")


# --- common.run pieces the CLIs rely on ------------------------------------------------------------------------


def test_config_diff_and_claim(tmp_path: Path) -> None:
    old = {"budget": {"epochs": 1, "max_batches": 3}, "seeds": (0, 1), "method": "drib"}
    new = {"budget": {"epochs": 3, "max_batches": 3}, "seeds": [0, 1], "method": "drib", "extra": 1}
    assert config_diff(old, new) == ["budget.epochs: 1 -> 3", "extra: (absent) -> 1"]
    run = RunDir(tmp_path / "run")
    run.claim(old)
    run.claim(old)  # a resumed run with the same config
    with pytest.raises(ConfigMismatchError, match=r"budget.epochs: 1 -> 3.*new --out"):
        run.claim(new)


def test_check_config_creates_nothing_and_ignored_keys_may_change(tmp_path: Path) -> None:
    check_config(tmp_path / "new", {"a": 1})
    assert not (tmp_path / "new").exists()  # a CLI can check before it loads anything
    run = RunDir(tmp_path / "run")
    run.claim({"epochs": 1, "seconds": 10, "data_root": None}, ignore=("seconds", "data_root"))
    run.claim({"epochs": 1, "seconds": 60, "data_root": "d"}, ignore=("seconds", "data_root"))
    assert read_json(run.config_path) == {"epochs": 1, "seconds": 60, "data_root": "d"}  # records the new values
    with pytest.raises(ConfigMismatchError, match=r"epochs: 1 -> 2"):
        check_config(run.path, {"epochs": 2, "seconds": 60, "data_root": "d"}, ignore=("seconds", "data_root"))


def test_data_flags() -> None:
    args = parse_args(_parser(data=True), ["--data-root", "somewhere", "--download"])
    assert args.data_root == "somewhere" and args.download is True
    assert parse_args(_parser(data=True), []).download is False


def test_run_files_are_readable_like_any_other_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, tmp_path / "m.json")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_progress_is_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICNN_PROGRESS", "1")
    monkeypatch.setenv("ICNN_PROGRESS_INTERVAL", "0")
    assert list(progress(range(3), "eval")) == [0, 1, 2]  # stderr is captured: not a terminal
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["eval: 1/3 (33%), 0 s, about 0 s left", "eval: 2/3 (67%), 0 s, about 0 s left",
                     "eval: done, 3 in 0 s"]
    assert all("\r" not in line and "\x1b" not in line for line in lines)
    monkeypatch.setenv("ICNN_PROGRESS", "0")
    assert list(progress(range(3), "eval")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_out_commands_hold_the_lock_and_name_the_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from common.cli import command_scope
    from common.run import RunLockedError, atomic_torch_save, load_checkpoint, run_lock

    parser = argparse.ArgumentParser(prog="python -m m")
    sub = parser.add_subparsers(dest="command", required=True)
    add_common_arguments(sub.add_parser("train"), out=True)
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument("--run")
    out = tmp_path / "run"
    args = parse_args(parser, ["train", "--out", str(out), "--wait"])
    assert args.wait is True
    args = parse_args(parser, ["train", "--out", str(out)])

    def train() -> None:
        with command_scope(args, "python -m m"):
            (out / "list.pt").parent.mkdir(exist_ok=True)
            atomic_torch_save([1], out / "list.pt")
            with run_lock(out):  # a second holder of the same directory (here: another open of the lock)
                pass

    assert main_guard(train, prog="python -m m") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m m: error: {out} is in use by another process (pid {os.getpid()} holds")
    assert "--wait" in err and len(err.splitlines()) == 1
    with pytest.raises(RunLockedError):  # (the same, raised)
        train()
    evaluate_args = parse_args(parser, ["evaluate", "--run", str(out)])
    with command_scope(evaluate_args, "python -m m"), pytest.raises(Exception) as info:
        load_checkpoint(out / "list.pt")
    assert f"python -m m train --out {out}" in str(info.value)


def test_retell_changes_the_help_and_default_of_one_flag_and_refuses_an_unknown_one() -> None:
    from common.cli import retell

    parser = _parser()
    retell(parser, "epochs", help="passes (default: the recipe's)", default=None)
    assert parser.parse_args([]).epochs is None
    assert "passes (default: the recipe's)" in parser.format_help()
    with pytest.raises(KeyError, match="no_such_flag"):
        retell(parser, "no_such_flag", help="x")
