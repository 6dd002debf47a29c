"""Executing service functions: transactions, retries, joining, and handles to other services.

One ``ServiceRuntime`` per service of a running App. Every annotated call lands in
:meth:`ServiceRuntime.call`, which reads the call plan built at start-up and runs the function in
its transaction; nothing here inspects signatures or decorators per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection

from dbcore.delivery import Claimed, GroupAck
from dbcore.errors import ServiceRecovering, TransactionConflict
from dbcore.eventlog import EventRecord
from dbcore.isolation import CommitStatement
from dbcore.query_language import bind_values
from dbcore.translate import translated
from framework._internal import epochs, telemetry
from framework._internal.annotations import FunctionSpec, TransactionalSpec
from framework._internal.context import TxContext, bind, correlation, current, unbind
from framework._internal.errors import RetriesExhausted, ServiceCallError
from framework._internal.events import Event
from framework._internal.limits import Slots
from framework._internal.outbox import OutboxCommit, records_of
from framework._internal.results import convert_rows
from framework._internal.service import Service

if TYPE_CHECKING:
    from framework._internal.descriptors import CallPlan, ServicePlan
    from framework._internal.host import Host
    from framework._internal.leases import LeaseExecutor

__all__ = ["ServiceHandle", "ServiceRuntime", "backoff_delay"]

log = logging.getLogger("vmsdb.transactions")


#: What a service without ``ServiceLimits(concurrency=)`` waits for: nothing.
_NO_LIMIT = contextlib.nullcontext()


def backoff_delay(attempt: int, *, base: float = 0.005, cap: float = 0.5) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))


class ServiceRuntime:
    """Runs one service's functions against the core."""

    def __init__(self, host: Host, plan: ServicePlan, leases: LeaseExecutor) -> None:
        self.host = host
        self.leases = leases
        self.plan = plan
        self.name = plan.descriptor.name
        self.instance: Service = plan.cls()
        self.instance._vms_runtime = self  # type: ignore[attr-defined]
        self._calls: dict[FunctionSpec, CallPlan] = {c.spec: c for c in plan.calls.values()}
        # ServiceLimits(concurrency=): shared with the handler workers, which take a slot
        # before they check out a connection for one of this service's deliveries.
        concurrency = plan.descriptor.limits.concurrency
        self.slots: Slots | None = None if concurrency is None else Slots(concurrency)

    def call(
        self,
        spec: FunctionSpec,
        wrapped: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Awaitable[Any]:
        call = self._calls.get(spec)
        if call is None:
            raise ServiceCallError(
                f"{spec.qualname} is not one of the annotated functions the App found on service "
                f"{self.name!r} at start-up (it is overridden in a subclass, or defined on a class "
                "that is not a Service); annotate the function the service class itself exposes"
            )
        called = self._call(call, wrapped, args, kwargs)
        return called if telemetry.tracer is None else telemetry.traced_call(called, self.name, call)

    def _call(
        self, call: CallPlan, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        if call.query is not None:
            self.refuse_while_recovering()
            epochs.refuse_recovering_owners(self.host, self.name, call.query)
            return self._run_query(call, args, kwargs)
        if call.spec.lease is not None:
            self.refuse_while_recovering()
            return self.leases.call(self.name, self.instance, call, args, kwargs, self.slots)
        return self.run(call, wrapped, args, kwargs)

    def refuse_while_recovering(self) -> None:
        """Raise ``ServiceRecovering`` while this service recovers in consistency mode (G10)."""
        if self.name in self.host.recovering:
            raise ServiceRecovering(
                f"service {self.name!r} is recovering in consistency mode: it serves nothing, "
                "reads included, until every holder of its references has answered (or the "
                "recovery times out)"
            )

    async def run(
        self,
        call: CallPlan,
        wrapped: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        connection: AsyncConnection | None = None,
        before_commit: CommitStatement | None = None,
    ) -> Any:
        """Run ``wrapped`` in its transaction, retrying serialization failures and deadlocks.

        ``connection`` and ``before_commit`` are for the event dispatcher: its worker's
        connection, and the delivery's acknowledgement, sent with ``COMMIT`` (so it commits with
        the handler's effects, G4, at no extra round trip).
        """
        outer = current()
        if outer is not None:
            return await self._join(outer, call, wrapped, args, kwargs)
        self.refuse_while_recovering()
        tx = call.tx
        if tx is None:
            return await wrapped(*args, **kwargs)
        if correlation_id is None:
            correlation_id = correlation.get()
        spec = call.spec
        # Wait for a slot (ServiceLimits(concurrency=)) before checking out a connection:
        # waiting calls hold none. A handler's worker took its slot already.
        slot = self.slots.held() if self.slots is not None and connection is None else _NO_LIMIT
        async with slot:
            attempt = 1
            while True:
                try:
                    with translated(self.name, self.host.core.table_owners, self.host.core.limits):
                        return await self._attempt(
                            call,
                            tx,
                            wrapped,
                            args,
                            kwargs,
                            correlation_id,
                            causation_id,
                            connection,
                            before_commit,
                        )
                except TransactionConflict as conflict:
                    self.host.metrics.inc("transaction_conflicts", service=self.name, function=spec.name)
                    if attempt >= tx.max_attempts:
                        self.host.metrics.inc("transaction_failures", service=self.name, function=spec.name)
                        raise RetriesExhausted(spec.qualname, attempt, conflict) from conflict
                    delay = backoff_delay(attempt)
                    log.info(
                        "%s: attempt %d of %d conflicted (%s), retrying in %.1f ms",
                        spec.qualname,
                        attempt,
                        tx.max_attempts,
                        conflict.kind,
                        delay * 1000,
                    )
                    self.host.metrics.inc(
                        "transaction_retries", service=self.name, function=spec.name, cause=conflict.kind
                    )
                    attempt += 1
                    await asyncio.sleep(delay)

    async def _attempt(
        self,
        call: CallPlan,
        tx: TransactionalSpec,
        wrapped: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        correlation_id: str | None,
        causation_id: str | None,
        connection: AsyncConnection | None,
        before_commit: CommitStatement | None,
    ) -> Any:
        spec = call.spec
        read_only = tx.type == "RO"
        commit = OutboxCommit(before_commit, self.host.handoff)  # the outbox travels with COMMIT
        async with self.host.core.transaction(
            self.name,
            isolation=tx.isolation,
            read_only=read_only and not self.host.amnesia,  # reads in amnesia write (epochs.py)
            connection=connection,
            before_commit=commit,
        ) as conn:
            ctx = self._context(call, conn, correlation_id, causation_id)
            async with _bound(ctx):
                reads = epochs.track(self.host, ctx)
                result = await wrapped(*args, **kwargs)
                await _returned(ctx, result)
                if reads is not None:
                    await epochs.record(self.host, ctx, reads)
                if ctx.outbox:
                    await commit.write(conn, ctx)
        commit.hand_off()
        epochs.settle(self.host, reads)
        self.host.metrics.inc("transactions", service=self.name, function=spec.name)
        return result

    async def run_group(
        self, call: CallPlan, events: list[tuple[Claimed, Event]], connection: AsyncConnection
    ) -> None:
        """Run ``call``'s handler for each delivery of ``events``, one after another, in one
        transaction on ``connection``, and acknowledge them all with its ``COMMIT``
        (``@Inbound(group_commit=)``). Each event's ``send()`` carries that event's
        correlation and causation, as if it ran alone. Raises whatever ends the transaction
        (nothing is committed then): the caller runs each event again on its own."""
        tx = call.tx
        assert tx is not None
        spec = call.spec
        commit = OutboxCommit(GroupAck([item for item, _ in events]), self.host.handoff)
        outbox: list[EventRecord] = []
        with translated(self.name, self.host.core.table_owners, self.host.core.limits):
            async with self.host.core.transaction(
                self.name,
                isolation=tx.isolation,
                read_only=tx.type == "RO",
                connection=connection,
                before_commit=commit,
            ) as conn:
                for item, event in events:
                    ctx = self._context(call, conn, item.correlation_id, str(item.event_id))
                    async with _bound(ctx):
                        with telemetry.delivery_context(item):
                            result = await spec.function(self.instance, event)
                        await _returned(ctx, result)
                    outbox.extend(records_of(ctx))
                if outbox:
                    await commit.write_records(conn, outbox)
        commit.hand_off()
        self.host.metrics.inc("transactions", len(events), service=self.name, function=spec.name)

    def _context(
        self, call: CallPlan, conn: AsyncConnection, correlation_id: str | None, causation_id: str | None
    ) -> TxContext:
        """The context of one run of ``call``'s function in the transaction on ``conn``."""
        assert call.tx is not None
        return TxContext(
            service=self.name,
            function=call.spec.qualname,
            connection=conn,
            read_only=call.tx.type == "RO",
            allowed=call.allowed_events,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )

    async def _join(
        self,
        outer: TxContext,
        call: CallPlan,
        wrapped: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> Any:
        """A nested call of the same service joins the running transaction."""
        spec = call.spec
        if outer.service != self.name:
            raise ServiceCallError(
                f"{spec.qualname} (service {self.name!r}) was called inside a transaction of "
                f"service {outer.service!r} ({outer.function}); a transaction belongs to one "
                "service: send an event, or call the other service's @Lease/@Query through a "
                "handle"
            )
        saved = outer.allowed, outer.function
        outer.allowed, outer.function = call.allowed_events, spec.qualname
        try:
            result = await wrapped(*args, **kwargs)
            if isinstance(result, Event):
                outer.send(result)
            return result
        finally:
            outer.allowed, outer.function = saved

    async def _run_query(self, call: CallPlan, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
        """Run a compiled @Query in the caller's transaction, or in its own snapshot."""
        compiled, statement = call.query, call.statement
        assert compiled is not None and statement is not None
        bound = call.spec.signature.bind(self.instance, *args, **kwargs)
        bound.apply_defaults()
        values = bind_values(compiled, bound.arguments)
        ctx, amnesia = current(), bool(self.host.amnesia)
        if ctx is not None:
            rows = (await ctx.connection.execute(statement, values)).mappings().all()
            if amnesia:  # the owners' emptied amnesia is settled by the caller's next reads
                await epochs.record_query_reads(self.host, ctx.connection, compiled)
        else:
            slot = self.slots.held() if self.slots is not None else _NO_LIMIT
            async with slot:
                with translated(self.name, self.host.core.table_owners, self.host.core.limits):
                    async with self.host.core.transaction(
                        self.name, isolation="snapshot", read_only=not amnesia
                    ) as conn:
                        rows = (await conn.execute(statement, values)).mappings().all()
                        emptied = (
                            await epochs.record_query_reads(self.host, conn, compiled) if amnesia else set()
                        )
            self.host.amnesia.difference_update(emptied)
        return convert_rows(call.row_type, list(rows))


@contextlib.asynccontextmanager
async def _bound(ctx: TxContext) -> AsyncIterator[None]:
    """``ctx`` is the running transaction's context (``session()``, ``send()``) for the block;
    its session, if the function opened one, is closed after it."""
    token = bind(ctx)
    try:
        yield
    finally:
        unbind(token)
        if ctx.has_session:
            await ctx.session.close()


async def _returned(ctx: TxContext, result: object) -> None:
    """What a function's return adds to its transaction: a returned ``Event`` is sent, and the
    session's pending changes are flushed."""
    if isinstance(result, Event):
        ctx.send(result)
    if ctx.has_session:
        await ctx.session.flush()


class ServiceHandle:
    """What ``stock: Stock`` becomes on a ``Cart``: the other service's API, and nothing else."""

    __slots__ = ("_owner", "_target")

    def __init__(self, owner: str, target: ServiceRuntime) -> None:
        self._owner = owner
        self._target = target

    def __getattr__(self, name: str) -> Any:
        target = self._target
        call = target.plan.calls.get(name)
        if call is None or (call.spec.lease is None and call.spec.query is None):
            raise AttributeError(
                f"service {self._owner!r} may call only the @Lease and @Query functions of "
                f"service {target.name!r}, and {name!r} is not one; send an event to ask for "
                "anything else"
            )
        return getattr(target.instance, name)

    def __repr__(self) -> str:
        return f"<handle to service {self._target.name} from {self._owner}>"
