"""vmsdb's application tier: annotate services, run them as virtual microservices on one core.

Everything a user needs is importable from here; modules not listed in ``__all__`` are
implementation.
"""

from dbcore.errors import (
    ConnectionLimitReached,
    CoreError,
    IsolationError,
    LanguageError,
    LeaseConsumed,
    LeaseError,
    LeaseExpired,
    LeaseNotFound,
    LeaseReleased,
    ReadOnlyViolation,
    StatementTimeout,
)
from framework._internal.annotations import Inbound, Lease, Outbound, Query, Transactional
from framework._internal.app import App
from framework._internal.config import Settings
from framework._internal.context import connection, correlate, send, session
from framework._internal.errors import (
    AnnotationError,
    FrameworkError,
    NoTransactionError,
    RetriesExhausted,
    ServiceCallError,
    UndeclaredEventError,
)
from framework._internal.events import Event
from framework._internal.leases import (
    LeaseGrant,
    LeaseSettlement,
    consume_lease,
    consume_leases,
    release_lease,
    release_leases,
    renew_lease,
    renew_leases,
)
from framework._internal.limits import ServiceLimits
from framework._internal.service import Service, sql_function
from framework._internal.telemetry import continue_trace
from framework._internal.telemetry import traceparent as trace_context
from framework.event_sourcing import EntityEvent, EventSourced
from framework.references import (
    EntityDeleted,
    EntityNotFound,
    Ref,
    ReferenceResult,
    ServiceRecovering,
    TruncateRefused,
    delete_reference,
    get_reference,
    get_references,
    ref_column,
    referenceable,
    refresh_reference,
)

__all__ = [
    "AnnotationError",
    "App",
    "ConnectionLimitReached",
    "CoreError",
    "EntityDeleted",
    "EntityEvent",
    "EntityNotFound",
    "Event",
    "EventSourced",
    "FrameworkError",
    "Inbound",
    "IsolationError",
    "LanguageError",
    "Lease",
    "LeaseConsumed",
    "LeaseError",
    "LeaseExpired",
    "LeaseGrant",
    "LeaseNotFound",
    "LeaseReleased",
    "LeaseSettlement",
    "NoTransactionError",
    "Outbound",
    "Query",
    "ReadOnlyViolation",
    "Ref",
    "ReferenceResult",
    "RetriesExhausted",
    "Service",
    "ServiceCallError",
    "ServiceLimits",
    "ServiceRecovering",
    "Settings",
    "StatementTimeout",
    "Transactional",
    "TruncateRefused",
    "UndeclaredEventError",
    "connection",
    "consume_lease",
    "consume_leases",
    "continue_trace",
    "correlate",
    "delete_reference",
    "get_reference",
    "get_references",
    "ref_column",
    "referenceable",
    "refresh_reference",
    "release_lease",
    "release_leases",
    "renew_lease",
    "renew_leases",
    "send",
    "session",
    "sql_function",
    "trace_context",
]
