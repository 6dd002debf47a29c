"""Exported SQL functions: named functions an owner offers to other services' queries.

``CustDiscount.expired()`` in a query is the function ``customer.cust_discounts__expired(row)``,
created here at registration from the descriptor: owned by the owner's role, ``STABLE``, and
executable by every service. Its body is an SQL expression over ``self``, the entity's row.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import SERVICES_GROUP_ROLE, quote_ident
from dbcore.descriptor import ServiceDescriptor
from dbcore.errors import RegistrationError
from dbcore.query_language import function_sql_name

__all__ = ["install_exported_functions"]


async def install_exported_functions(
    conn: AsyncConnection, descriptor: ServiceDescriptor, existing_tables: Collection[str]
) -> None:
    """Create (or replace) the exported functions of ``descriptor`` whose table exists."""
    schema, role = quote_ident(descriptor.schema_name), quote_ident(descriptor.role)
    for fn in descriptor.functions:
        table = descriptor.entity(fn.entity) or descriptor.table(fn.entity)
        if table is None:
            raise RegistrationError(
                f"exported function {fn.name}: {fn.entity!r} is not a table of {descriptor.name}"
            )
        if table.name not in existing_tables:
            continue  # created by a later sync, once migrations or create_tables made the table
        row_type = f"{schema}.{quote_ident(table.name)}"
        name = f"{schema}.{quote_ident(function_sql_name(table.name, fn.name))}"
        await conn.execute(
            text(
                f"CREATE OR REPLACE FUNCTION {name}(self {row_type}) RETURNS {fn.returns} "
                f"LANGUAGE sql STABLE AS $fn$ SELECT {fn.body} $fn$"
            )
        )
        for statement in (
            f"ALTER FUNCTION {name}({row_type}) OWNER TO {role}",
            f"REVOKE ALL ON FUNCTION {name}({row_type}) FROM PUBLIC",
            f"GRANT EXECUTE ON FUNCTION {name}({row_type}) TO {quote_ident(SERVICES_GROUP_ROLE)}",
        ):
            await conn.execute(text(statement))
