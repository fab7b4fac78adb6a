"""PostgreSQL implementation of the saga engine's state: ``SagaRepository`` and
``ReplyCache`` (app/domain/ports.py) over the tables ``sagas`` and ``saved_replies``, and
the account query rows (``query_balances``, ``query_history``, ``query_events_seen``: the
``KeyValue`` views ``AccountProjection`` writes, app/query_service.py; read by the query
side through app/adapters/query_tables.py). Their DDL is part of ``postgres_store.DDL``:
one schema, one version.

A query row view is synchronous (the projection does no I/O): it answers from the buffer
and from what the batch read ahead, and raises :class:`NotReadAhead` for anything else; the
engine then reads that row alone (``read_row``) and decides the event again.

Why this design:

- **Writes are buffered, written once per batch.** ``put`` only records the latest version
  of a key in memory; :meth:`PostgresSagaState.seal` takes every buffered saga, reply and
  query row and :meth:`PostgresSagaState.write` writes them in one statement (one
  transaction, one round trip: a set-based upsert per table, from ``unnest`` of arrays),
  which the saga engine runs before any output of the batch is sent and its offsets
  committed. A batch of 500 records costs one write, not 500 or 1000. The sealed versions
  stay in the buffer until written (:meth:`PostgresSagaState.written`), so the engine's
  next batch, decided while they are written, reads them; its own puts are not part of
  the sealed batch. ``flush`` is the four steps at once.
- **The read cache lives for one batch only.** ``get`` answers from the buffer, then from
  what this batch already read (``prefetch`` reads a batch's keys in one statement,
  remembering the absent ones; a sealed version, once written, counts as read), then with
  one SELECT. ``forget_reads`` (each batch's start), ``flush`` and ``discard`` forget the
  cache: after the batch the partition may belong to another worker, whose writes this
  process would not see.
- **A saga read back as it was written is not parsed again** (``StoredSagas``): the rows
  are still read every cycle (the read cache's rule above), but the same stored bytes give
  the very saga this process serialized or parsed last (immutable), a bounded memo.
- **A crash between the flush and the sends is harmless.** The redelivered record finds
  the stored saga, and the saga logic re-sends what that saga decided (``last_trigger``,
  ``last_outputs``) instead of deciding again; every output's id is derived from the
  transfer and the step, so a re-sent output is recognisably the same one. A crash before
  the flush loses nothing that was sent: nothing was.

A failed flush keeps the buffer (the caller may flush again) and lets the exception
through unwrapped: asyncpg's errors and ``OSError`` are what ``app.record_failures.is_outage``
classifies (a SQLSTATE of class 22/23 is the data's fault, anything else an outage).

Concurrency: every key belongs to one home partition, which one worker owns at a time, so
there are no competing writers in normal operation; a flush writes its rows in key order
(no deadlock between two flushes during a rebalance). The last flush wins, as the port's
``put`` does. Outside normal operation (a worker evicted while it waited out a long
outage, then back) the **leases** decide: the saga engine takes its home partitions'
leases at every assignment (``take_leases``: one more generation each), and a flush then
locks and checks the leases of what it writes and writes nothing once another engine took
one (``LeaseLost``): still one statement, the writes conditional on the leases, as the
seal found them (a batch sealed before a lease was taken again, even by the same engine,
is refused).

The statements run on the bare asyncpg connection of a checkout of SQLAlchemy's pool, as
``PostgresBusinessStore`` does (prepared statements cached per connection; the engine is
one of ``make_engine``, whose connections' search_path is the schema).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NamedTuple

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.db import bare_connection, ensure_schema
from app.adapters.postgres_store import DDL
from app.domain import transfer_saga as saga_core

#: States whose sagas ``purge`` forgets (constants of the statement and the partial index
#: ``sagas_finished_idx``).
PURGED_STATES = (saga_core.State.COMPLETED, saga_core.State.FAILED)

# --- the statements, asyncpg style ($n parameters) ----------------------------------------

_GET_SAGA = "SELECT saga FROM sagas WHERE transfer_id = $1"
_GET_REPLY = "SELECT reply, home_partition, saved_at FROM saved_replies WHERE key = $1"
#: Every table's keys of a batch in one round trip; ``kind`` says whose row it is (0 a saga,
#: 1 a saved reply, 2.. the query rows of ``ROW_TABLES`` in order).
_PREFETCH = """
SELECT 0 AS kind, transfer_id AS key, saga AS value, NULL::int AS home_partition,
       NULL::float8 AS saved_at
