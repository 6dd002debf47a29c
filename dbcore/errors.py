"""The core's error tree. Every error the core raises is a ``CoreError``.

Subclasses also inherit the builtin a caller would naturally catch (``PermissionError`` for an
isolation breach, ``ValueError`` for bad text), so code that does not know vmsdb still does the
right thing.
"""

from __future__ import annotations

__all__ = [
    "CoreError",
    "CoreUnavailable",
    "EntityDeleted",
    "EntityNotFound",
    "IsolationError",
    "LanguageError",
    "LeaseConsumed",
    "LeaseError",
    "LeaseExpired",
    "LeaseNotFound",
    "LeaseReleased",
    "ReadOnlyViolation",
    "RegistrationError",
    "ServiceRecovering",
    "TransactionAborted",
    "TransactionConflict",
    "TruncateRefused",
]


class CoreError(Exception):
    """Root of every error raised by ``dbcore``."""


class CoreUnavailable(CoreError, ConnectionError):
    """The database cannot be reached now: it refuses or dropped the connection, is shutting
    down or starting up. Nothing was committed by the statement that met it; try again later."""


class RegistrationError(CoreError, ValueError):
    """A descriptor cannot be registered: a name or a table is claimed twice, or it is malformed."""


class IsolationError(CoreError, PermissionError):
    """A service's transaction touched what another service owns and did not export to it.

    Raised from the Postgres permission error, so it is Postgres, not Python, that enforced the
    boundary. ``service`` is the one whose transaction ran, ``owner`` the one that owns ``table``.
    """

    def __init__(
        self,
        service: str,
        owner: str | None,
        table: str,
        action: str = "access",
        *,
        refusal: str | None = None,
    ) -> None:
        self.service = service
        self.owner = owner
        self.table = table
        self.action = action
        if refusal is not None:
            # Not a table: a role switch, a role change, a server program (Postgres's words).
            super().__init__(
                f"service {service!r} may not {action} {table!r}: {refusal}. A service's "
                "transactions run logged in as its own role, which can neither become another "
                "role nor change one"
            )
            return
        whose = f"service {owner!r}" if owner else "no registered service"
        super().__init__(
            f"service {service!r} may not {action} {table!r}, which belongs to {whose}: "
            "a service writes only its own schema and reads only what other services export "
            "(mark the model with @<Owner>.export to share it read-only, or send an event)"
        )


class ReadOnlyViolation(CoreError, PermissionError):
    """A statement tried to write inside a read-only (``RO``) transaction."""


class TransactionConflict(CoreError):
    """A serialization failure or deadlock; the transaction may succeed if run again.

    ``kind`` says which (``"serialization failure"`` or ``"deadlock"``).
    """

    def __init__(self, message: str, *, kind: str) -> None:
        self.kind = kind
        super().__init__(message)


class TransactionAborted(CoreError):
    """The transaction was already aborted when it came to commit (an error was swallowed)."""


class LanguageError(CoreError, ValueError):
    """The text of a ``@Lease`` or ``@Query`` does not parse or does not fit the descriptors.

    ``token`` is the offending piece of text and ``position`` its character offset (or -1).
    The framework adds the function's name when it reports the error at start-up.
    """

    def __init__(self, message: str, *, text: str, token: str | None = None, position: int = -1):
        self.text = text
        self.token = token
        self.position = position
        where = f" at {token!r}" if token is not None else ""
        if position >= 0:
            where += f" (offset {position})"
        super().__init__(f"{message}{where} in: {text}")


class LeaseError(CoreError):
    """A lease cannot be consumed, released or renewed in its current state."""

    def __init__(self, lease_id: str, message: str) -> None:
        self.lease_id = lease_id
        super().__init__(message)


class LeaseExpired(LeaseError):
    """The lease's period ran out; its quantity went back to the owner."""


class LeaseReleased(LeaseError):
    """The lease was released; it holds nothing any more."""


class LeaseConsumed(LeaseError):
    """The lease was consumed; it cannot be released or renewed."""


class LeaseNotFound(LeaseError, LookupError):
    """No lease with this id exists for this lease function (or it was reaped)."""


class EntityNotFound(CoreError, LookupError):
    """No referenceable entity has this URI (never created, or deleted with no reference left)."""


class EntityDeleted(CoreError, LookupError):
    """The entity is a tombstone: existing references stay valid, a new one cannot be taken."""


class ServiceRecovering(CoreError, RuntimeError):
    """The owner is recovering in consistency mode and serves nothing until the recovery ends."""


class TruncateRefused(CoreError, PermissionError):
    """TRUNCATE of a referenceable table: it would lose which entities are referenced."""
