"""PostgreSQL engines: SQLAlchemy 2 asyncio over asyncpg, one schema per component."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

log = logging.getLogger(__name__)

POSTGRES_TIMEOUT_SECONDS = 2.0
POSTGRES_CACHE_SECONDS = 1.0

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: How long PostgreSQL lets a session sit idle inside a transaction before it ends it (and
#: its locks). A process frozen or cut off mid-transaction (SIGSTOP, a stalled loop, a lost
#: network) would otherwise hold, say, a user's row lock until TCP keepalive notices, about
#: two hours on Linux defaults, and every confirm of that user, with the partition behind
#: it, would wait. No path of ours leaves a transaction idle: each runs its statements
#: back to back (the confirm's five round trips take milliseconds).
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = 60.0


def make_engine(url: str, schema: str, pool_size: int = 10, *,
                idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
                custom_plans: bool = False, key_lookups: bool = False) -> AsyncEngine:
    """An engine whose connections use ``schema`` (search_path) and nothing else.

    ``pool_size``: the most connections the engine holds at once, each opened when first
    needed and then kept (recycled after 30 minutes); a caller beyond them waits for one.
    No overflow connections: SQLAlchemy closes an overflow connection as soon as it is
    returned, and the saga engine's cycles needed a few more than the pool at every
    burst, so a worker opened and closed about one connection a second, each costing
    PostgreSQL a backend, asyncpg's type introspection (~10 ms of planning and
    execution) and the preparation and first five plans of every statement again
    (measured at K=512, docs/performance.md, session 23).

    ``custom_plans``: every statement is planned for its own parameters
    (``plan_cache_mode = force_custom_plan``), for connections that run few statements
    over arrays of any size (``= ANY($1)``, ``unnest``). PostgreSQL otherwise switches a
    prepared statement to a generic plan after five executions, costed for ten array
    elements and the table's size at that moment, and keeps it for the connection's life
    until the table is analyzed again: a plan cached while a table was nearly empty scans
    it sequentially as it grows (measured: the account center's duplicate check 2.1 ms
    a batch, reading every processed command, against 0.14 ms planned per batch).

    ``key_lookups``: for connections whose statements read their rows by an index (keys,
    ``= ANY($1)`` of keys, a partition's or a state's rows): sequential scans are off
    (``enable_seqscan = off``: the planner takes an index wherever one serves), so a
    generic plan cached while a table was small (after its first analyze, a few pages)
    cannot keep scanning the table sequentially as it grows, and plans are still cached
    rather than made at each execution (custom plans of arrays of hundreds of keys cost
    more than they save: PostgreSQL estimates every element). Measured, the saga engine's
    read-ahead on such a plan: 13 ms an execution (the first over 12 ms logged) to 40-80
    ms 30 s later, growing with its table (docs/performance.md, session 30). JIT is off too: no
    statement of these pays back a compilation, and up to PostgreSQL 17 one left without
    an index path is costed above every JIT threshold (a disabled scan costs 10^10)."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        # No pre-ping: it costs three round trips per checkout (measured: 10-29 % of the
        # worker's throughput, docs/performance.md). A connection that died fails its call
        # once (an INTERNAL reply, or a retried batch in the account center) and SQLAlchemy
        # then invalidates the pool; recycling retires connections before servers or
        # middleboxes drop idle ones.
        pool_pre_ping=False,
        pool_recycle=1800,
        # Errors and SQL logs never show bound values (PIN verifiers, OTP digests, ...).
        hide_parameters=True,
        connect_args={"server_settings": server_settings(
            schema, idle_in_transaction_timeout=idle_in_transaction_timeout,
            custom_plans=custom_plans, key_lookups=key_lookups)},
    )


def server_settings(schema: str, *,
                    idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
                    custom_plans: bool = False, key_lookups: bool = False) -> dict[str, str]:
    """The session settings of ``make_engine``'s connections (see there)."""
    settings = {
        "search_path": schema, "application_name": "bizcenter",
        "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout * 1000)),
    }
    if custom_plans:
        settings["plan_cache_mode"] = "force_custom_plan"
    if key_lookups:
        settings["enable_seqscan"] = "off"
        settings["jit"] = "off"
    return settings


