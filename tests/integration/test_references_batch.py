"""G9: many references in one statement (``get_references``), on the real core.

A batch counts each entity it references once, in one statement however many; a gone entity is
an answer in its place, not an error, so the caller's transaction goes on without a savepoint;
the entities are locked in URI order, so concurrent batches in opposite orders do not deadlock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Mapped, mapped_column

from dbcore import references as core_references
from framework import (
    App,
    EntityDeleted,
    EntityNotFound,
    Ref,
    ReferenceResult,
    Service,
    ServiceRecovering,
    Transactional,
    get_reference,
    get_references,
    session,
)
from framework.references import install, ref_column, referenceable, uri_of

from .statements import statements_sent

T = TypeVar("T")


class Library(Service, name="library"):
    @Transactional
    async def put(self, isbn: str, title: str, shelf: int = 1) -> None:
        session().add(Book(isbn=isbn, title=title, shelf=shelf))

    @Transactional
    async def remove(self, isbn: str) -> None:
        row = await session().get(Book, isbn)
        assert row is not None
        await session().delete(row)


@referenceable
class Book(Library.Model):
    __tablename__ = "books"
    isbn: Mapped[str] = mapped_column(primary_key=True)
    title: Mapped[str]
    shelf: Mapped[int]


class Reader(Service, name="reader"):
    @Transactional
    async def borrow(self, loan: str, isbn: str) -> Ref:
        ref = await get_reference(Book, isbn)
        session().add(Loan(id=loan, book=ref))
        return ref

    @Transactional
    async def run(self, body: Callable[[], Awaitable[T]]) -> T:
        return await body()


class Loan(Reader.Model):
    __tablename__ = "loans"
    id: Mapped[str] = mapped_column(primary_key=True)
    book: Mapped[Ref | None] = ref_column(Book)


@pytest.fixture
async def app(vmsdb_app_factory):  # type: ignore[no-untyped-def]
    async with vmsdb_app_factory([Library, Reader]) as started:
        await install(started)
        for isbn, title in [("b1", "Emma"), ("b2", "Ulysses"), ("b3", "Middlemarch")]:
            await started.service(Library).put(isbn, title)
        yield started


async def counts(app: App) -> dict[str, int]:
    """Each entity's ``d``, by the last part of its URI."""
    async with app.core.admin() as conn:
        rows = await conn.execute(text("SELECT uri, d FROM vms.entities WHERE service = 'library'"))
        return {uri.rsplit("/", 1)[1]: d for uri, d in rows}


async def test_a_batch_counts_every_entity_once_in_one_statement(app: App) -> None:
    async def take() -> tuple[list[ReferenceResult], list[str]]:
        with statements_sent() as sent:
            taken = await get_references([(Book, "b1"), (Book, ("b2",)), uri_of(Book, "b3")], copy=True)
        return taken, sent

    taken, sent = await app.service(Reader).run(take)
    assert len(sent) == 1 and "vms.get_references" in sent[0], sent
    assert all(t.taken and t.ref is not None and t.error() is None for t in taken)
    assert [t.uri for t in taken] == [uri_of(Book, i) for i in ("b1", "b2", "b3")]
    assert [t.ref.copy for t in taken if t.ref] == [
        {"isbn": "b1", "title": "Emma", "shelf": 1},
        {"isbn": "b2", "title": "Ulysses", "shelf": 1},
        {"isbn": "b3", "title": "Middlemarch", "shelf": 1},
    ]
    assert await counts(app) == {"b1": 1, "b2": 1, "b3": 1}
    async with app.core.admin() as conn:  # counted for the service that took them
        holders = await conn.execute(text("SELECT DISTINCT holder FROM vms.entity_holders"))
        assert holders.scalars().all() == ["reader"]


async def test_answers_come_back_in_the_callers_order(app: App) -> None:
    """The core takes them in URI order; the caller gets them in its own, twice means twice."""
    order = ["b3", "b1", "b2", "b1"]
    taken = await app.service(Reader).run(lambda: get_references([(Book, i) for i in order]))
    assert [t.uri for t in taken] == [uri_of(Book, i) for i in order]
    assert [t.ref.uri for t in taken if t.ref] == [uri_of(Book, i) for i in order]
    assert await counts(app) == {"b1": 2, "b2": 1, "b3": 1}


