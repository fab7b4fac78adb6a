"""Smoke test of the whole path (issue 2): the project's own worker boots against the real
broker and creates its topics; its saga engine consumes a message an aiokafka producer
sent, saves its reply in PostgreSQL and sends it; the test reads it back. Plus an async
SQLAlchemy round trip to the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from system import System

from events.topics import TOPIC_SPECS

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("smoke"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def test_postgres_round_trip(database_url: str) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TEMP TABLE smoke (id int, note text)"))
            await conn.execute(text("INSERT INTO smoke VALUES (:i, :n)"), {"i": 7, "n": "ok"})
            row = (await conn.execute(text("SELECT id, note FROM smoke"))).one()
            version = (await conn.execute(text("SHOW server_version"))).scalar_one()
        assert tuple(row) == (7, "ok")
        assert int(version.split(".")[0]) >= 13
    finally:
        await engine.dispose()


async def test_worker_consumes_writes_its_table_and_replies(system: System) -> None:
    s = system.settings
    await system.add_user("smoke-payer", balance=0)
    await system.add_user("smoke-payee", balance=0)
    request_id = str(uuid.uuid4())
    assert system.client is not None
    envelope = system.client.envelope(
        "transferInit", "smoke-payer", system.token("smoke-payer"),
        {"toAccountId": "acc-smoke-payee", "amountMinor": 100, "currency": "USD"},
        request_id=request_id)
    await system.client.send(envelope)  # an aiokafka producer, as the gateway
    reply = await system.final(request_id, timeout=90)
    assert reply["status"] == "ok" and reply["data"]["transferToken"].count(".") == 2

    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap_servers)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
    finally:
        await admin.close()
    assert {s.topic(spec.name) for spec in TOPIC_SPECS} <= topics
    # The reply was saved (the duplicates' answer) in PostgreSQL by the saga engine's
    # flush, before it was sent.
    engine = create_async_engine(s.database_url)
    try:
        async with engine.connect() as conn:
            saved = (await conn.execute(text(
                f'SELECT count(*) FROM "{s.db_schema}".saved_replies WHERE key = :key'),  # noqa: S608
                {"key": f"smoke-payer\x1f{request_id}"})).scalar_one()
    finally:
        await engine.dispose()
    assert saved == 1, "the reply was not saved before it was sent"
