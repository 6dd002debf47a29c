"""The core's catalog: schema ``vms``, which records every registered virtual microservice.

Tables are SQLAlchemy Core ``Table`` objects on one ``MetaData`` with a naming convention, grouped
by concern. The catalog belongs to the connecting (administrative) role; service roles get no
privilege on it except what a module grants explicitly for its own purpose.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

__all__ = [
    "CATALOG_SCHEMA",
    "SERVICES_GROUP_ROLE",
    "event_types",
    "metadata",
    "owned_tables",
    "quote_ident",
    "quote_literal",
    "service_versions",
    "services",
    "subscriptions",
]

CATALOG_SCHEMA = "vms"

#: Every service role is a member of this group; exported tables are granted to it read-only.
SERVICES_GROUP_ROLE = "vms_services"


def quote_ident(name: str) -> str:
    """Quote a Postgres identifier. Names reaching here were validated; this is belt and braces."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings, the default since Postgres 9.1), for
    SQL that is generated (DDL) or sent with the simple-query protocol (no parameters)."""
    if "\x00" in value:
        raise ValueError("a SQL literal cannot hold a NUL character")
    return "'" + value.replace("'", "''") + "'"


metadata = MetaData(
    schema=CATALOG_SCHEMA,
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    },
)

services = Table(
    "services",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("schema_name", String(63), nullable=False, unique=True),
    Column("role_name", String(63), nullable=False, unique=True),
    Column("version", Integer, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("descriptor", JSONB, nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Every descriptor a service ever registered; a changed descriptor is a new version.
service_versions = Table(
    "service_versions",
    metadata,
    Column("service", String(40), nullable=False),
    Column("version", Integer, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("descriptor", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("service", "version"),
    ForeignKeyConstraint(["service"], ["vms.services.name"], ondelete="CASCADE"),
)

event_types = Table(
    "event_types",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("key_field", String(200)),
    Column("json_schema", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("service", String(40), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("handler", String(200), nullable=False),
    Column("precedence", ARRAY(Text), nullable=False, server_default="{}"),
    Column("max_attempts", Integer, nullable=False),
    PrimaryKeyConstraint("service", "event_type"),
    ForeignKeyConstraint(["service"], ["vms.services.name"], ondelete="CASCADE"),
)

# Which service owns which table, and whether it is exported (readable by other services).
owned_tables = Table(
    "owned_tables",
    metadata,
    Column("schema_name", String(63), nullable=False),
    Column("table_name", String(63), nullable=False),
    Column("service", String(40), nullable=False),
    Column("entity", String(200), nullable=False),
    Column("exported", Boolean, nullable=False),
    PrimaryKeyConstraint("schema_name", "table_name"),
    ForeignKeyConstraint(["service"], ["vms.services.name"], ondelete="CASCADE"),
)