#: SQLSTATEs after which the migration is tried again: deadlock, lock timeout.
_MIGRATION_RETRY_SQLSTATES = frozenset({"40P01", "55P03"})
_MIGRATION_ATTEMPTS = 8


@contextlib.asynccontextmanager
async def bare_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """The asyncpg connection of a checkout of ``engine``'s pool, outside any transaction:
    a statement on it commits on its own. Checked out as a bare pooled connection
    (``raw_connection``): a SQLAlchemy ``Connection`` around it cost ~150 µs of CPU per
    checkout, more than a round trip. Pool checkout and return run in SQLAlchemy's greenlet
    (they may connect, or close an overflow connection). SQLAlchemy opened no transaction
    on it, so its reset-on-return would not end one: a connection left broken, inside a
    transaction, or interrupted mid-way (a cancellation) never goes back to the pool."""
    pooled = await engine.raw_connection()
    raw: Any = pooled.driver_connection
    try:
        yield raw
    except BaseException as exc:
        if raw.is_closed() or raw.is_in_transaction() or not isinstance(exc, Exception):
            with contextlib.suppress(Exception):
                await greenlet_spawn(pooled.invalidate)  # returns it to the pool, dead
            raise
        await greenlet_spawn(pooled.close)
        raise
    await greenlet_spawn(pooled.close)


#: The columns of ``schema``'s tables named ``:tables`` (the DDL's own) that an index orders
#: (its key columns, not INCLUDE ones) or a foreign key compares, collatable and not in the
#: "C" collation: (table, column, type).
_NOT_BYTE_ORDERED = """
SELECT DISTINCT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = :schema AND c.relname = ANY (:tables) AND c.relkind = 'r'
  AND a.attcollation <> 0
  AND a.attcollation <> (SELECT oid FROM pg_collation
                         WHERE collname = 'C' AND collnamespace = 'pg_catalog'::regnamespace)
  AND (EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
               AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1]))
       OR EXISTS (SELECT 1 FROM pg_constraint f
                  WHERE f.contype = 'f' AND f.conrelid = c.oid AND a.attnum = ANY (f.conkey)))
ORDER BY 1, 2
"""
#: The tables a DDL creates.
_CREATED_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)", re.IGNORECASE)
#: SQLSTATE of an ALTER COLUMN ... TYPE refused because a view or rule uses the column.
_FEATURE_NOT_SUPPORTED = "0A000"


