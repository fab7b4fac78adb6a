"""``bizcenter upgrade-query-tables``: the query tables of the workers before issue 13's saga
engine (the Faust tables ``balances``, ``history``, ``account_events_seen``, ``transfers``)
copied into PostgreSQL (``query_balances``, ``query_history``, ``query_events_seen``,
``query_transfers``), once, before the first start of the new workers (docs/operations.md,
"Upgrade"). A transfer's row keeps the partition of its changelog record (its transfer id's)
as home partition until its saga next writes it (then the saga's).

The old tables live on in their changelog topics (``<BIZ_APP_ID>-<table>-changelog``,
compacted, keyed by the table's key, one partition per account partition): each is read
from its beginning to its end as of the start, the last value of each key kept (a
tombstone, no value, drops the key), and written with the record's partition as the row's
home partition, keys escaped as the engine's (``db_key``), values byte for byte. The seen
marks come along, so the engine's first read of ``account.events`` from the earliest
retained offset applies only the events the old workers never applied, and every balance,
history entry and cursor handed out before stays as it was.

Refused (exit 1) when the PostgreSQL tables already hold rows: the new engine's rows
numbered the history from what it read, and mixing two numberings would be wrong. Exit 2
when Kafka or PostgreSQL cannot be read; nothing is written then.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.adapters.db import bare_connection, make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.adapters.saga_state import db_key
from app.settings import Settings
from events.topics import changelog_topic

log = logging.getLogger(__name__)

#: The old Faust table → its PostgreSQL table.
TABLES = {
    "balances": "query_balances",
    "history": "query_history",
    "account_events_seen": "query_events_seen",
    "transfers": "query_transfers",
}
_INSERT = {
    "query_balances": "INSERT INTO query_balances (key, home_partition, value)"
                      " SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])",
    "query_history": "INSERT INTO query_history (key, home_partition, value)"
                     " SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])",
    "query_events_seen": "INSERT INTO query_events_seen (key, home_partition, value)"
                         " SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])",
    "query_transfers": "INSERT INTO query_transfers (key, home_partition, value)"
                       " SELECT * FROM unnest($1::text[], $2::int[], $3::bytea[])",
}
_ANY_ROW = ("SELECT EXISTS (SELECT 1 FROM query_balances) OR EXISTS (SELECT 1 FROM"
            " query_history) OR EXISTS (SELECT 1 FROM query_events_seen) OR EXISTS"
            " (SELECT 1 FROM query_transfers)")
#: Rows per INSERT.
CHUNK = 5_000


class NotEmpty(Exception):
    """The PostgreSQL query tables already hold rows."""


async def read_changelog(bootstrap: str, topic: str) -> dict[str, tuple[int, bytes]]:
    """key → (partition, last value) of a compacted changelog, from its beginning to its end
    as of now; a tombstone drops its key. An absent topic is empty."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        rows: dict[str, tuple[int, bytes]] = {}
        if not tps:
            return rows
        ends = await consumer.end_offsets(tps)
        behind = [tp for tp in tps if ends[tp] > 0]
        if not behind:
            return rows
        consumer.assign(behind)
        await consumer.seek_to_beginning(*behind)
        while behind:
            batch = await consumer.getmany(*behind, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    key = bytes(r.key or b"").decode("utf-8")
                    if r.value is None:
                        rows.pop(key, None)
                    else:
                        rows[key] = (tp.partition, bytes(r.value))
            behind = [tp for tp in behind if await consumer.position(tp) < ends[tp]]
        return rows
    finally:
        await consumer.stop()


async def copy_query_tables(settings: Settings) -> dict[str, int]:
    """Copy the three old changelogs into the PostgreSQL tables, in one transaction; the
    number of rows per PostgreSQL table. :class:`NotEmpty` when they hold rows already."""
    read = {pg: await read_changelog(settings.kafka_bootstrap_servers,
                                     changelog_topic(settings, old))
            for old, pg in TABLES.items()}
    engine = make_engine(settings.database_url, settings.db_schema, pool_size=1)
    try:
        await PostgresBusinessStore(engine, settings.db_schema).migrate()
        async with bare_connection(engine) as raw, raw.transaction():
            if await raw.fetchval(_ANY_ROW):
                raise NotEmpty("the PostgreSQL query tables already hold rows: the new "
                               "workers have started; nothing copied")
            for table, rows in read.items():
                items = sorted(rows.items())
                for start in range(0, len(items), CHUNK):
                    chunk = items[start:start + CHUNK]
                    await raw.execute(_INSERT[table], [db_key(k) for k, _ in chunk],
                                      [p for _, (p, _v) in chunk],
                                      [v for _, (_p, v) in chunk])
    finally:
        await engine.dispose()
    return {table: len(rows) for table, rows in read.items()}


def cmd_upgrade_query_tables(settings: Settings, args: argparse.Namespace) -> int:
    try:
        counts = asyncio.run(copy_query_tables(settings))
    except NotEmpty as exc:
        print(f"refused: {exc}")
        return 1
    except Exception as exc:  # Kafka or PostgreSQL unreadable: nothing written
        print(f"failed ({type(exc).__name__}): nothing copied")
        log.debug("upgrade-query-tables failed", exc_info=True)
        return 2
    print("copied: " + ", ".join(f"{table} {n}" for table, n in counts.items()))
    return 0


def add_parser(sub: Any) -> None:
    sub.add_parser(
        "upgrade-query-tables",
        help="copy the old workers' account tables (Faust changelogs) into PostgreSQL, once",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    ).set_defaults(fn=cmd_upgrade_query_tables)