async def test_refusals_are_answers_and_the_transaction_goes_on(app: App) -> None:
    await app.service(Reader).borrow("kept", "b2")
    await app.service(Library).remove("b2")  # referenced: a tombstone with d = 1
    assert await counts(app) == {"b1": 0, "b2": 1, "b3": 0}

    async def take_then_write() -> tuple[list[ReferenceResult], list[str]]:
        with statements_sent() as sent:
            taken = await get_references([(Book, "b2"), (Book, "nobody"), (Book, "b1")])
            session().add(Loan(id="after", book=taken[2].ref))  # the transaction is usable
            await session().flush()
        return taken, sent

    taken, sent = await app.service(Reader).run(take_then_write)
    assert not any("SAVEPOINT" in s.upper() for s in sent), sent
    assert [(t.refusal, t.ref is None) for t in taken] == [
        ("deleted", True),
        ("not_found", True),
        (None, False),
    ]
    assert [type(t.error()) for t in taken] == [EntityDeleted, EntityNotFound, type(None)]
    with pytest.raises(EntityDeleted, match=f"entity {uri_of(Book, 'b2')} was deleted"):
        taken[0].raise_if_refused()
    with pytest.raises(EntityNotFound, match=f"no referenceable entity {uri_of(Book, 'nobody')}"):
        taken[1].raise_if_refused()
    taken[2].raise_if_refused()  # taken: nothing to raise
    # Only the one taken counted: the tombstone keeps its d, the missing one has no entity.
    assert await counts(app) == {"b1": 1, "b2": 1, "b3": 0}
    async with app.core.admin() as conn:
        stored = await conn.execute(text("SELECT book->>'uri' FROM reader.loans WHERE id = 'after'"))
        assert stored.scalar_one() == uri_of(Book, "b1")


async def test_a_copy_with_a_column_list_is_projected(app: App) -> None:
    """Each target may copy otherwise than the batch's default: columns (plus the key), the
    whole row, or nothing."""
    targets: list[Any] = [(Book, "b1", ["title"]), (Book, "b2"), (Book, "b3", True), (Book, "b1", [])]
    taken = await app.service(Reader).run(lambda: get_references(targets, copy=False))
    assert [t.ref.copy if t.ref else "refused" for t in taken] == [
        {"isbn": "b1", "title": "Emma"},
        None,
        {"isbn": "b3", "title": "Middlemarch", "shelf": 1},
        {"isbn": "b1"},
    ]


async def test_a_recovering_owner_refuses_the_whole_batch(app: App) -> None:
    """Recovery in consistency mode is a state of the owner, not of one entity: raised, as
    ``get_reference`` raises it, and nothing is counted."""
    async with app.core.admin() as conn:
        await conn.execute(
            text("UPDATE vms.ref_services SET recovering = 'consistency' WHERE service = 'library'")
        )
    try:
        with pytest.raises(ServiceRecovering):
            await app.service(Reader).run(lambda: get_references([(Book, "b1"), (Book, "b2")]))
    finally:
        async with app.core.admin() as conn:
            await conn.execute(
                text("UPDATE vms.ref_services SET recovering = NULL WHERE service = 'library'")
            )
    assert await counts(app) == {"b1": 0, "b2": 0, "b3": 0}


async def waiting_for_a_lock(app: App, timeout: float = 10.0) -> None:
    """Until some session of this database waits for a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with app.core.admin() as conn:
            waiting = await conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiting.scalar_one():
                return
        await asyncio.sleep(0.01)
    raise TimeoutError("no session waits for a lock")


async def test_two_batches_in_opposite_orders_do_not_deadlock(app: App) -> None:
    """The first transaction holds b1 and then wants b2; the second asks for b2, b1 meanwhile.
    Taken in the caller's order, the second would hold b2 and wait for b1: a deadlock, which
    Postgres breaks by aborting one. In URI order it waits for b1 holding nothing."""
    b1, b2 = uri_of(Book, "b1"), uri_of(Book, "b2")

    async def second() -> list[ReferenceResult]:
        async with app.core.transaction("reader") as conn:
            return await core_references.get_references(conn, [b2, b1])

    async with app.core.transaction("reader") as conn:
        await core_references.get_references(conn, [b1])
        other = asyncio.create_task(second())
        await waiting_for_a_lock(app)
        first = await asyncio.wait_for(core_references.get_references(conn, [b1, b2]), 20)
    answered = await asyncio.wait_for(other, 20)
    assert all(t.taken for t in first + answered)
    assert [t.uri for t in answered] == [b2, b1]
    assert await counts(app) == {"b1": 3, "b2": 2, "b3": 0}
