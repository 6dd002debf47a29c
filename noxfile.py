"""The test suite on every Python the project supports, oldest and newest, one after the other.

``nox`` is the README's test command (and CI's). Each session gets a fresh virtual environment
with ``pip install -e ".[test]"`` and runs pytest; arguments after ``--`` go to pytest
(``nox -- tests/unit``). A Python that is missing fails the run rather than being skipped. With
pyenv, ``.python-version`` makes both interpreters visible from the checkout.
"""

from __future__ import annotations

import nox

PYTHONS = ["3.11", "3.13"]  # keep in step with requires-python and the classifiers in pyproject.toml

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "venv"


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite (lint, types, import contracts and the wheel included); pytest's exit
    code is the session's, so a run that collects no test fails too."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)
