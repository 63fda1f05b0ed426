"""The command line as documented: --help names every subcommand, every flag a help lists parses, every
`python -m isp` command of the README uses flags its subcommand has, and recipes have the one layout."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from common.method import RECIPE_KEYS
from isp.__main__ import build_parser, main
from isp.config import IspSettings, read_recipe

PACKAGE = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "evaluate", "explain", "sweep", "blocks", "speed", "report", "compare")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_names_every_subcommand_with_a_line_of_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert set(_subparsers(build_parser())) == set(COMMANDS)
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), command


def _value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    if action.type in (int, float):
        return ["1"]
    return ["a=b" if action.metavar and "=" in str(action.metavar) else "x"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_its_help_lists_parses(command, capsys):
    sub = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out)) - {"--help"}
    assert documented, command
    required = [arg for a in sub._actions if a.required and a.option_strings for arg in (a.option_strings[0],
                                                                                          *_value(a))]
    for flag in sorted(documented):
        action = sub._option_string_actions.get(flag)
        assert action is not None, f"{command} --help names {flag}, which it does not take"
        build_parser().parse_args([command, *required, flag, *_value(action)])


def test_evaluate_and_explain_take_the_shared_run_flags():
    shared = {"--run", "--out", "--images", "--device", "--threads", "--precision", "--data-root", "--download",
              "--val-source"}
    for command in ("evaluate", "explain"):
        sub = _subparsers(build_parser())[command]
        assert set(sub._option_string_actions) - {"-h", "--help"} == shared, command


def test_removed_spellings_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--seconds", "5"])
    for command, flag in (("evaluate", "--index"), ("explain", "--per-class")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--run", "x", flag, "3"])


def _readme_commands() -> list[list[str]]:
    """Every `python -m isp ...` command of the README's code blocks, continuation lines joined, with the
    train flags of each `W="..."` definition in place of $W."""
    text = (PACKAGE / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        block = block.replace("\\\n", " ")
        w = re.search(r'W="([^"]*)"', block)
        for line in block.splitlines():
            line = line.split("#", 1)[0].replace("$W", w.group(1) if w else "")
            for part in line.split("python -m isp ")[1:]:
                part = re.split(r";|&&|\|", part)[0]
                part = re.sub(r"\[([^\]]*)\]", r"\1", part)  # [--set ...] marks an optional flag
                commands.append(shlex.split(part))
    return commands


def test_readme_commands_use_the_flags_their_subcommand_has():
    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"train", "evaluate", "explain", "compare", "sweep", "report", "speed"}
    subs = _subparsers(build_parser())
    for command in commands:
        sub = subs[command[0]]
        for token in command[1:]:
            flag = token.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in sub._option_string_actions, f"README: {command[0]} has no {flag}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_recipe_has_the_one_layout_and_valid_settings(path):
    recipe = json.loads(path.read_text())
    assert list(recipe) == list(RECIPE_KEYS)
    assert read_recipe(path) == recipe
    assert path.name.startswith(f"{recipe['backbone']}_{recipe['dataset']}")
    IspSettings.from_dict(recipe["settings"])
    assert "attempt" not in recipe["description"].lower()


def test_a_recipe_of_another_layout_is_refused(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"_comment": "old", "gamma1": 0.5}))
    with pytest.raises(ValueError, match="exactly the keys"):
        read_recipe(flat)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"description": "d", "backbone": "resnet20", "dataset": "digits", "epochs": None,
                               "settings": {"gama1": 0.5}}))
    with pytest.raises(ValueError, match="unknown ISP settings"):
        read_recipe(bad)


def test_train_takes_backbone_dataset_and_epochs_from_the_recipe(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"description": "a test recipe", "backbone": "resnet20", "dataset": "digits",
                                  "epochs": 2, "settings": {"predictor_batch": 8, "gamma1": 0.0}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--from-scratch", "--out", str(out), "--device", "cpu",
                 "--max-batches", "1", "--stage", "predictor", "--set", "predictor_batch=4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "digits" and config["backbone"] == "resnet20"
    assert config["budget"]["epochs"] == 2
    assert config["settings"]["predictor_batch"] == 4 and config["settings"]["gamma1"] == 0.0  # --set wins
