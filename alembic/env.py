"""Alembic environment of vmsdb; all the work is in :func:`framework._internal.alembic_env.run_env`.

Which history runs is decided there: the core catalog (revisions in ``alembic/versions/core``,
version table ``vms.alembic_version``), or one service when ``-x service=NAME -x app=module:attr``
is given or ``vmsdb migrate`` passed the target in ``config.attributes`` (revisions beside the
service's code, version table ``<service>.alembic_version``, run under role ``vms_<service>``).
"""

from framework._internal.alembic_env import run_env

run_env()
