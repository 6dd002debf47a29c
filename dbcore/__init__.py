"""dbcore: the database tier of vmsdb.

A Postgres-backed core that hosts virtual microservices: a catalog of service descriptors, one
schema and role per service (isolation enforced by Postgres), the event log with in-database
delivery, and the embedded server used when no database URL is configured. ``dbcore`` never
imports ``framework``; the descriptor is the only thing that crosses between them.
"""

from dbcore.core import Core
from dbcore.descriptor import ServiceDescriptor, role_for
from dbcore.embedded import EmbeddedPostgres, EmbeddedPostgresError
from dbcore.errors import (
    CoreError,
    IsolationError,
    LanguageError,
    ReadOnlyViolation,
    RegistrationError,
    TransactionConflict,
)

__all__ = [
    "Core",
    "CoreError",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "IsolationError",
    "LanguageError",
    "ReadOnlyViolation",
    "RegistrationError",
    "ServiceDescriptor",
    "TransactionConflict",
    "role_for",
]
