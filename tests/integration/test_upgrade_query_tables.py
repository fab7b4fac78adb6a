"""``bizcenter upgrade-query-tables`` (cli/upgrade.py) on the real broker and database: the
old workers' account tables, as their compacted changelog topics hold them, land in
PostgreSQL as the saga engine would have written them, and the engine's first replay of
``account.events`` finds them: an event applied before the upgrade changes nothing, a new
one continues the history where it was.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import text

from app.adapters.db import make_engine
from app.adapters.saga_state import PostgresSagaState
from app.child_env import child_env
from app.query_service import SEP, AccountProjection, history_key
from app.settings import Settings
from cli.upgrade import NotEmpty, copy_query_tables
from events.topics import changelog_topic
from schemas.wire import AccountEvent

pytestmark = pytest.mark.integration

#: An account id a text column cannot hold as it is (NUL) and one with a backslash.
ODD = "acc-\x00odd\\"


def _settings(kafka: str, database_url: str, name: str) -> Settings:
    return Settings(kafka_bootstrap_servers=kafka, database_url=database_url,  # type: ignore[call-arg]
                    app_id=f"{name}-worker", db_schema=f"{name}_biz", topic_partitions=3,
                    environment="development")


def _event(account: str, command: str, balance: int, second: int) -> AccountEvent:
    return AccountEvent.model_validate({
        "commandId": command, "type": "credited", "accountId": account, "amountMinor": 10,
        "balanceAfterMinor": balance, "occurredAt": f"2026-11-30T10:00:{second:02d}Z"})


@pytest_asyncio.fixture(loop_scope="session")
async def old_tables(kafka_bootstrap: str, database_url: str, isolation_id: str
                     ) -> AsyncIterator[Settings]:
    """The three changelogs as old workers left them: acc-a (partition 1) credited twice
    (two versions of its balance: the last counts), acc-gone written then deleted (a
    tombstone), ODD on partition 2."""
    settings = _settings(kafka_bootstrap, database_url, isolation_id)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    topics = {old: changelog_topic(settings, old)
              for old in ("balances", "history", "account_events_seen", "transfers")}
    try:
        await admin.create_topics([NewTopic(t, 3, 1, topic_configs={
            "cleanup.policy": "compact"}) for t in topics.values()])
    finally:
        await admin.close()
    old = AccountProjection(*(_Recorder(topics[t]) for t in (
        "balances", "history", "account_events_seen")))
    old.apply(_event("acc-a", "cmd-a1", 110, 1))
    old.apply(_event("acc-a", "cmd-a2", 120, 2))
    old.apply(_event(ODD, "cmd-o1", 7, 3))
    old.apply(_event("acc-gone", "cmd-g1", 5, 4))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for recorder in old.balances, old.history, old.seen:
            assert isinstance(recorder, _Recorder)
            for key, value in recorder.records:
                partition = 2 if key.startswith(ODD) else 1
                await producer.send_and_wait(recorder.topic, value, key=key.encode(),
                                             partition=partition)
        await producer.send_and_wait(topics["balances"], None, key=b"acc-gone", partition=1)
        for version in (b'{"state": "DEBITING", "seq": 1}', b'{"state": "COMPLETED", "seq": 2}'):
            await producer.send_and_wait(topics["transfers"], version, key=b"tr-1",
                                         partition=0)
    finally:
        await producer.stop()
    yield settings
    engine = make_engine(database_url, settings.db_schema, pool_size=1)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'))
    await engine.dispose()


class _Recorder:
    """A KeyValue that records every put, as a Faust table's changelog does."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.rows: dict[str, bytes] = {}
        self.records: list[tuple[str, bytes]] = []

    def get(self, key: str) -> bytes | None:
        return self.rows.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.rows[key] = value
        self.records.append((key, value))


async def test_the_old_tables_are_copied_and_the_engine_goes_on_from_them(
        old_tables: Settings) -> None:
    settings = old_tables
    counts = await copy_query_tables(settings)
    assert counts == {"query_balances": 2, "query_history": 4, "query_events_seen": 4,
                      "query_transfers": 1}
    engine = make_engine(settings.database_url, settings.db_schema, pool_size=2)
    try:
        async with engine.connect() as conn:
            rows = {(str(k), int(p)): bytes(v) for k, p, v in (await conn.execute(text(
                "SELECT key, home_partition, value FROM query_balances"))).all()}
        assert set(rows) == {("acc-a", 1), ("acc-\\0odd\\\\", 2)}  # stored as db_key
        assert orjson.loads(rows[("acc-a", 1)])["balanceMinor"] == 120  # the last version
        async with engine.connect() as conn:
            transfer = (await conn.execute(text(
                "SELECT value FROM query_transfers WHERE key = 'tr-1'"))).scalar_one()
        assert orjson.loads(bytes(transfer))["state"] == "COMPLETED"

        # The engine's projection over the copied rows: an event applied before the
        # upgrade (replayed from the earliest offset) changes nothing; a new one is seq 3.
        def home_of(key: str) -> int:
            return 2 if key.startswith(ODD) else 1

        state = PostgresSagaState(engine, settings.db_schema, home_of=home_of)
        await state.prefetch([], [], {
            "query_balances": ["acc-a", ODD],
            "query_events_seen": [f"acc-a{SEP}cmd-a2", f"acc-a{SEP}cmd-a3",
                                  f"{ODD}{SEP}cmd-o1"],
            "query_history": [history_key("acc-a", 2), history_key(ODD, 1)]})
        projection = AccountProjection(state.rows["query_balances"],
                                       state.rows["query_history"],
                                       state.rows["query_events_seen"])
        assert projection.apply(_event("acc-a", "cmd-a2", 120, 2)) is False
        assert projection.apply(_event(ODD, "cmd-o1", 7, 3)) is False
        assert projection.apply(_event("acc-a", "cmd-a3", 130, 5)) is True
        await state.flush()
        async with engine.connect() as conn:
            head = (await conn.execute(text(
                "SELECT value FROM query_balances WHERE key = 'acc-a'"))).scalar_one()
        assert orjson.loads(bytes(head))["seq"] == 3
    finally:
        await engine.dispose()

    # Once rows exist (the new workers started), a second copy is refused.
    with pytest.raises(NotEmpty):
        await copy_query_tables(settings)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli", "upgrade-query-tables"],
        env=child_env(settings), capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout.split(":")[0]) == (1, "refused"), done


async def test_no_old_changelog_copies_nothing(kafka_bootstrap: str, database_url: str,
                                               isolation_id: str) -> None:
    """A fresh installation (or one whose old changelogs were deleted): nothing to copy."""
    settings = _settings(kafka_bootstrap, database_url, isolation_id + "n")
    try:
        assert await copy_query_tables(settings) == {
            "query_balances": 0, "query_history": 0, "query_events_seen": 0,
            "query_transfers": 0}
    finally:
        engine = make_engine(database_url, settings.db_schema, pool_size=1)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'))
        await engine.dispose()
