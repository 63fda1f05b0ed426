"""The one recipe layout every package reads (``common.method.read_recipe_file``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.method import RECIPE_KEYS, read_recipe_file

GOOD = {"description": "tiny", "backbone": "resnet20", "dataset": "digits", "epochs": 1.5, "settings": {"lr": 0.1}}


def _write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_recipe_in_the_one_layout_reads_back_as_written(tmp_path: Path) -> None:
    assert read_recipe_file(_write(tmp_path, GOOD)) == GOOD
    assert read_recipe_file(_write(tmp_path, {**GOOD, "epochs": None}))["epochs"] is None
    assert tuple(GOOD) == RECIPE_KEYS


@pytest.mark.parametrize(("content", "message"), [
    ({"lr": 0.1}, "a recipe has exactly the keys"),
    ({**GOOD, "max_batches": 200}, "max_batches"),
    ({**GOOD, "backbone": ""}, "'backbone' must be a non-empty string"),
    ({**GOOD, "epochs": 0}, "'epochs' must be a positive number or null"),
    ({**GOOD, "epochs": True}, "'epochs' must be a positive number or null"),
    ({**GOOD, "settings": [1]}, "'settings' must be a JSON object"),
    ("{not json", "is not valid JSON"),
])
def test_any_other_layout_is_one_line_naming_what_is_wrong(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        read_recipe_file(_write(tmp_path, content))
    assert "\n" not in str(caught.value)


def test_a_missing_recipe_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_recipe_file(tmp_path / "nothing.json")
