"""Turning a ``@Query``'s rows into what its function says it returns.

``-> list[Model]`` with a pydantic model (or any class whose constructor takes the columns as
keywords, such as a dataclass) gives typed objects; anything else gives plain dicts.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from framework._internal.annotations import FunctionSpec

__all__ = ["convert_rows", "row_type"]


def row_type(spec: FunctionSpec) -> type | None:
    """The element type ``T`` of a ``list[T]`` return annotation, when rows can become ``T``."""
    try:
        hints = typing.get_type_hints(spec.function)
    except Exception:  # unresolvable annotations: fall back to mappings
        return None
    ret = hints.get("return")
    if typing.get_origin(ret) not in (list, Sequence):
        return None
    (item,) = typing.get_args(ret) or (None,)
    if isinstance(item, type) and (issubclass(item, BaseModel) or hasattr(item, "__dataclass_fields__")):
        return item
    return None


def convert_rows(target: type | None, rows: Sequence[Mapping[Any, Any]]) -> list[Any]:
    """``rows`` as ``target`` objects (its :func:`row_type`, worked out at start-up), or dicts."""
    if target is None:
        return [dict(r) for r in rows]
    if issubclass(target, BaseModel):
        return [target.model_validate(dict(r)) for r in rows]
    return [target(**r) for r in rows]
