"""Every text column that an index orders compares byte by byte (``COLLATE "C"``), in the
business center's schema (app/adapters/postgres_store.py ``DDL``) and the reference
ledger's (reference/account_center/ledger.py ``DDL``), whatever the database's locale:
a fresh schema has it, and a schema made before (its columns in the database's collation)
is moved by the next start's migration without rewriting a table, keeping its rows and
its unique keys. Against the real PostgreSQL of ``make up``.
"""

from __future__ import annotations

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

#: The DDLs as they were before this change: the same tables, every column in the
#: database's collation, no migration statements.
BUSINESS_BEFORE = BUSINESS_DDL[: BUSINESS_DDL.index("-- Every text column of an index")]
LEDGER_BEFORE = LEDGER_DDL[: LEDGER_DDL.index("-- Ids compare byte by byte")]

#: The one text column of an index left in the database's collation (app/adapters/
#: postgres_store.py says why): the saga's own state names.
EXEMPT = {("sagas_state_idx", "state")}

#: Every text key column of an index in ``schema``: (index, column, collation name).
_INDEXED_TEXT = """
SELECT ic.relname, a.attname, co.collname
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indcollation::oid[]) AS k (attnum, coll)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
JOIN pg_collation co ON co.oid = k.coll
WHERE n.nspname = $1 AND a.atttypid = 'text'::regtype
ORDER BY 1, 2
"""
_FILENODES = """
SELECT c.relname, c.relfilenode FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind::text = $2
"""


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
    return ddl.replace(' COLLATE "C"', "")


async def _indexed_text(engine: AsyncEngine, schema: str) -> list[tuple[str, str, str]]:
    async with bare_connection(engine) as raw:
        return [tuple(row) for row in await raw.fetch(_INDEXED_TEXT, schema)]


async def _filenodes(engine: AsyncEngine, schema: str, kind: str) -> dict[str, int]:
    async with bare_connection(engine) as raw:
        return {row[0]: row[1] for row in await raw.fetch(_FILENODES, schema, kind)}


def test_the_previous_ddls_have_no_byte_order() -> None:
    """The stand-ins for the previous version really are in the database's collation."""
    for before in (_before(BUSINESS_BEFORE), _before(LEDGER_BEFORE)):
        assert "COLLATE" not in before
        assert "ALTER COLUMN" not in before
    assert "CREATE TABLE IF NOT EXISTS query_transfers" in BUSINESS_BEFORE
    assert "processed_commands_transfer_id_idx" in LEDGER_BEFORE


@pytest.mark.parametrize(("suffix", "ddl", "expected"), [
    ("biz", BUSINESS_DDL, {("sagas_pkey", "transfer_id"),
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
        expected: set[tuple[str, str]]) -> None:
    schema, engine = f"{isolation_id}_{suffix}", engines(suffix)
    await ensure_schema(engine, schema, ddl)
    indexed = await _indexed_text(engine, schema)
    assert expected <= {(index, column) for index, column, _ in indexed}
    assert [(index, column, collation) for index, column, collation in indexed
            if collation != "C"] == [(index, column, "default") for index, column in EXEMPT
                                     if suffix == "biz"]


@pytest.mark.parametrize(("suffix", "before", "ddl", "table", "key", "row"), [
    ("biz_old", BUSINESS_BEFORE, BUSINESS_DDL, "idempotency_records",
     ("operator_id", "idempotency_key"),
     "INSERT INTO idempotency_records (operator_id, idempotency_key, fingerprint, transfer_id,"
     " attempt) VALUES ($1, $2, 'f', 't', 'a')"),
    ("ledger_old", LEDGER_BEFORE, LEDGER_DDL, "processed_commands", ("command_id",),
     "INSERT INTO processed_commands (command_id, transfer_id, type, account_id, result)"
     " VALUES ($1, 't', 'debit', 'acc', '{}')"),
])
async def test_a_schema_made_before_moves_to_byte_order_once(
        engines: Callable[[str], AsyncEngine], isolation_id: str, suffix: str, before: str,
        ddl: str, table: str, key: tuple[str, ...], row: str) -> None:
    """The previous version's schema, with rows, in the database's collation: the new
    DDL's migration moves every indexed text column to "C", rebuilding the indexes but no
    table; the rows are still found through their (rebuilt) unique index, which still
    refuses a second row with the same key; a later version's migration (any other DDL
    change) rebuilds nothing more."""
    schema, engine = f"{isolation_id}_{suffix}", engines(suffix)
    await ensure_schema(engine, schema, _before(before))
    database_collation = {collation for _, _, collation in await _indexed_text(engine, schema)}
    assert database_collation == {"default"}
    keys = [tuple(f"{column}-{i}" for column in key) for i in range(200)]
    async with bare_connection(engine) as raw:
        await raw.executemany(row, keys)
    tables_before = await _filenodes(engine, schema, "r")
    indexes_before = await _filenodes(engine, schema, "i")

    await ensure_schema(engine, schema, ddl)

    indexed = await _indexed_text(engine, schema)
    assert {collation for index, column, collation in indexed
            if (index, column) not in EXEMPT} == {"C"}
    assert await _filenodes(engine, schema, "r") == tables_before  # no table rewritten
    rebuilt = await _filenodes(engine, schema, "i")
    assert rebuilt[f"{table}_pkey"] != indexes_before[f"{table}_pkey"]
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

    await ensure_schema(engine, schema, ddl + "\n")  # another version: its DDL runs again
    assert await _filenodes(engine, schema, "i") == rebuilt  # nothing rebuilt this time
    assert await _filenodes(engine, schema, "r") == tables_before
