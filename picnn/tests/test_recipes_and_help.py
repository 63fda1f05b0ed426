"""The recipes share one layout and keep their meaning; the CLI's help lists every command; every command the
README gives parses."""

import json
import re
import shlex
from pathlib import Path

import pytest

from common.method import RECIPE_KEYS, Budget
from picnn import PicnnSettings
from picnn.__main__ import COMMANDS, build_parser, main

PACKAGE = Path(__file__).resolve().parents[1]
RECIPES = sorted((PACKAGE / "configs").glob("*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_has_the_one_layout_and_valid_settings(path):
    recipe = json.loads(path.read_text())
    assert list(recipe) == list(RECIPE_KEYS)
    assert isinstance(recipe["epochs"], int | float) and recipe["epochs"] > 0
    PicnnSettings.from_dict(recipe["settings"]).validate()
    assert "attempt" not in recipe["description"].lower()


def test_the_cpu_recipe_is_200_steps_of_batch_128():
    """With --weights the 50,000 CIFAR-10 training images all train (validation on the test half): 390 full
    batches of 128 per epoch, of which the recipe's epochs take 200."""
    recipe = json.loads((PACKAGE / "configs" / "resnet20_cifar10_cpu.json").read_text())
    assert recipe["settings"]["batch_size"] == 128
    assert Budget(epochs=recipe["epochs"]).batches(50_000 // 128) == 200


def test_a_recipe_in_another_layout_is_refused(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"backbone": "resnet20", "dataset": "digits", "epochs": 1, "max_batches": 2,
                               "settings": {}}))
    assert main(["train", "--config", str(old), "--from-scratch", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "a recipe has exactly the keys" in err and "max_batches" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_help_lists_every_command_with_its_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), command


def _readme_commands() -> list[list[str]]:
    """Every ``python -m picnn ...`` command of the README's shell blocks, continuation lines joined, the shell
    variables of its loops given one of their values."""
    readme = (PACKAGE / "README.md").read_text()
    text = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)).replace("\\\n", " ")
    values = {"W": "w.th", "SEED": "0", "LAM": "2", "V": "added", "ARGS": "--filters 128"}
    commands = []
    for line in re.findall(r"python -m picnn ([^\n`#]+)", text):
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line.split(";")[0].split("&&")[0])
        commands.append(shlex.split(line))
    return commands


def test_every_readme_command_parses():
    commands = _readme_commands()
    assert {argv[0] for argv in commands} == set(COMMANDS)
    for argv in commands:
        build_parser().parse_args(argv)
