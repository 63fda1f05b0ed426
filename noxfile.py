"""One session per method, plus common, benchmark, tests, lint and leaderboard.

Every session runs in the one project environment (``venv_backend="none"``): torch is installed once,
by the two set-up commands of the README, and never again per session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

PYTEST = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile"]
ENV = {"ICNN_PROGRESS": "0"}


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run(*PYTEST, *paths, *session.posargs, env=ENV)


@nox.session
def tests(session: nox.Session) -> None:
    """Every test of every package (tests needing real data skip when DATA_ROOT lacks it)."""
    _pytest(session)


@nox.session
def quick(session: nox.Session) -> None:
    """A developer's loop: every test not marked ``slow`` or ``data`` (under 3 minutes on 2 cores)."""
    _pytest(session, "-m", "not slow and not data")


@nox.session
def common(session: nox.Session) -> None:
    _pytest(session, "common/tests")


@nox.session
def drib(session: nox.Session) -> None:
    _pytest(session, "drib/tests")


@nox.session
def picnn(session: nox.Session) -> None:
    _pytest(session, "picnn/tests")


@nox.session
def decoupling(session: nox.Session) -> None:
    _pytest(session, "decoupling/tests")


@nox.session
def isp(session: nox.Session) -> None:
    _pytest(session, "isp/tests")


@nox.session
def benchmark(session: nox.Session) -> None:
    _pytest(session, "benchmark/tests")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the import contract: methods import only common and third-party packages."""
    session.run(sys.executable, "-m", "ruff", "check", ".")
    session.run(str(Path(sys.executable).with_name("lint-imports")), external=True)


@nox.session
def leaderboard(session: nox.Session) -> None:
    """Run a benchmark preset: ``nox -s leaderboard -- --preset cifar10-cpu``."""
    session.run(sys.executable, "-m", "benchmark", *(session.posargs or ["--preset", "smoke"]))
