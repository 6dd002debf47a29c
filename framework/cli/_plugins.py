"""Subcommands from other packages, found through the ``vmsdb.commands`` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from framework._internal.errors import FrameworkError

__all__ = ["ENTRY_POINT_GROUP", "PluginGroup"]

ENTRY_POINT_GROUP = "vmsdb.commands"


@cache
def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _as_command(obj: object, name: str) -> TyperCommand | TyperGroup:
    command = typer.main.get_command(obj) if isinstance(obj, typer.Typer) else obj
    if not isinstance(command, (TyperCommand, TyperGroup)):
        raise FrameworkError(
            f"the {ENTRY_POINT_GROUP} entry point {name!r} is a {type(obj).__name__}, not a typer.Typer"
        )
    command.name = name
    return command


class PluginGroup(TyperGroup):
    """The root group: its own commands, then each plugin's, imported only when asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        own = super().list_commands(ctx)
        return own + sorted(name for name in _plugins() if name not in own)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        entry_point = _plugins().get(cmd_name)
        if entry_point is None:
            return None
        try:
            loaded = entry_point.load()
        except ImportError as err:
            raise FrameworkError(
                f"`vmsdb {cmd_name}` comes from {entry_point.value}, which cannot be imported "
                f"({err}); install the package that provides it"
            ) from err
        return _as_command(loaded, cmd_name)
