"""Tests use a cache inside the checkout (or $ICNN_CACHE), never the user's ~/.cache."""

from __future__ import annotations

from pathlib import Path

from common.data import resolve_cache_dir


def test_tests_do_not_use_the_users_cache() -> None:
    assert resolve_cache_dir() != Path("~/.cache/interpretable-cnns").expanduser()
