"""Events: pydantic models with a type name and a partition key.

```python
class AddCartItemRequest(Event, key="customer_id"):
    customer_id: str
    item_id: str
```

``key`` names the field whose value orders delivery: events with the same key reach each
subscriber in commit order (FIFO per key); events with different keys may be handled in parallel.
``name`` (default: the class name) is the event type on the wire and in the catalog.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from framework._internal.errors import AnnotationError

__all__ = ["Event"]


class Event(BaseModel):
    """Base class of every event type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    __event_type__: ClassVar[str]
    __event_key__: ClassVar[str | None] = None

    def __init_subclass__(cls, *, key: str | None = None, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.__event_type__ = name or cls.__name__
        if key is not None:
            cls.__event_key__ = key

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        key = cls.__event_key__
        if key is not None and key not in cls.model_fields:
            raise AnnotationError(
                f"event {cls.__name__}",
                f"key={key!r} is not one of its fields ({', '.join(cls.model_fields) or 'none'})",
            )

    def partition_key(self) -> str | None:
        """The value that orders this event's delivery, as text (``None``: no key, no order)."""
        key = self.__event_key__
        return None if key is None else str(getattr(self, key))

    @classmethod
    def event_type(cls) -> str:
        return cls.__event_type__
