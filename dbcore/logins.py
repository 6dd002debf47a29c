"""Login roles: how the App authenticates as each service and as the core's housekeeping.

Every service's transactions run on connections *logged in* as the service's role
(``vms_<service>``), and the App's own chores (claims, acknowledgements' wake-ups, pruning,
reaping, publish, outcome lookups, LISTEN) on connections logged in as :data:`CORE_ROLE`, a
non-superuser role with rights on the core's operational tables only. Neither is a member of
anything it could ``SET ROLE`` to: there is no role to switch back to, and a pooled connection
never carries anything but its own login. Only migrations and registration use the
administrator of ``VMSDB_DATABASE_URL``.

The passwords: each login role's password is ``HMAC-SHA256(secret, role)``, and the secret is
one random value per core kept in ``vms.login_secret``, a table only the administrator can read.
Every process of the same App connects with the administrator's URL first, reads the secret,
and so derives the same passwords; registration (every start) sets them with ``ALTER ROLE``.
Roles are cluster-wide while the table is per database: two databases of one server that
register the same service would take turns setting its password, so the secret is made the
same for every database of a server where the administrator can read ``pg_authid`` (a
superuser, such as the embedded server's): it is then derived from a random password given once
to the ``NOLOGIN`` group role, which nobody can log in with.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from sqlalchemy import CheckConstraint, Column, Integer, Table, Text, text
from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.catalog import SERVICES_GROUP_ROLE, metadata, quote_ident, quote_literal

__all__ = [
    "CORE_ROLE",
    "CORE_TABLES_READ_ONLY",
    "core_role_sql",
    "grant_login",
    "login_secret",
    "password_for",
    "read_secret",
]

#: The role of the App's housekeeping: claims, acks' wake-ups, pruning, reaping, publish,
#: outcome lookups and LISTEN. Not a superuser, not a member of any service role.
CORE_ROLE = "vms_core"

# One row: the secret the login passwords of this core are derived from.
login_secret = Table(
    "login_secret",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("secret", Text, nullable=False),
    CheckConstraint("id = 1", name="single_row"),
)

#: Catalog tables the core role reads and never writes: they change only at registration.
CORE_TABLES_READ_ONLY: Sequence[str] = (
    "services",
    "service_versions",
    "event_types",
    "subscriptions",
    "owned_tables",
    "outbound",
)
#: Tables the core role gets nothing on.
_CORE_TABLES_HIDDEN: Sequence[str] = ("login_secret", "alembic_version")

_IS_SUPERUSER = text("SELECT current_setting('is_superuser') = 'on'")
_GROUP_PASSWORD = text("SELECT rolpassword FROM pg_authid WHERE rolname = :role")
_SECRET = text("INSERT INTO vms.login_secret (id, secret) VALUES (1, :secret) ON CONFLICT (id) DO NOTHING")
_SAVE_SECRET = text("UPDATE vms.login_secret SET secret = :secret WHERE id = 1 AND secret <> :secret")
_READ_SECRET = text("SELECT secret FROM vms.login_secret WHERE id = 1")


def password_for(secret: str, role: str) -> str:
    """The password of login role ``role``: the same in every process that knows ``secret``."""
    return hmac.new(secret.encode(), role.encode(), hashlib.sha256).hexdigest()


async def read_secret(conn: AsyncConnection) -> str:
    """The secret of this core's login passwords (administrator only; made on first use)."""
    if (await conn.execute(_IS_SUPERUSER)).scalar_one():
        # One secret for the whole server (roles are cluster-wide): the group role's verifier.
        stored = (await conn.execute(_GROUP_PASSWORD, {"role": SERVICES_GROUP_ROLE})).scalar_one_or_none()
        if stored is None:
            group = quote_ident(SERVICES_GROUP_ROLE)
            random = quote_literal(secrets.token_hex(32))
            await conn.execute(text(f"ALTER ROLE {group} NOLOGIN PASSWORD {random}"))
            stored = (await conn.execute(_GROUP_PASSWORD, {"role": SERVICES_GROUP_ROLE})).scalar_one()
        secret = hashlib.sha256(str(stored).encode()).hexdigest()
        await conn.execute(_SECRET, {"secret": secret})
        await conn.execute(_SAVE_SECRET, {"secret": secret})
        return secret
    await conn.execute(_SECRET, {"secret": secrets.token_hex(32)})
    return str((await conn.execute(_READ_SECRET)).scalar_one())