FROM sagas WHERE transfer_id = ANY($1::text[])
UNION ALL
SELECT 1, key, reply, home_partition, saved_at FROM saved_replies WHERE key = ANY($2::text[])
UNION ALL
SELECT 2, key, value, NULL, NULL FROM query_balances WHERE key = ANY($3::text[])
UNION ALL
SELECT 3, key, value, NULL, NULL FROM query_history WHERE key = ANY($4::text[])
UNION ALL
SELECT 4, key, value, NULL, NULL FROM query_events_seen WHERE key = ANY($5::text[])
UNION ALL
SELECT 5, key, value, NULL, NULL FROM query_transfers WHERE key = ANY($6::text[])
"""
#: The account query tables (app/query_service.py ``AccountProjection``), in the order of
#: their ``kind`` in ``_PREFETCH`` and of their arrays in ``_FLUSH``.
ROW_TABLES = ("query_balances", "query_history", "query_events_seen", "query_transfers")
_GET_ROW = {
    "query_balances": "SELECT value FROM query_balances WHERE key = $1",
    "query_history": "SELECT value FROM query_history WHERE key = $1",
    "query_events_seen": "SELECT value FROM query_events_seen WHERE key = $1",
    "query_transfers": "SELECT value FROM query_transfers WHERE key = $1",
}
#: The flush: one statement, so one transaction, whatever it holds (data-modifying CTEs
#: always run to completion); empty arrays write nothing. A saga is stored as the bytes of
#: orjson (bytea: byte for byte what was decided, and any string a saga holds, NUL
#: included, which jsonb refuses).
_FLUSH = """
WITH written_sagas AS (
    INSERT INTO sagas (transfer_id, home_partition, operator_id, state, deadline,
                       updated_at, saga)
    SELECT t, p, o, s, d, u, j
    FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::float8[], $6::float8[],
                $7::bytea[]) AS batch (t, p, o, s, d, u, j)
    ON CONFLICT (transfer_id) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, operator_id = EXCLUDED.operator_id,
        state = EXCLUDED.state, deadline = EXCLUDED.deadline,
        updated_at = EXCLUDED.updated_at, saga = EXCLUDED.saga
), written_replies AS (
    INSERT INTO saved_replies (key, home_partition, saved_at, reply)
    SELECT * FROM unnest($8::text[], $9::int[], $10::float8[], $11::bytea[])
    ON CONFLICT (key) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, saved_at = EXCLUDED.saved_at,
        reply = EXCLUDED.reply
), written_query_balances AS (
    INSERT INTO query_balances (key, home_partition, value)
    SELECT * FROM unnest($12::text[], $13::int[], $14::bytea[])
    ON CONFLICT (key) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, value = EXCLUDED.value
), written_query_history AS (
    INSERT INTO query_history (key, home_partition, value)
    SELECT * FROM unnest($15::text[], $16::int[], $17::bytea[])
    ON CONFLICT (key) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, value = EXCLUDED.value
), written_query_events_seen AS (
    INSERT INTO query_events_seen (key, home_partition, value)
    SELECT * FROM unnest($18::text[], $19::int[], $20::bytea[])
    ON CONFLICT (key) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, value = EXCLUDED.value
), written_query_transfers AS (
    INSERT INTO query_transfers (key, home_partition, value)
    SELECT * FROM unnest($21::text[], $22::int[], $23::bytea[])
    ON CONFLICT (key) DO UPDATE SET
        home_partition = EXCLUDED.home_partition, value = EXCLUDED.value
)
SELECT 1
"""
#: The flush under leases, still one statement (one round trip, one transaction): the
#: leases of the partitions written ($24) are locked ``FOR SHARE`` (a taker's update waits
#: for this statement's end; one committed meanwhile is re-read, READ COMMITTED) and
#: compared with the generations this engine took ($25); every write is conditional on
#: none being lost, and the statement returns the lost partitions (none: written).
_FLUSH_LEASED = _FLUSH.replace("WITH written_sagas AS (", """WITH held AS (
    SELECT home_partition, generation FROM saga_leases
    WHERE home_partition = ANY($24::int[]) ORDER BY home_partition FOR SHARE
), lost AS (
    SELECT w.p FROM unnest($24::int[], $25::bigint[]) AS w (p, g)
    LEFT JOIN held ON held.home_partition = w.p
    WHERE held.generation IS DISTINCT FROM w.g
), allowed AS (
    SELECT NOT EXISTS (SELECT 1 FROM lost) AS ok
), written_sagas AS (""", 1).replace(
    "\n    ON CONFLICT", "\n    WHERE (SELECT ok FROM allowed)\n    ON CONFLICT").replace(
    "\nSELECT 1\n", "\nSELECT ARRAY(SELECT p FROM lost ORDER BY p) AS lost\n")
#: ``sagas_due_idx``; the buffered sagas ($3) are left out: their buffered version decides.
#: ``COLLATE "C"``: ties are broken as Python compares strings.
_DUE = """
SELECT transfer_id, deadline FROM sagas
WHERE home_partition = $1 AND deadline IS NOT NULL AND deadline <= $2
  AND NOT (transfer_id = ANY($3::text[]))
ORDER BY deadline, transfer_id COLLATE "C" LIMIT $4
"""
#: ``sagas_finished_idx`` (the state list is the index's predicate).
_PURGE_SAGAS = """
WITH gone AS (
    DELETE FROM sagas
    WHERE home_partition = $1 AND state IN ('COMPLETED', 'FAILED') AND updated_at < $2
      AND NOT (transfer_id = ANY($3::text[]))
    RETURNING 1
)
SELECT count(*) FROM gone
"""
_PURGE_REPLIES = """
WITH gone AS (
    DELETE FROM saved_replies
    WHERE home_partition = $1 AND saved_at < $2 AND NOT (key = ANY($3::text[]))
    RETURNING 1
)
SELECT count(*) FROM gone
"""
#: The operator's listing, one statement per combination of filters (a generic plan of
#: "$1 IS NULL OR state = $1" could not use ``sagas_state_idx``). Oldest update first.
_LIST_SAGAS = {
    (False, False): (
        'SELECT saga AS saga FROM sagas'
        ' ORDER BY updated_at, transfer_id COLLATE "C" LIMIT $1'
    ),
    (True, False): (
        'SELECT saga AS saga FROM sagas WHERE state = $1'
        ' ORDER BY updated_at, transfer_id COLLATE "C" LIMIT $2'
    ),
    (False, True): (
        'SELECT saga AS saga FROM sagas WHERE updated_at < $1'
        ' ORDER BY updated_at, transfer_id COLLATE "C" LIMIT $2'
    ),
    (True, True): (
        'SELECT saga AS saga FROM sagas WHERE state = $1 AND updated_at < $2'
        ' ORDER BY updated_at, transfer_id COLLATE "C" LIMIT $3'
    ),
}

#: Open sagas by state, for the worker's gauge (``sagas_state_idx``).
_COUNT_BY_STATE = """
SELECT state, count(*) AS n FROM sagas
WHERE state = ANY($2::text[]) AND home_partition = ANY($1::int[])
GROUP BY state
"""


class SavedReply(NamedTuple):
    """A saved reply with what purges it."""

    reply: bytes
    partition: int
    saved_at: float


class StoredSagas:
    """The sagas this process stored or read last, by their stored bytes (at most
    ``size``, the oldest out first). A saga written by one cycle is read back by the next
    cycle that touches it (a transfer's saga about three times): the same bytes are the
    same saga (the storage round trip is exact, tests/unit/test_transfer_saga.py), and
    sagas are immutable, so it is not parsed again (34 µs a saga; a lookup hashes the
    bytes, ~1 µs)."""

    def __init__(self, size: int) -> None:
        self.size = size
        #: Oldest first. An OrderedDict: a plain dict's first key, once many were deleted
        #: before it, is found by walking over their empty slots.
        self._sagas: OrderedDict[bytes, saga_core.Saga] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sagas)

    def remember(self, stored: bytes, saga: saga_core.Saga) -> None:
        sagas = self._sagas
        if stored not in sagas and len(sagas) >= self.size:
            sagas.popitem(last=False)
        sagas[stored] = saga

    def saga_of(self, stored: bytes) -> saga_core.Saga:
        saga = self._sagas.get(stored)
        if saga is None:
            saga = saga_core.saga_from_dict(orjson.loads(stored))
            self.remember(stored, saga)
        return saga


#: Of every saga state of the process (equal bytes are an equal saga whatever the schema).
STORED_SAGAS = StoredSagas(4096)


def _saga_of(stored: bytes) -> saga_core.Saga:
    return STORED_SAGAS.saga_of(bytes(stored))


class Sealed(NamedTuple):
    """A batch of writes taken from the buffer (:meth:`PostgresSagaState.seal`): the
    versions, the statement's arrays, and under leases the partitions written with the
    generations held when sealed."""

    sagas: list[tuple[str, saga_core.Saga]]
    replies: list[tuple[str, SavedReply]]
    rows: list[list[tuple[str, tuple[int, bytes]]]]
    columns: tuple[list[Any], ...]
    leases: tuple[list[int], list[int]] | None

    @property
    def empty(self) -> bool:
        return not self.sagas and not self.replies and not any(self.rows)


class PostgresSagas:
    """``SagaRepository`` over :class:`PostgresSagaState` (its ``sagas`` view)."""

    def __init__(self, owner: PostgresSagaState) -> None:
        self._owner = owner
        #: The latest version ``put`` of each key, not yet flushed.
        self.buffer: dict[str, saga_core.Saga] = {}
        #: What this batch read (None: absent), forgotten by ``flush`` and ``discard``.
        self.cache: dict[str, saga_core.Saga | None] = {}

    async def get(self, transfer_id: str) -> saga_core.Saga | None:
        buffered = self.buffer.get(transfer_id)
        if buffered is not None:
            return buffered
        if transfer_id in self.cache:
            return self.cache[transfer_id]
        async with self._owner.connection() as raw:
            stored = await raw.fetchval(_GET_SAGA, transfer_id)
        saga = None if stored is None else _saga_of(stored)
        self.cache[transfer_id] = saga
        return saga

    def put(self, saga: saga_core.Saga) -> None:
        self.buffer[saga.transfer.transfer_id] = saga

    async def due(self, partition: int, now: float, limit: int) -> list[str]:
        if limit <= 0:
            return []
        # The buffer as the statement leaves it out: a sealed batch written meanwhile
        # leaves the buffer (``written``) while the statement runs.
        buffered = list(self.buffer.values())
        async with self._owner.connection() as raw:
            rows = await raw.fetch(_DUE, partition, now, list(self.buffer), limit)
        found = [(float(r["deadline"]), str(r["transfer_id"])) for r in rows]
        for saga in buffered:
            deadline = saga.deadline()
            if (saga.transfer.home_partition == partition and deadline is not None
                    and deadline <= now):
                found.append((deadline, saga.transfer.transfer_id))
        found.sort()
        return [transfer_id for _deadline, transfer_id in found[:limit]]

    async def purge(self, partition: int, older_than: float) -> int:
        """As the port says, except that a buffered saga is not purged (its flush would
        write it again); a later purge takes it."""
        kept = list(self.buffer)  # left out by the statement (and as it ran, see ``due``)
        async with self._owner.connection() as raw:
            count = await raw.fetchval(_PURGE_SAGAS, partition, older_than, kept)
        spared = set(kept)
        for transfer_id, saga in self.cache.items():  # the rows just deleted
            if (transfer_id not in spared and saga is not None
                    and saga.transfer.home_partition == partition
                    and saga.state in PURGED_STATES and saga.updated_at < older_than):
                self.cache[transfer_id] = None
        return int(count)


class PostgresReplies:
    """``ReplyCache`` over :class:`PostgresSagaState` (its ``replies`` view)."""

    def __init__(self, owner: PostgresSagaState) -> None:
        self._owner = owner
        self.buffer: dict[str, SavedReply] = {}
        self.cache: dict[str, SavedReply | None] = {}

    async def get(self, key: str) -> bytes | None:
        saved = self.buffer.get(key)
        if saved is None:
            if key in self.cache:
                saved = self.cache[key]
            else:
                async with self._owner.connection() as raw:
                    row = await raw.fetchrow(_GET_REPLY, db_key(key))
                saved = None if row is None else SavedReply(
                    bytes(row["reply"]), int(row["home_partition"]), float(row["saved_at"]))
                self.cache[key] = saved
        return None if saved is None else saved.reply

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None:
        self.buffer[key] = SavedReply(bytes(reply), partition, at)

    async def purge(self, partition: int, older_than: float) -> int:
        """As the port says, except that a buffered reply is not purged."""
        kept = list(self.buffer)  # left out by the statement (see ``PostgresSagas.purge``)
        async with self._owner.connection() as raw:
            count = await raw.fetchval(_PURGE_REPLIES, partition, older_than,
                                       [db_key(key) for key in kept])
        spared = set(kept)
        for key, saved in self.cache.items():
            if (key not in spared and saved is not None and saved.partition == partition
                    and saved.saved_at < older_than):
                self.cache[key] = None
        return int(count)


class NotReadAhead(Exception):
    """A query row asked for that this batch has not read: read it
    (:meth:`PostgresSagaState.read_row`) and decide the record again. The projection reads
    every row before it writes any (app/query_service.py), so deciding again is safe."""

    def __init__(self, table: str, key: str) -> None:
        super().__init__(f"{table} {key!r} not read ahead")
        self.table = table
        self.key = key


class PostgresRows:
    """One account query table (``ROW_TABLES``) as the projection's synchronous
    ``KeyValue``: ``get`` answers from the buffer, then from what this batch read, and
    raises :class:`NotReadAhead` for anything else (no I/O in a synchronous call); ``put``
    buffers the row for the batch's flush, with its key's home partition."""

    def __init__(self, table: str, home_of: Callable[[str], int]) -> None:
        self.table = table
        self.home_of = home_of
        self.buffer: dict[str, tuple[int, bytes]] = {}
        self.cache: dict[str, bytes | None] = {}

    def get(self, key: str) -> bytes | None:
        buffered = self.buffer.get(key)
        if buffered is not None:
            return buffered[1]
        try:
            return self.cache[key]
        except KeyError:
            raise NotReadAhead(self.table, key) from None

    def put(self, key: str, value: bytes) -> None:
        self.buffer[key] = (self.home_of(key), bytes(value))

    def at(self, partition: int) -> HomedRows:
        """This view, its puts homed at ``partition`` (a transfer's row lives with its
        saga, on the saga's home partition, not where its key hashes)."""
        return HomedRows(self, partition)


class HomedRows:
    """A :class:`PostgresRows` whose puts carry a given home partition."""

    def __init__(self, view: PostgresRows, partition: int) -> None:
        self.view = view
        self.partition = partition

    def get(self, key: str) -> bytes | None:
        return self.view.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.view.buffer[key] = (self.partition, bytes(value))


class PostgresSagaState:
    """The sagas and saved replies of the command side: two port views over one write
    buffer and one batch-long read cache (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine, schema: str,
                 home_of: Callable[[str], int] = lambda key: 0) -> None:
        """``engine``: one of ``make_engine(url, schema)`` (its connections' search_path is
        ``schema``); the caller owns it (e.g. ``PostgresBusinessStore.engine``).
        ``home_of``: the home partition of a query row's key (its account's partition)."""
        self._engine = engine
        self._schema = schema
        self._sagas = PostgresSagas(self)
        self._replies = PostgresReplies(self)
        #: The account query tables, by name (``ROW_TABLES``).
        self.rows = {table: PostgresRows(table, home_of) for table in ROW_TABLES}
        #: {home partition: generation} once ``take_leases`` ran; None: no fencing.
        self._leases: dict[int, int] | None = None

    @property
    def sagas(self) -> PostgresSagas:
        return self._sagas

    @property
    def replies(self) -> PostgresReplies:
        return self._replies

    async def migrate(self) -> None:
        """Create the tables when missing. The business store's ``migrate`` applies the same
        DDL (one version): after it, this is one SELECT and no DDL."""
        await ensure_schema(self._engine, self._schema, DDL)

    # --- the batch ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many writes the buffer holds (sagas, replies and query rows)."""
        return (len(self._sagas.buffer) + len(self._replies.buffer)
                + sum(len(view.buffer) for view in self.rows.values()))

    def read_ahead(self, transfer_id: str) -> saga_core.Saga | None:
        """The saga as this batch knows it (buffered, or read), without I/O; None when
        absent or not read."""
        buffered = self._sagas.buffer.get(transfer_id)
        return buffered if buffered is not None else self._sagas.cache.get(transfer_id)

    async def prefetch(self, transfer_ids: Iterable[str], reply_keys: Iterable[str],
                       rows: Mapping[str, Iterable[str]] | None = None) -> None:
        """Read every given key that this batch does not know yet, in one statement; an
        absent key is remembered as absent. ``rows``: keys of the query tables, by table."""
        sagas, replies = self._sagas, self._replies
        saga_ids = sorted({t for t in transfer_ids
                           if t not in sagas.buffer and t not in sagas.cache})
        keys = sorted({k for k in reply_keys if k not in replies.buffer and k not in replies.cache})
        row_keys = [sorted({k for k in (rows or {}).get(table, ())
                            if k not in view.buffer and k not in view.cache})
                    for table, view in self.rows.items()]
        if not saga_ids and not keys and not any(row_keys):
            return
        stored = {db_key(key): key for key in keys}
        stored_rows = [{db_key(key): key for key in table_keys} for table_keys in row_keys]
        async with self.connection() as raw:
            found = await raw.fetch(_PREFETCH, saga_ids, list(stored),
                                    *(list(table_keys) for table_keys in stored_rows))
        # Every row read first: one that cannot be read fails the prefetch, and no key
        # is then taken for absent (each is read again when asked, where it fails alone).
        found_sagas = {row["key"]: _saga_of(row["value"]) for row in found if row["kind"] == 0}
        found_replies = {stored[row["key"]]: SavedReply(
            bytes(row["value"]), int(row["home_partition"]), float(row["saved_at"]))
            for row in found if row["kind"] == 1}
        found_rows: list[dict[str, bytes]] = [{} for _ in ROW_TABLES]
        for row in found:
            if row["kind"] >= 2:
                table = row["kind"] - 2
                found_rows[table][stored_rows[table][row["key"]]] = bytes(row["value"])
        sagas.cache.update(dict.fromkeys(saga_ids))
        sagas.cache.update(found_sagas)
        replies.cache.update(dict.fromkeys(keys))
        replies.cache.update(found_replies)
        for view, table_keys, table_found in zip(self.rows.values(), row_keys, found_rows,
                                                 strict=True):
            view.cache.update(dict.fromkeys(table_keys))
            view.cache.update(table_found)

    async def read_row(self, table: str, key: str) -> None:
        """Read one query row into this batch's cache (after :class:`NotReadAhead`)."""
        async with self.connection() as raw:
            value = await raw.fetchval(_GET_ROW[table], db_key(key))
        self.rows[table].cache[key] = None if value is None else bytes(value)

    async def take_leases(self, partitions: Iterable[int], owner: str) -> dict[int, int]:
        """Take the home partitions' leases (one more generation each, whoever held them):
        from now on this state's flushes write only while it still holds every lease of
        what they write (``LeaseLost`` otherwise). Leases of other partitions are
        forgotten. Returns {partition: generation}."""
        wanted = sorted(set(partitions))
        async with self.connection() as raw:
            rows = await raw.fetch(_TAKE_LEASES, wanted, owner)
        self._leases = {int(r["home_partition"]): int(r["generation"]) for r in rows}
        return dict(self._leases)

    def seal(self) -> Sealed:
        """What the buffer holds now, ready to be written (:meth:`write`), with the leases'
        generations as they are now. The buffer is unchanged: a ``put`` made after the
        seal belongs to the next one; the sealed versions leave the buffer once written
        (:meth:`written`)."""
        sagas = sorted(self._sagas.buffer.items())
        replies = sorted(self._replies.buffer.items())
        rows = [sorted(view.buffer.items()) for view in self.rows.values()]
        columns = (*_saga_columns(sagas), *_reply_columns(replies),
                   *(column for table_rows in rows for column in _row_columns(table_rows)))
        leases = None
        if self._leases is not None:
            # A partition never leased here is lost (generation 0 is never taken: the
            # first take is 1).
            partitions = sorted({s.transfer.home_partition for _, s in sagas}
                                | {r.partition for _, r in replies}
                                | {home for table_rows in rows
                                   for _, (home, _value) in table_rows})
            leases = (partitions, [self._leases.get(p, 0) for p in partitions])
        return Sealed(sagas, replies, rows, columns, leases)

    async def write(self, sealed: Sealed) -> None:
        """Write a sealed batch in one transaction (one statement); nothing else changes.
        On failure nothing is written and the exception propagates as the driver raised
        it; writing the same batch again is safe (upserts of the same versions).

        Sealed under leases (``take_leases``), the statement first locks the leases of the
        home partitions it writes (``FOR SHARE``: a taker waits for it) and writes nothing
        if any generation is no longer the one sealed: ``LeaseLost`` (a worker that lost
        its partitions during an outage never writes over their new owner's sagas, nor
        over what it decided itself under a later lease)."""
        if sealed.empty:
            return
        async with self.connection() as raw:
            if sealed.leases is None:
                await raw.execute(_FLUSH, *sealed.columns)
            else:
                lost = await raw.fetchval(_FLUSH_LEASED, *sealed.columns, *sealed.leases)
                if lost:
                    raise LeaseLost(f"home partitions {list(lost)} were taken by "
                                    "another saga engine")

    def written(self, sealed: Sealed) -> None:
        """After :meth:`write` succeeded: each sealed version leaves the buffer unless a
        later ``put`` replaced it, and is remembered as read (it is what PostgreSQL holds
        now), so that a batch decided while it was being written does not read it again."""
        for transfer_id, saga in sealed.sagas:
            if self._sagas.buffer.get(transfer_id) is saga:
                del self._sagas.buffer[transfer_id]
            self._sagas.cache[transfer_id] = saga
        for key, saved in sealed.replies:
            if self._replies.buffer.get(key) is saved:
                del self._replies.buffer[key]
            self._replies.cache[key] = saved
        for view, table_rows in zip(self.rows.values(), sealed.rows, strict=True):
            for key, row in table_rows:
                if view.buffer.get(key) is row:
                    del view.buffer[key]
                view.cache[key] = row[1]

    def forget_reads(self) -> None:
        """Forget what was read (the read cache); the buffer stays. The saga engine calls
        it as each cycle begins: what the cycle reads is read again, not taken from an
        earlier cycle (the partition may have been another worker's meanwhile)."""
        self._sagas.cache.clear()
        self._replies.cache.clear()
        for view in self.rows.values():
            view.cache.clear()

    async def flush(self) -> None:
        """Write every buffered saga, reply and query row in one transaction (one
        statement), then forget the buffer and the read cache: :meth:`seal`,
        :meth:`write`, :meth:`written`, :meth:`forget_reads`. On failure the buffer is
        kept and the exception propagates as the driver raised it. A ``put`` made while
        the flush was under way stays buffered. Under leases: ``LeaseLost`` as
        :meth:`write` says."""
        sealed = self.seal()
        await self.write(sealed)
        self.written(sealed)
        self.forget_reads()

    def discard(self) -> None:
        """Forget the buffer and the read cache: the batch is abandoned (a rebalance)."""
        tables: list[dict[str, Any]] = [self._sagas.buffer, self._sagas.cache,
                                        self._replies.buffer, self._replies.cache]
        for view in self.rows.values():
            tables += [view.buffer, view.cache]
        for table in tables:
            table.clear()

    # --- the operator's and the metrics' reads (the table only: no buffer, no cache) -----

    async def saga(self, transfer_id: str) -> saga_core.Saga | None:
        async with self.connection() as raw:
            stored = await raw.fetchval(_GET_SAGA, transfer_id)
        return None if stored is None else _saga_of(stored)

    async def list_sagas(self, state: str | None, updated_before: float | None,
                         limit: int) -> list[saga_core.Saga]:
        """Sagas in ``state`` (None: any) last updated before ``updated_before`` (None: any
        time), the oldest update first, at most ``limit``."""
        if limit <= 0:
            return []
        args = [a for a in (state, updated_before) if a is not None]
        statement = _LIST_SAGAS[(state is not None, updated_before is not None)]
        async with self.connection() as raw:
            rows = await raw.fetch(statement, *args, limit)
        return [_saga_of(row["saga"]) for row in rows]

    async def count_by_state(self, partitions: Iterable[int],
                             states: Iterable[str]) -> dict[str, int]:
        """How many sagas of home ``partitions`` are in each of ``states`` (absent: none)."""
        async with self.connection() as raw:
            rows = await raw.fetch(_COUNT_BY_STATE, sorted(set(partitions)), sorted(set(states)))
        return {str(row["state"]): int(row["n"]) for row in rows}

    # --- connections ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A bare connection of the pool (app/adapters/db.py ``bare_connection``): a
        connection left broken, inside a transaction or interrupted is invalidated, never
        returned to the pool."""
        async with bare_connection(self._engine) as raw:
            yield raw


def _saga_columns(sagas: list[tuple[str, saga_core.Saga]]) -> tuple[list[Any], ...]:
    """The flush's saga arrays ($1-$7), column by column."""
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    ids, partitions, operators, states, deadlines, updated, stored = columns
    for transfer_id, saga in sagas:
        ids.append(transfer_id)
        partitions.append(saga.transfer.home_partition)
        operators.append(saga.transfer.operator_id)
        states.append(saga.state.value)
        deadlines.append(saga.deadline())
        updated.append(saga.updated_at)
        value = orjson.dumps(saga_core.saga_to_dict(saga))
        STORED_SAGAS.remember(value, saga)
        stored.append(value)
    return columns


_TAKE_LEASES = """
INSERT INTO saga_leases (home_partition, owner, generation)
SELECT p, $2, 1 FROM unnest($1::int[]) AS p
ON CONFLICT (home_partition) DO UPDATE
    SET owner = EXCLUDED.owner, generation = saga_leases.generation + 1
RETURNING home_partition, generation
"""


class LeaseLost(Exception):
    """A flush refused: another saga engine took a home partition it writes."""


def db_key(key: str) -> str:
    """A reply key as stored: PostgreSQL's text cannot hold NUL, which a request id may
    (the contract bounds its length, not its characters), so NUL is written ``\\0`` and a
    backslash ``\\\\``: one stored form per key, no two keys alike."""
    if "\\" not in key and "\x00" not in key:
        return key
    return key.replace("\\", "\\\\").replace("\x00", "\\0")


def _reply_columns(replies: list[tuple[str, SavedReply]]) -> tuple[list[Any], ...]:
    """The flush's reply arrays ($8-$11)."""
    return ([db_key(key) for key, _ in replies], [s.partition for _, s in replies],
            [s.saved_at for _, s in replies], [s.reply for _, s in replies])


def _row_columns(rows: list[tuple[str, tuple[int, bytes]]]) -> tuple[list[Any], ...]:
    """The flush's arrays of one query table (key, home partition, value)."""
    return ([db_key(key) for key, _ in rows], [home for _, (home, _v) in rows],
            [value for _, (_h, value) in rows])