async def ensure_schema(engine: AsyncEngine, schema: str, ddl: str) -> None:
    """Create ``schema`` and run idempotent ``ddl`` (CREATE ... IF NOT EXISTS statements),
    once per version of ``ddl``; then move every column of the DDL's tables that an index
    orders or a foreign key compares to byte order (``_order_by_bytes``).

    Every process runs this at start, also while other processes of the same schema are
    busy: a worker joining a loaded group. ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` takes
    an exclusive lock on its table even when the column exists, and queued behind live
    transactions it deadlocks with them (seen: a second worker crashing at start). So the
    SHA-256 of ``ddl`` is recorded in ``schema_version`` and a process that finds it there
    runs no DDL at all; otherwise the DDL runs under an advisory lock (processes starting
    together do not race), with a lock timeout, and is tried again after a deadlock or a
    lock timeout.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    version = hashlib.sha256(ddl.encode()).hexdigest()
    if await _applied(engine, schema) == version:
        return
    for attempt in range(1, _MIGRATION_ATTEMPTS + 1):
        try:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"),
                                   {"s": schema})
                if await _applied_in(conn, schema) == version:
                    return
                await conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                for statement in (s.strip() for s in ddl.split(";")):
                    if statement:
                        await conn.execute(text(statement))
                await _order_by_bytes(conn, schema, _CREATED_TABLE.findall(ddl))
                await conn.execute(text(
                    f'CREATE TABLE IF NOT EXISTS "{schema}".schema_version ('
                    " id int PRIMARY KEY CHECK (id = 1), ddl_sha256 text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"))
                record = (  # the schema name is validated by _SCHEMA_NAME
                    f'INSERT INTO "{schema}".schema_version (id, ddl_sha256) '  # noqa: S608
                    "VALUES (1, :v) ON CONFLICT (id) DO UPDATE SET "
                    "ddl_sha256 = EXCLUDED.ddl_sha256, applied_at = now()")
                await conn.execute(text(record), {"v": version})
            return
        except DBAPIError as exc:
            if _sqlstate(exc) not in _MIGRATION_RETRY_SQLSTATES or attempt == _MIGRATION_ATTEMPTS:
                raise
            log.warning("schema %s: migration met live transactions (%s), attempt %d of %d",
                        schema, _sqlstate(exc), attempt, _MIGRATION_ATTEMPTS)
            await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))


async def _order_by_bytes(conn: AsyncConnection, schema: str, tables: list[str]) -> None:
    """Every column of ``tables`` (the DDL's own, in ``schema``) that an index orders or a
    foreign key compares is in the "C" collation (byte order: docs/architecture.md, "Keys
    compare byte by byte"). The DDLs declare it; a table made by an earlier version, whose
    columns are in the database's collation, is moved here: ``ALTER COLUMN ... TYPE <its
    type> COLLATE "C"`` builds the indexes on them again (no table is rewritten) and drops
    their statistics, which ``ANALYZE`` of those columns makes again. Only the columns not
    yet in "C" are touched: once they are, this step costs one catalog query and takes no
    lock. A view or rule using such a column makes PostgreSQL refuse the change: the
    migration then fails, nothing changed, saying which table (docs/operations.md,
    "Upgrade")."""
    rows = (await conn.execute(text(_NOT_BYTE_ORDERED),
                               {"schema": schema, "tables": tables})).all()
    moved: dict[str, list[tuple[str, str]]] = {}
    for table, column, type_name in rows:
        moved.setdefault(table, []).append((column, type_name))
    for table, columns in moved.items():
        names = ", ".join(column for column, _ in columns)
        log.warning("schema %s: table %s: column(s) %s moved to byte order, their indexes built "
                    "again", schema, table, names)
        qualified = f"{_quoted(schema)}.{_quoted(table)}"
        changes = ", ".join(f'ALTER COLUMN {_quoted(column)} TYPE {type_name} COLLATE "C"'
                            for column, type_name in columns)
        try:
            await conn.execute(text(f"ALTER TABLE {qualified} {changes}"))
        except DBAPIError as exc:
            if _sqlstate(exc) != _FEATURE_NOT_SUPPORTED:
                raise
            raise RuntimeError(
                f"schema {schema}: table {table}: column(s) {names} cannot be moved to byte "
                "order while a view or rule uses them: drop it, migrate, create it again "
                "(docs/operations.md, Upgrade)") from exc
        await conn.execute(text(f"ANALYZE {qualified} "
                                f"({', '.join(_quoted(column) for column, _ in columns)})"))


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def _applied(engine: AsyncEngine, schema: str) -> str | None:
    async with engine.connect() as conn:
        return await _applied_in(conn, schema)


async def _applied_in(conn: AsyncConnection, schema: str) -> str | None:
    """The DDL version recorded in ``schema`` (None when nothing is recorded yet)."""
    exists = (await conn.execute(text("SELECT to_regclass(:t)"),
                                 {"t": f'"{schema}".schema_version'})).scalar_one()
    if exists is None:
        return None
    row = (await conn.execute(text(
        f'SELECT ddl_sha256 FROM "{schema}".schema_version WHERE id = 1'  # noqa: S608
    ))).first()  # the schema name is validated by _SCHEMA_NAME
    return None if row is None else str(row[0])


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = getattr(exc, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


class PostgresProbe:
    """``SELECT 1`` with a deadline, cached for a second; its own one-connection engine."""

    def __init__(self, engine: AsyncEngine, *, clock: Any = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._last: tuple[float, bool] | None = None
        self._lock = asyncio.Lock()

    async def ok(self) -> bool:
        async with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last[0] < POSTGRES_CACHE_SECONDS:
                return self._last[1]
            try:
                await asyncio.wait_for(self._select_one(), POSTGRES_TIMEOUT_SECONDS)
                result = True
            except Exception as exc:  # any failure is "not ready", said in one line
                log.warning("readiness: PostgreSQL does not answer: %s", type(exc).__name__)
                result = False
            self._last = (self._clock(), result)
            return result

    async def _select_one(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self._engine.dispose()
