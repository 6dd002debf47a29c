"""Reading ``module:attribute`` into an App, as uvicorn reads its APP argument.

Used by the CLI and by the alembic environment (``-x app=...``); an unreadable target is an
``AppLoadError`` that says what was wrong, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from framework._internal.app import App
from framework._internal.errors import AppLoadError
from framework._internal.service import Service

__all__ = ["load_app"]


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return it as an App (not started).

    The attribute is an ``App`` or a list of ``Service`` classes. The working directory is on
    the import path, so ``shop.services:app`` works from a project's root.
    """
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise AppLoadError(f"{target!r} is not module:attribute (e.g. examples.quickstart:app)")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AppLoadError(f"cannot import {module_name!r}: {err}") from err
    except Exception as err:  # the module itself raised while importing
        raise AppLoadError(
            f"importing {module_name!r} raised {type(err).__name__}: {err}; fix the module and run again"
        ) from err
    value = getattr(module, attribute, None)
    if isinstance(value, App):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, type) and issubclass(v, Service) for v in value
    ):
        return App(value)
    if value is None:
        raise AppLoadError(f"module {module_name!r} has no attribute {attribute!r}")
    raise AppLoadError(f"{target!r} is neither an App nor a list of Service classes")
