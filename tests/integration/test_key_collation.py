"""Every text column that an index orders or a foreign key compares is in byte order
(``COLLATE "C"``), in the business center's schema (app/adapters/postgres_store.py ``DDL``)
and the reference ledger's (reference/account_center/ledger.py ``DDL``), whatever the
database's locale: a fresh schema has it, and a schema made by an earlier version (its
columns in the database's collation) is moved by the next migration (``ensure_schema``)
without rewriting a table, keeping its rows, its unique keys and its statistics; a later
migration touches none of it again. Against the real PostgreSQL of ``make up``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.db import bare_connection, ensure_schema, make_engine
from app.adapters.postgres_store import DDL as BUSINESS_DDL
from reference.account_center.ledger import DDL as LEDGER_DDL

pytestmark = pytest.mark.integration

#: Every collatable key column of an index in ``schema``: (index, column, collation name),
#: as the index itself compares it.
_INDEXED = """
SELECT ic.relname, a.attname, co.collname
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indcollation::oid[]) AS k (attnum, coll)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
JOIN pg_collation co ON co.oid = k.coll
WHERE n.nspname = $1 AND k.coll <> 0
ORDER BY 1, 2
"""
#: A column's own collation.
_COLUMN = """
SELECT co.collname FROM pg_attribute a JOIN pg_collation co ON co.oid = a.attcollation
WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass AND a.attname = $3
"""
#: The schema's tables or indexes: name → (oid, file).
_RELATIONS = """
SELECT c.relname, c.oid, c.relfilenode FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind::text = $2
"""
_STATISTICS = "SELECT count(*) FROM pg_stats WHERE schemaname = $1 AND tablename = $2"


@pytest_asyncio.fixture(loop_scope="session")
async def engines(database_url: str, isolation_id: str,
                  ) -> AsyncIterator[Callable[[str], AsyncEngine]]:
    """An engine per schema (the DDL runs in the engine's search_path); every schema
    dropped at the end."""
    made: dict[str, AsyncEngine] = {}

    def engine(suffix: str) -> AsyncEngine:
        schema = f"{isolation_id}_{suffix}"
        if schema not in made:
            made[schema] = make_engine(database_url, schema, pool_size=1)
        return made[schema]

    yield engine
    for schema, made_engine in made.items():
        async with made_engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await made_engine.dispose()


def _before(ddl: str) -> str:
    """The DDL as an earlier version had it: every column in the database's collation."""
    return ddl.replace(' COLLATE "C"', "")


async def _made_by_an_earlier_version(engine: AsyncEngine, schema: str, ddl: str) -> None:
    """The schema as an earlier version's migration left it: ``_before(ddl)``'s statements
    run as they are (that version had no step moving columns to byte order)."""
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        for statement in (s.strip() for s in _before(ddl).split(";")):
            if statement:
                await conn.execute(text(statement))


async def _indexed(engine: AsyncEngine, schema: str) -> list[tuple[str, str, str]]:
    async with bare_connection(engine) as raw:
        return [tuple(row) for row in await raw.fetch(_INDEXED, schema)]


async def _column(engine: AsyncEngine, schema: str, table: str, column: str) -> str:
    async with bare_connection(engine) as raw:
        return str(await raw.fetchval(_COLUMN, schema, table, column))


async def _relations(engine: AsyncEngine, schema: str, kind: str) -> dict[str, tuple[int, int]]:
    async with bare_connection(engine) as raw:
        return {row[0]: (row[1], row[2]) for row in await raw.fetch(_RELATIONS, schema, kind)}


async def _statistics(engine: AsyncEngine, schema: str, table: str) -> int:
    async with bare_connection(engine) as raw:
        return int(await raw.fetchval(_STATISTICS, schema, table))


def test_the_earlier_ddls_have_no_byte_order() -> None:
    """The stand-ins for an earlier version really are in the database's collation, and
    the DDLs declare byte order where they should."""
    for ddl in (BUSINESS_DDL, LEDGER_DDL):
        assert 'COLLATE "C"' in ddl
        assert "COLLATE" not in _before(ddl)


@pytest.mark.parametrize(("suffix", "ddl", "expected"), [
    ("biz", BUSINESS_DDL, {("sagas_pkey", "transfer_id"), ("sagas_state_idx", "state"),
                           ("idempotency_records_pkey", "idempotency_key"),
                           ("transfer_token_uses_pkey", "jti"), ("saved_replies_pkey", "key"),
                           ("query_history_pkey", "key"), ("users_account_id_key", "account_id")}),
    ("ledger", LEDGER_DDL, {("accounts_pkey", "account_id"),
                            ("journal_command_id_idx", "command_id"),
                            ("processed_commands_pkey", "command_id"),
                            ("processed_commands_transfer_id_idx", "transfer_id")}),
])
async def test_a_fresh_schema_orders_every_text_key_by_bytes(
        engines: Callable[[str], AsyncEngine], isolation_id: str, suffix: str, ddl: str,
        expected: set[tuple[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    """The DDL itself declares byte order: the migration's step finds nothing to move (a
    column it had to move on a fresh schema would be locked and rebuilt at some later
    migration of a big table instead)."""
    schema, engine = f"{isolation_id}_{suffix}", engines(suffix)
    with caplog.at_level(logging.WARNING, logger="app.adapters.db"):
        await ensure_schema(engine, schema, ddl)
    assert [r.getMessage() for r in caplog.records if "byte order" in r.getMessage()] == []
    indexed = await _indexed(engine, schema)
    assert expected <= {(index, column) for index, column, _ in indexed}
    assert [entry for entry in indexed if entry[2] != "C"] == []
    if suffix == "biz":  # a foreign key's column compares as its key does
        assert await _column(engine, schema, "funding_sources", "user_id") == "C"


@pytest.mark.parametrize(("suffix", "ddl", "table", "key", "row"), [
    ("biz_old", BUSINESS_DDL, "idempotency_records", ("operator_id", "idempotency_key"),
     "INSERT INTO idempotency_records (operator_id, idempotency_key, fingerprint, transfer_id,"
     " attempt) VALUES ($1, $2, 'f', 't', 'a')"),
    ("ledger_old", LEDGER_DDL, "processed_commands", ("command_id",),
     "INSERT INTO processed_commands (command_id, transfer_id, type, account_id, result)"
     " VALUES ($1, 't', 'debit', 'acc', '{}')"),
])
async def test_a_schema_made_before_moves_to_byte_order_once(
        engines: Callable[[str], AsyncEngine], isolation_id: str, suffix: str, ddl: str,
        table: str, key: tuple[str, ...], row: str) -> None:
    """An earlier version's schema, with rows and statistics, in the database's collation:
    the migration moves every indexed text column (and a foreign key's) to "C", building
    the indexes again but rewriting no table, and analyzes what it moved; the rows are
    still found through their rebuilt unique index, which still refuses a second row with
    the same key. A later version's migration (any other DDL change) touches none of it:
    the same indexes, files and statistics."""
    schema, engine = f"{isolation_id}_{suffix}", engines(suffix)
    await _made_by_an_earlier_version(engine, schema, ddl)
    async with bare_connection(engine) as raw:  # another table in the schema, not the DDL's
        await raw.execute("CREATE TABLE not_ours (k text PRIMARY KEY)")
    assert {collation for _, _, collation in await _indexed(engine, schema)} == {"default"}
    keys = [tuple(f"{column}-{i}" for column in key) for i in range(200)]
    async with bare_connection(engine) as raw:
        await raw.executemany(row, keys)
        await raw.execute(f"ANALYZE {table}")
    statistics = await _statistics(engine, schema, table)
    assert statistics > 0
    tables = await _relations(engine, schema, "r")
    indexes = await _relations(engine, schema, "i")

    await ensure_schema(engine, schema, ddl)

    assert [entry for entry in await _indexed(engine, schema)
            if entry[2] != "C"] == [("not_ours_pkey", "k", "default")]
    if suffix == "biz_old":
        assert await _column(engine, schema, "funding_sources", "user_id") == "C"
    after = await _relations(engine, schema, "r")  # with the migration's schema_version
    assert {name: after[name] for name in tables} == tables  # no table rewritten
    moved = await _relations(engine, schema, "i")
    assert moved[f"{table}_pkey"][1] != indexes[f"{table}_pkey"][1]  # built again
    assert await _statistics(engine, schema, table) == statistics  # analyzed again
    where = " AND ".join(f"{column} = ${n}" for n, column in enumerate(key, 1))
    async with bare_connection(engine) as raw, raw.transaction():
        await raw.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await raw.fetch(
            f"EXPLAIN SELECT 1 FROM {table} WHERE {where}", *keys[7]))  # noqa: S608
        assert f"{table}_pkey" in plan
        for k in keys:
            assert await raw.fetchval(f"SELECT count(*) FROM {table} WHERE {where}",  # noqa: S608
                                      *k) == 1
    async with bare_connection(engine) as raw:
        with pytest.raises(asyncpg.UniqueViolationError):
            await raw.execute(row, *keys[42])

    # A live transaction on the table (as a write's), on a connection of its own.
    async with engines(f"{suffix}_busy").connect() as busy:
        transaction = await busy.begin()
        await busy.execute(text(f'LOCK TABLE "{schema}".{table} IN ROW SHARE MODE'))
        try:  # another version: its DDL runs again, this step takes no lock on the table
            await asyncio.wait_for(ensure_schema(engine, schema, ddl + "\n"), timeout=15)
        finally:
            await transaction.rollback()
    assert await _relations(engine, schema, "i") == moved  # the same indexes, not rebuilt
    assert await _relations(engine, schema, "r") == after
    assert await _statistics(engine, schema, table) == statistics


async def test_a_view_on_a_key_stops_the_move_and_says_why(
        engines: Callable[[str], AsyncEngine], isolation_id: str) -> None:
    """PostgreSQL refuses to change a column that a view uses: the migration fails with a
    message naming the table and what to do, and changes nothing (the next start tries
    again)."""
    schema, engine = f"{isolation_id}_view", engines("view")
    await _made_by_an_earlier_version(engine, schema, LEDGER_DDL)
    async with bare_connection(engine) as raw:
        await raw.execute("CREATE VIEW commands_seen AS SELECT command_id FROM processed_commands")
    with pytest.raises(RuntimeError, match=r"table processed_commands: .*view or rule"):
        await ensure_schema(engine, schema, LEDGER_DDL)
    assert {collation for _, _, collation in await _indexed(engine, schema)} == {"default"}
    async with bare_connection(engine) as raw:
        assert await raw.fetchval("SELECT to_regclass('schema_version')") is None
