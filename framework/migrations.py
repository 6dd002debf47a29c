"""Schema migrations with alembic: the core catalog and every service's schema, each its own history.

- **The core catalog** (schema ``vms``): revisions in ``alembic/versions/core`` (installed as the
  package ``vmsdb_alembic``), version table ``vms.alembic_version``, run as the administrator.
- **A service**: revisions in ``<directory of the module defining the class>/migrations/<service>/``
  (or the directory its class names in ``__migrations__``, relative to that module), version table
  ``<service>.alembic_version``. They run under the service's role, so what they create is owned by
  the service and isolated like the rest of its schema; in the same transaction exported tables are
  granted read-only to the other services.

Each history migrates in one transaction that first takes the core's install lock: concurrent
starts run one after the other, and the second finds the work done. A failing revision rolls the
whole run of its history back (Postgres DDL is transactional), and :class:`MigrationError` names
the service and the revision.

```python
await migrate(app)                       # core, then every service, to head
problems = await check_at_head(app)      # [] when everything is at head
```
"""

from framework._internal.alembic_env import run_env
from framework._internal.migrations import (
    MigrationError,
    MigrationResult,
    MigrationStatus,
    MigrationTarget,
    SchemaNotAtHead,
    check_at_head,
    core_target,
    current,
    downgrade,
    ensure_at_head,
    migrate,
    migrations_dir,
    revision,
    stamp,
    targets_of,
)

__all__ = [
    "MigrationError",
    "MigrationResult",
    "MigrationStatus",
    "MigrationTarget",
    "SchemaNotAtHead",
    "check_at_head",
    "core_target",
    "current",
    "downgrade",
    "ensure_at_head",
    "migrate",
    "migrations_dir",
    "revision",
    "run_env",
    "stamp",
    "targets_of",
]
