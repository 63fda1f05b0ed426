"""Every ``python -m <package> ...`` command in the root and benchmark READMEs parses with that package's own
parser (a renamed or removed flag fails here, not in a reader's shell), and every CLI's ``--help`` lists its
subcommands."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("drib", "picnn", "decoupling", "isp", "benchmark")
VARIABLES = {"$W": "weights.th"}


def _commands(readme: Path) -> list[tuple[str, list[str]]]:
    """(package, argv) of each ``python -m <package>`` line in the README's code blocks (continuations joined,
    comments and environment assignments dropped)."""
    text = readme.read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            match = re.match(r"(?:\w+=\S+\s+)*(?:\S*/)?python -m (\w+)\s*(.*)", line)
            if not match or match.group(1) not in PACKAGES:
                continue
            rest = match.group(2)
            for name, value in VARIABLES.items():
                rest = rest.replace(name, value)
            found.append((match.group(1), shlex.split(rest)))
    return found


COMMANDS = [(readme.name if readme.parent == ROOT else f"{readme.parent.name}/{readme.name}", pkg, argv)
            for readme in (ROOT / "README.md", ROOT / "benchmark" / "README.md") for pkg, argv in _commands(readme)]


def test_the_root_readme_holds_a_command_of_every_package() -> None:
    assert {pkg for readme, pkg, _ in COMMANDS if readme == "README.md"} >= {"drib", "picnn", "decoupling", "isp"}


@pytest.mark.parametrize(("readme", "package", "argv"), COMMANDS, ids=[f"{r}:{p}:{i}" for i, (r, p, _) in
                                                                      enumerate(COMMANDS)])
def test_every_readme_command_parses(readme: str, package: str, argv: list[str]) -> None:
    parser = importlib.import_module(f"{package}.__main__").build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{readme}: `python -m {package} {shlex.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("package", PACKAGES[:4])
def test_help_lists_every_subcommand(package: str, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = importlib.import_module(f"{package}.__main__").build_parser()
    commands = [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name in action.choices]
    assert {"train", "evaluate", "explain"} <= set(commands), (package, commands)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = capsys.readouterr().out
    missing = [c for c in commands if c not in shown]
    assert not missing, f"python -m {package} --help does not name {missing}"
