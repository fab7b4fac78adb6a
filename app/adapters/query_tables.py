"""The query tables in PostgreSQL, read side: ``query_balances``, ``query_history`` and
``query_transfers`` (DDL in ``postgres_store.DDL``) as the ``AsyncKeyValue`` port
(app/domain/ports.py) that ``QueryService`` reads, and the balances of some home partitions
for the live balance check (app/query_reconciliation.py).

The saga engine writes these tables in its cycle's transaction (``AccountProjection`` and
``TransferProjection`` over buffered views, app/adapters/saga_state.py) and commits before
it sends a final reply, so any worker reads a client's own writes: no partition of a query
belongs to anyone here. Keys are stored as ``saga_state.db_key`` (NUL written ``\\0``, a
backslash doubled), values are the projection's bytes as they were put (a transfer's row:
the JSON document ``TransferProjection`` puts, keyed by its transfer id, homed with its
saga).

Every read is one statement on the bare asyncpg connection of a checkout of SQLAlchemy's
pool (prepared once per connection), as ``PostgresSagaState`` does; no cache: what another
worker's engine committed is read at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.db import bare_connection
from app.adapters.saga_state import db_key

# --- the statements, asyncpg style ($n parameters) ----------------------------------------

_GET = {
    "query_balances": "SELECT value FROM query_balances WHERE key = $1",
    "query_history": "SELECT value FROM query_history WHERE key = $1",
    "query_transfers": "SELECT value FROM query_transfers WHERE key = $1",
}
_GET_MANY = {
    "query_balances": "SELECT key, value FROM query_balances WHERE key = ANY($1::text[])",
    "query_history": "SELECT key, value FROM query_history WHERE key = ANY($1::text[])",
    "query_transfers": "SELECT key, value FROM query_transfers WHERE key = ANY($1::text[])",
}
#: ``query_balances_partition_idx``.
_BALANCES_IN = ("SELECT key, value FROM query_balances"
                " WHERE home_partition = ANY($1::int[])")


class PostgresQueryView:
    """One query table as an ``AsyncKeyValue``."""

    def __init__(self, owner: PostgresQueryTables, table: str) -> None:
        self._owner = owner
        self._get = _GET[table]
        self._get_many = _GET_MANY[table]

    async def get(self, key: str) -> bytes | None:
        async with self._owner.connection() as raw:
            value = await raw.fetchval(self._get, db_key(key))
        return None if value is None else bytes(value)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        stored = {db_key(key): key for key in keys}
        async with self._owner.connection() as raw:
            rows = await raw.fetch(self._get_many, list(stored))
        return {stored[row["key"]]: bytes(row["value"]) for row in rows}


class PostgresQueryTables:
    """The query tables a worker reads: :attr:`balances`, :attr:`history`,
    :attr:`transfers` (a transfer's details by transfer id)."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        """``engine``: one of ``make_engine(url, schema)`` (its connections' search_path is
        ``schema``); the caller owns it (e.g. ``PostgresBusinessStore.engine``)."""
        self._engine = engine
        self._schema = schema
        self.balances = PostgresQueryView(self, "query_balances")
        self.history = PostgresQueryView(self, "query_history")
        self.transfers = PostgresQueryView(self, "query_transfers")

    async def balances_in(self, partitions: Iterable[int]) -> dict[str, bytes]:
        """Every ``query_balances`` row of the home ``partitions``: accountId → value."""
        wanted = sorted(set(partitions))
        if not wanted:
            return {}
        async with self.connection() as raw:
            rows = await raw.fetch(_BALANCES_IN, wanted)
        return {stored_key(row["key"]): bytes(row["value"]) for row in rows}

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A bare connection of the pool (app/adapters/db.py ``bare_connection``): a
        connection left broken, inside a transaction or interrupted is invalidated, never
        returned to the pool."""
        async with bare_connection(self._engine) as raw:
            yield raw


def stored_key(stored: str) -> str:
    """The key ``db_key`` stored as ``stored`` (its inverse: ``\\0`` is NUL, ``\\\\`` a
    backslash)."""
    if "\\" not in stored:
        return stored
    out: list[str] = []
    escaped = False
    for char in stored:
        if escaped:
            out.append("\x00" if char == "0" else char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)