async def grant_login(
    conn: AsyncConnection,
    role: str,
    password: str,
    *,
    idle_timeout_ms: int | None = None,
    read_only: bool = False,
) -> None:
    """Make ``role`` a login role with ``password`` and nothing else: no superuser, no role
    creation, no bypass of row-level security. ``idle_timeout_ms``: its sessions' (in this
    database) ``idle_in_transaction_session_timeout`` (0 or ``None``: no limit).

    ``read_only``: its sessions are read-only unless a transaction says otherwise (``BEGIN
    ... READ WRITE``, which every writing transaction of a service sends): a statement run
    outside a transaction cannot write. What lets a read-only read-committed call run its
    statements without ``BEGIN``/``COMMIT`` (``dbcore.isolation.service_connection``).
    """
    quoted = quote_ident(role)
    # Only a superuser may even name SUPERUSER, REPLICATION or BYPASSRLS; a role made by a
    # CREATEROLE administrator has none of them anyway.
    superuser = (await conn.execute(_IS_SUPERUSER)).scalar_one()
    attributes = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS" if superuser else ""
    await conn.execute(
        text(f"ALTER ROLE {quoted} WITH LOGIN {attributes} PASSWORD {quote_literal(password)}")
    )
    timeout = quote_literal(f"{int(idle_timeout_ms or 0)}ms")
    database = (await conn.execute(text("SELECT current_database()"))).scalar_one()
    await conn.execute(
        text(
            f"ALTER ROLE {quoted} IN DATABASE {quote_ident(database)} "
            f"SET idle_in_transaction_session_timeout = {timeout}"
        )
    )
    await conn.execute(
        text(
            f"ALTER ROLE {quoted} IN DATABASE {quote_ident(database)} "
            f"SET default_transaction_read_only = {'on' if read_only else 'off'}"
        )
    )


CREATE_CORE_ROLE = f"""
DO $$ BEGIN
    CREATE ROLE {quote_ident(CORE_ROLE)} NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$
"""

_RLS_TABLES = text(
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'vms' AND c.relkind IN ('r', 'p') AND c.relrowsecurity "
    "AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = 'core_all')"
)


async def core_role_sql(conn: AsyncConnection) -> None:
    """Give the core role exactly its rights: the operational tables of schema ``vms`` (the
    event log, deliveries, dead letters, relay cursors, leases, references), read-only access to
    the catalog, the core's functions; nothing in any service's schema, nothing on the secret.

    Run at every registration (tables added by a later revision get the same), idempotent.
    """
    core = quote_ident(CORE_ROLE)
    await conn.execute(text(CREATE_CORE_ROLE))
    await conn.execute(text(f"GRANT USAGE ON SCHEMA vms TO {core}"))
    await conn.execute(text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA vms TO {core}"))
    for table in CORE_TABLES_READ_ONLY:
        await conn.execute(text(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON vms.{table} FROM {core}"))
    for table in _CORE_TABLES_HIDDEN:
        await conn.execute(
            text(f"DO $$ BEGIN REVOKE ALL ON vms.{table} FROM {core}; "
                 "EXCEPTION WHEN undefined_table THEN NULL; END $$")
        )  # fmt: skip
    await conn.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA vms TO {core}"))
    # Tables the administrator adds to the schema later (a revision, the references' catalog
    # installed after registration) are the core's to work on as well.
    later = "ALTER DEFAULT PRIVILEGES IN SCHEMA vms GRANT"
    await conn.execute(text(f"{later} SELECT, INSERT, UPDATE, DELETE ON TABLES TO {core}"))
    await conn.execute(text(f"{later} USAGE ON SEQUENCES TO {core}"))
    await conn.execute(text(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA vms TO {core}"))
    # To name the backend that holds the snapshot horizon back (dbcore.horizon): other roles'
    # sessions in pg_stat_activity. An administrator that may not grant it leaves it out.
    await conn.execute(
        text(f"DO $$ BEGIN GRANT pg_read_all_stats TO {core} WITH INHERIT TRUE, SET FALSE; "
             "EXCEPTION WHEN insufficient_privilege THEN NULL; END $$")
    )  # fmt: skip
    # Row-level security restricts service roles to their own rows; the core role works on
    # everyone's (it claims, retries and dead-letters every service's deliveries). A policy
    # is created only where it is missing: CREATE POLICY locks the table against all access.
    for table in (await conn.execute(_RLS_TABLES)).scalars().all():
        qualified = f"vms.{quote_ident(table)}"
        await conn.execute(
            text(f"CREATE POLICY core_all ON {qualified} TO {core} USING (true) WITH CHECK (true)")
        )
