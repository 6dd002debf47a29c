"""An idle open transaction (issue 15, finding 9): Postgres ends a service's session that idles
inside its transaction (``idle_in_transaction_session_timeout`` on the service's role, from
``Settings.idle_transaction_timeout``), and while another transaction holds the snapshot horizon
back, the dispatcher warns and names its backend."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.pool import NullPool

from framework import Event, Inbound, Service, Transactional, session


class Ping(Event, key="key"):
    key: str


class Idler(Service, name="idler"):
    @Transactional(type="RW")
    async def write_then_idle(self, key: str, seconds: float) -> None:
        session().add(Row(key=key))
        await session().flush()
        await asyncio.sleep(seconds)  # idle inside the open transaction
        await session().execute(select(Row.key))

    @Inbound(Ping)
    @Transactional(type="RW")
    async def on_ping(self, ping: Ping) -> None:
        session().add(Row(key=ping.key))

    @Transactional(type="RO")
    async def keys(self) -> list[str]:
        return list((await session().execute(select(Row.key).order_by(Row.key))).scalars())


class Row(Idler.Model):
    __tablename__ = "rows"
    key: Mapped[str] = mapped_column(primary_key=True)


async def test_a_service_session_idle_in_its_transaction_is_ended(vmsdb_app_factory) -> None:
    async with vmsdb_app_factory([Idler], idle_transaction_timeout=0.3) as app:
        async with app.core.admin() as conn:
            setting = (
                await conn.execute(
                    text(
                        "SELECT unnest(setconfig) FROM pg_db_role_setting s JOIN pg_roles r "
                        "ON r.oid = s.setrole WHERE r.rolname = 'vms_idler' "
                        "AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                )
            ).scalars().all()
        assert "idle_in_transaction_session_timeout=300ms" in setting
        with pytest.raises(Exception):  # noqa: B017  # the session is gone; how it says so varies
            await app.service(Idler).write_then_idle("k1", 1.5)
        assert await app.service(Idler).keys() == []  # rolled back; the pool works on
        await app.service(Idler).write_then_idle("k2", 0.0)
        assert await app.service(Idler).keys() == ["k2"]


async def test_a_horizon_held_back_is_reported_naming_the_backend(
    vmsdb_app_factory, vmsdb_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vmsdb.delivery")
    async with vmsdb_app_factory([Idler], horizon_warning=0.3) as app:
        blocker = create_async_engine(
            vmsdb_database,
            poolclass=NullPool,
            connect_args={"server_settings": {"application_name": "forgotten-console"}},
        )
        try:
            async with blocker.connect() as conn:
                await conn.execute(text("SELECT pg_current_xact_id()"))  # BEGIN; takes an xid
                pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await app.publish(Ping(key="p1"))
                deadline = time.monotonic() + 20
                while not any("forgotten-console" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "no warning about the open transaction"
                    await asyncio.sleep(0.1)
                assert await app.service(Idler).keys() == []  # held back behind it
                await conn.rollback()
        finally:
            await blocker.dispose()
        [warning] = [r.getMessage() for r in caplog.records if "forgotten-console" in r.getMessage()]
        assert f"pid {pid}" in warning and "idler" in warning
        await app.drain()
        assert await app.service(Idler).keys() == ["p1"]
