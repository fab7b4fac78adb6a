"""The command side's sagas and saved replies in PostgreSQL (app/adapters/saga_state.py).

Two parts. The port's contract (``SagaRepository``, ``ReplyCache``, app/domain/ports.py)
runs over the dicts of tests/fakes.py and over the PostgreSQL views, flushed after each
round of puts ("postgresql") and never flushed ("postgresql-buffered": the batch's buffer
answers); the purges run over stored data only (a buffered entry is not purged, by
design). Then what only PostgreSQL has: the batch (buffer, read cache, prefetch, flush,
discard), counted in statements (the adapter's connection, wrapped, logs every statement
sent through it), failures and outages, the storage form, the operator's reads and
the migration of an existing database.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import pytest
import pytest_asyncio
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.db import ensure_schema, make_engine
from app.adapters.postgres_store import DDL, PostgresBusinessStore
from app.adapters.saga_state import (
    ROW_TABLES,
    STORED_SAGAS,
    LeaseLost,
    NotReadAhead,
    PostgresSagaState,
    StoredSagas,
    db_key,
)
from app.domain import transfer_saga as s
from app.domain.ports import ReplyCache, SagaRepository
from app.domain.transfer_saga import Saga, State
from app.query_service import SEP, AccountProjection, DictKeyValue
from app.record_failures import is_outage, sqlstate
from schemas.wire import AccountEvent
from tests.fakes import DictReplies, DictSagas

POLICY = s.Policy(otp_ttl_seconds=300.0, otp_max_attempts=5, otp_pepper=b"p" * 32,
                  command_timeout_seconds=5.0, command_max_backoff_seconds=40.0)
T0 = 1_000_000.0
OTP = "482913"
#: A note that the storage form must carry as it is: quotes, a backslash, JSON-looking
#: text, non-ASCII, an emoji.
NOTE = 'loyer "mars" \\ {"state":"X"} déjà 💶'


# --------------------------------------------------------------------------------------
# sagas
# --------------------------------------------------------------------------------------


def transfer(transfer_id: str, partition: int = 0, *, operator: str = "alice",
             note: str | None = "rent") -> s.Transfer:
    return s.Transfer(transfer_id=transfer_id, operator_id=operator, idempotency_key="k-" +
                      transfer_id, fingerprint="fp", from_account_id="acc-a",
                      to_account_id="acc-b", amount_minor=12_345, currency="EUR", note=note,
                      home_partition=partition)


def saga(transfer_id: str, *, partition: int = 0, state: State = State.DEBITING,
         deadline: float | None = None, updated_at: float = T0,
         operator: str = "alice") -> Saga:
    """A saga in ``state`` due at ``deadline`` (a timer in a waiting state; none in a final
    one), last updated at ``updated_at``."""
    started, _ = s.start(transfer(transfer_id, partition, operator=operator),
                         request_id=f"r-{transfer_id}", otp=None, user_id=operator, now=T0,
                         policy=POLICY)
    if state is State.AWAITING_OTP:
        built = replace(started, state=state, otp_expires_at=deadline, next_retry_at=None,
                        updated_at=updated_at)
    else:
        assert state in s.STEP_OF_STATE or deadline is None, "a final saga has no deadline"
        built = replace(started, state=state, next_retry_at=deadline, give_up_at=None,
                        updated_at=updated_at)
    assert built.deadline() == deadline
    return built


def real_sagas(prefix: str) -> list[Saga]:
    """Sagas reached through the public steps only, each field of the storage form used:
    the OTP's sealed form, outputs with nested data, codes, retries."""
    def started(name: str, otp: str | None) -> tuple[Saga, s.Transfer]:
        t = replace(transfer(f"{prefix}-{name}", 5, note=NOTE), amount_minor=99_999)
        return s.start(t, request_id=f"r-{name}", otp=otp, user_id="alice", now=T0,
                       policy=POLICY)[0], t

    awaiting, _ = started("awaiting", OTP)
    debiting, t = started("debiting", None)
    retried = s.on_tick(debiting, T0 + 5, POLICY)[0]
    crediting = s.on_account_event(debiting, s.command_id(t, "debit"), "debited", None,
                                   T0 + 1, POLICY)[0]
    completed = s.on_account_event(crediting, s.command_id(t, "credit"), "credited", None,
                                   T0 + 2, POLICY)[0]
    failed_saga, t2 = started("failed", None)
    failed = s.on_account_event(failed_saga, s.command_id(t2, "debit"), "rejected",
                                "INSUFFICIENT_FUNDS", T0 + 1, POLICY)[0]
    found = [awaiting, replace(retried, transfer=replace(t, transfer_id=f"{prefix}-retried")),
             completed, failed]
    assert [x.state for x in found] == [State.AWAITING_OTP, State.DEBITING, State.COMPLETED,
                                        State.FAILED]
    return found


def as_stored(saga_: Saga | None) -> dict[str, Any] | None:
    return None if saga_ is None else s.saga_to_dict(saga_)


# --------------------------------------------------------------------------------------
# the database: one schema for the module, every statement logged
# --------------------------------------------------------------------------------------


class CountingConnection:
    """An asyncpg connection that logs every statement sent through it: the adapter's
    round trips, counted where it makes them. Any other use of the connection fails the
    test, so that nothing is sent uncounted."""

    _STATEMENTS = frozenset({"fetch", "fetchrow", "fetchval", "execute", "executemany"})
    _STATE = frozenset({"is_closed", "is_in_transaction"})

    def __init__(self, raw: Any, log: list[str]) -> None:
        self._raw = raw
        self._log = log

    def __getattr__(self, name: str) -> Any:
        if name in self._STATE:
            return getattr(self._raw, name)
        if name not in self._STATEMENTS:
            raise AssertionError(f"the adapter used {name!r}: count its round trips")
        method = getattr(self._raw, name)

        def logged(query: str, *args: Any, **kwargs: Any) -> Any:
            self._log.append(query)
            return method(query, *args, **kwargs)

        return logged


class CountedSagaState(PostgresSagaState):
    """:class:`PostgresSagaState` whose statements are logged into ``statements``."""

    def __init__(self, engine: AsyncEngine, schema: str, statements: list[str]) -> None:
        super().__init__(engine, schema, home_of=account_home)
        self.statements = statements

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        async with super().connection() as raw:
            yield CountingConnection(raw, self.statements)


def account_home(key: str) -> int:
    """The home partition of a query row's key in these tests: accounts are named
    ``p<partition>-...``."""
    return int(key[1])


@dataclass
class Database:
    engine: AsyncEngine
    schema: str
    #: The text of every statement the states of :meth:`state` sent, in order.
    statements: list[str] = field(default_factory=list)

    def state(self) -> PostgresSagaState:
        """Another worker's (or another batch's) view of the same tables."""
        return CountedSagaState(self.engine, self.schema, self.statements)

    async def rows(self, table: str) -> int:
        assert table in ("sagas", "saved_replies", *ROW_TABLES)
        async with self.engine.connect() as conn:
            return int((await conn.execute(
                text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608


def server_pids(engine: AsyncEngine) -> list[int]:
    """The server pids of the engine's connections, as they open."""
    pids: list[int] = []

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        pids.append(dbapi_connection.driver_connection.get_server_pid())

    return pids


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def database(database_url: str, isolation_id: str) -> AsyncIterator[Database]:
    schema = f"{isolation_id}_sagas"
    engine = make_engine(database_url, schema, pool_size=2)
    db = Database(engine, schema)
    try:
        await PostgresBusinessStore(engine, schema).migrate()  # the store's DDL: all tables
        yield db
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def db(database: Database) -> Database:
    """The module's database, emptied (the tests count rows, ask for due sagas and take
    leases from the first generation)."""
    async with database.engine.begin() as conn:
        await conn.execute(text("TRUNCATE sagas, saved_replies, query_balances, "
                                "query_history, query_events_seen, query_transfers, "
                                "saga_leases"))
    database.statements.clear()
    return database


@pytest_asyncio.fixture(loop_scope="session")
async def state(db: Database) -> PostgresSagaState:
    return db.state()


@dataclass
class Ports:
    sagas: SagaRepository
    replies: ReplyCache
    #: Ends a round of puts: nothing for the dicts and the buffered variant, a flush else.
    settle: Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def _ports(request: pytest.FixtureRequest) -> Ports:
    if request.param == "in-memory":
        return Ports(DictSagas(), DictReplies(), _nothing)
    pg: PostgresSagaState = request.getfixturevalue("state")
    flushed = request.param == "postgresql"
    return Ports(pg.sagas, pg.replies, pg.flush if flushed else _nothing)


_IN_MEMORY = "in-memory"
_FLUSHED = pytest.param("postgresql", marks=pytest.mark.integration)
_BUFFERED = pytest.param("postgresql-buffered", marks=pytest.mark.integration)


@pytest.fixture(params=[_IN_MEMORY, _FLUSHED, _BUFFERED])
def ports(request: pytest.FixtureRequest) -> Ports:
    return _ports(request)


@pytest.fixture(params=[_IN_MEMORY, _FLUSHED])
def stored_ports(request: pytest.FixtureRequest) -> Ports:
    """The ports whose data is stored before a purge (see the module's docstring)."""
    return _ports(request)


# --------------------------------------------------------------------------------------
# the port's contract: the dicts and PostgreSQL
# --------------------------------------------------------------------------------------


async def test_a_put_saga_is_got_back_and_the_latest_put_wins(ports: Ports) -> None:
    first = saga("tr-1", deadline=T0 + 5)
    assert await ports.sagas.get("tr-1") is None
    ports.sagas.put(first)
    assert as_stored(await ports.sagas.get("tr-1")) == s.saga_to_dict(first)
    await ports.settle()
    assert as_stored(await ports.sagas.get("tr-1")) == s.saga_to_dict(first)
    later = saga("tr-1", state=State.COMPLETED, updated_at=T0 + 9)
    ports.sagas.put(later)
    assert as_stored(await ports.sagas.get("tr-1")) == s.saga_to_dict(later)
    await ports.settle()
    assert as_stored(await ports.sagas.get("tr-1")) == s.saga_to_dict(later)
    assert await ports.sagas.get("tr-2") is None


async def test_a_put_reply_is_got_back_and_the_latest_put_wins(ports: Ports) -> None:
    key = "alice\x1freq-1"
    assert await ports.replies.get(key) is None
    ports.replies.put(key, b'{"status":"pending"}', at=T0, partition=1)
    assert await ports.replies.get(key) == b'{"status":"pending"}'
    await ports.settle()
    assert await ports.replies.get(key) == b'{"status":"pending"}'
    ports.replies.put(key, b"\x00\xff binary", at=T0 + 1, partition=1)
    await ports.settle()
    assert await ports.replies.get(key) == b"\x00\xff binary"
    assert await ports.replies.get("alice\x1freq-2") is None


async def test_due_sagas_are_their_partition_s_earliest_first(ports: Ports) -> None:
    now = T0 + 50
    for built in (
        saga("late", deadline=T0 + 30), saga("early", deadline=T0 + 10),
        saga("tie-a", deadline=T0 + 20), saga("tie-B", deadline=T0 + 20),
        saga("at-now", state=State.AWAITING_OTP, deadline=now),
        saga("future", deadline=now + 0.001),
        saga("final", state=State.COMPLETED),
        saga("manual", state=State.MANUAL_REVIEW),
        saga("elsewhere", partition=2, deadline=T0),
    ):
        ports.sagas.put(built)
    await ports.settle()
    # Ties by transfer id as Python orders strings ("B" < "a"), not by a locale.
    everything = ["early", "tie-B", "tie-a", "late", "at-now"]
    assert await ports.sagas.due(0, now, 100) == everything
    assert await ports.sagas.due(0, now, 2) == everything[:2]
    assert await ports.sagas.due(0, now, 0) == []
    assert await ports.sagas.due(0, T0, 100) == []
    assert await ports.sagas.due(2, now, 100) == ["elsewhere"]
    assert await ports.sagas.due(1, now, 100) == []


async def test_due_sagas_follow_their_latest_put(ports: Ports) -> None:
    for name, deadline in (("d1", T0 + 1), ("d2", T0 + 2), ("d3", T0 + 3), ("later", T0 + 99)):
        ports.sagas.put(saga(name, deadline=deadline))
    await ports.settle()
    ports.sagas.put(saga("d1", state=State.COMPLETED, updated_at=T0 + 4))  # no longer due
    ports.sagas.put(saga("later", state=State.CREDITING, deadline=T0 + 2.5))  # due now
    ports.sagas.put(saga("new", partition=0, deadline=T0))  # never stored
    ports.sagas.put(saga("moved", partition=3, deadline=T0))  # another partition
    assert await ports.sagas.due(0, T0 + 10, 100) == ["new", "d2", "later", "d3"]
    assert await ports.sagas.due(0, T0 + 10, 2) == ["new", "d2"]
    await ports.settle()
    assert await ports.sagas.due(0, T0 + 10, 100) == ["new", "d2", "later", "d3"]


async def test_purge_forgets_the_partition_s_old_completed_and_failed_sagas(
    stored_ports: Ports,
) -> None:
    sagas = stored_ports.sagas
    cutoff = T0 + 100
    kept = [
        saga("manual", state=State.MANUAL_REVIEW),  # operators must act: never purged
        saga("waiting", state=State.DEBITING, deadline=T0 + 5),
        saga("at-cutoff", state=State.COMPLETED, updated_at=cutoff),
        saga("elsewhere", partition=1, state=State.FAILED),
    ]
    old = [saga("done", state=State.COMPLETED), saga("failed", state=State.FAILED,
                                                     updated_at=cutoff - 0.001)]
    for built in kept + old:
        sagas.put(built)
    await stored_ports.settle()
    for built in kept + old:  # read before the purge (a cache must not keep them)
        assert await sagas.get(built.transfer.transfer_id) is not None
    assert await sagas.purge(0, cutoff) == 2
    for built in old:
        assert await sagas.get(built.transfer.transfer_id) is None
    for built in kept:
        assert as_stored(await sagas.get(built.transfer.transfer_id)) == s.saga_to_dict(built)
    assert await sagas.purge(0, cutoff) == 0
    assert await sagas.purge(1, cutoff) == 1


async def test_purge_forgets_the_partition_s_old_replies(stored_ports: Ports) -> None:
    replies = stored_ports.replies
    cutoff = T0 + 100
    replies.put("old-1", b"1", at=T0, partition=0)
    replies.put("old-2", b"2", at=cutoff - 0.001, partition=0)
    replies.put("at-cutoff", b"3", at=cutoff, partition=0)
    replies.put("elsewhere", b"4", at=T0, partition=1)
    await stored_ports.settle()
    for key in ("old-1", "old-2", "at-cutoff", "elsewhere"):
        assert await replies.get(key) is not None
    assert await replies.purge(0, cutoff) == 2
    assert [await replies.get(k) for k in ("old-1", "old-2", "at-cutoff", "elsewhere")] == [
        None, None, b"3", b"4"]
    assert await replies.purge(0, cutoff) == 0
    assert await replies.purge(1, cutoff) == 1


# --------------------------------------------------------------------------------------
# PostgreSQL: the batch
# --------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_put_is_seen_by_another_worker_only_once_flushed(db: Database) -> None:
    writer, reader = db.state(), db.state()
    writer.sagas.put(saga("tr-1", deadline=T0))
    writer.replies.put("k-1", b"reply", at=T0, partition=0)
    assert writer.pending == 2
    assert await reader.sagas.get("tr-1") is None
    assert await reader.replies.get("k-1") is None
    assert await reader.sagas.due(0, T0, 10) == []
    await writer.flush()
    assert writer.pending == 0
    # The reader's batch remembers what it read until it ends (flush or discard).
    assert await reader.sagas.get("tr-1") is None
    await reader.flush()  # nothing to write: the batch ends
    assert as_stored(await reader.sagas.get("tr-1")) == as_stored(saga("tr-1", deadline=T0))
    assert await reader.replies.get("k-1") == b"reply"
    assert await reader.sagas.due(0, T0, 10) == ["tr-1"]


@pytest.mark.integration
@pytest.mark.parametrize("size", [5, 500])
async def test_a_flush_is_one_statement_whatever_the_batch_holds(db: Database,
                                                                 size: int) -> None:
    state = db.state()
    await state.flush()  # an empty batch: no statement
    assert db.statements == []
    for i in range(size):
        state.sagas.put(saga(f"tr-{i:04d}", partition=i % 4, deadline=T0 + i))
        state.replies.put(f"k-{i:04d}", b"r%d" % i, at=T0 + i, partition=i % 4)
    state.sagas.put(saga("tr-0000", state=State.COMPLETED, updated_at=T0 + 1))  # the latest
    await state.flush()
    assert len(db.statements) == 1 and "INSERT INTO sagas" in db.statements[0]
    assert state.pending == 0
    assert await db.rows("sagas") == size and await db.rows("saved_replies") == size
    other = db.state()
    got = await other.sagas.get("tr-0000")
    assert got is not None and got.state is State.COMPLETED
    assert await other.replies.get(f"k-{size - 1:04d}") == b"r%d" % (size - 1)


@pytest.mark.integration
async def test_prefetch_reads_a_batch_in_one_statement_then_get_reads_nothing(
    db: Database,
) -> None:
    writer = db.state()
    writer.sagas.put(saga("a", deadline=T0))
    writer.sagas.put(saga("b", state=State.FAILED))
    writer.replies.put("ka", b"A", at=T0, partition=0)
    await writer.flush()
    state = db.state()
    state.sagas.put(saga("buffered", deadline=T0))
    state.replies.put("kb", b"B", at=T0, partition=0)
    db.statements.clear()
    await state.prefetch(["a", "b", "missing", "a", "buffered"], ["ka", "kb", "k-missing"])
    assert len(db.statements) == 1
    prefetch = db.statements[0]
    assert "FROM sagas" in prefetch and "FROM saved_replies" in prefetch
    db.statements.clear()
    assert as_stored(await state.sagas.get("a")) == as_stored(saga("a", deadline=T0))
    assert as_stored(await state.sagas.get("b")) == as_stored(saga("b", state=State.FAILED))
    assert await state.sagas.get("missing") is None
    assert await state.sagas.get("buffered") is not None
    assert [await state.replies.get(k) for k in ("ka", "kb", "k-missing")] == [b"A", b"B", None]
    await state.prefetch(["a", "missing", "buffered"], ["ka", "k-missing"])  # all known
    await state.prefetch([], [])
    assert db.statements == []


@pytest.mark.integration
async def test_a_saga_read_back_as_it_was_written_is_not_parsed_again(db: Database) -> None:
    """The next cycle reads back the sagas the last one wrote: the same stored bytes are the
    same (immutable) saga, taken from what the process stored, not parsed again; a saga
    whose stored form changed is parsed."""
    written = saga("memo", deadline=T0)
    writer = db.state()
    writer.sagas.put(written)
    await writer.flush()
    reader = db.state()
    await reader.prefetch(["memo"], [])
    assert reader.read_ahead("memo") is written
    async with db.engine.begin() as conn:  # another version of the row, written elsewhere
        other = saga("memo", state=State.CREDITING, deadline=T0 + 9)
        await conn.execute(text("UPDATE sagas SET saga = :s WHERE transfer_id = 'memo'"),
                           {"s": orjson.dumps(s.saga_to_dict(other))})
    again = db.state()
    read = await again.sagas.get("memo")
    assert read is not written and as_stored(read) == as_stored(other)
    assert len(STORED_SAGAS) <= STORED_SAGAS.size


def test_the_stored_sagas_remembered_are_bounded_the_oldest_out_first() -> None:
    memo = StoredSagas(2)
    first, second, third = (saga(name) for name in ("m1", "m2", "m3"))
    stored = [orjson.dumps(s.saga_to_dict(x)) for x in (first, second, third)]
    for raw, x in zip(stored, (first, second, third), strict=True):
        memo.remember(raw, x)
    assert len(memo) == 2
    assert memo.saga_of(stored[2]) is third and memo.saga_of(stored[1]) is second
    parsed = memo.saga_of(stored[0])  # forgotten: parsed again, equal
    assert parsed is not first and parsed == first
    assert len(memo) == 2


@pytest.mark.integration
async def test_get_reads_a_key_once_per_batch(db: Database) -> None:
    state = db.state()
    assert await state.sagas.get("absent") is None
    assert await state.replies.get("absent") is None
    assert len(db.statements) == 2
    assert await state.sagas.get("absent") is None
    assert await state.replies.get("absent") is None
    assert len(db.statements) == 2
    await state.flush()  # the batch ends: the next one reads again
    assert await state.sagas.get("absent") is None
    assert len(db.statements) == 3


@pytest.mark.integration
async def test_discard_forgets_the_buffer_and_the_cache(db: Database) -> None:
    state, other = db.state(), db.state()
    state.sagas.put(saga("tr-1", deadline=T0))
    state.replies.put("k-1", b"1", at=T0, partition=0)
    assert await state.sagas.get("tr-2") is None  # cached as absent
    other.sagas.put(saga("tr-2", state=State.FAILED))
    await other.flush()
    state.discard()
    assert state.pending == 0
    assert await state.sagas.get("tr-1") is None
    assert await state.replies.get("k-1") is None
    assert await state.sagas.due(0, T0, 10) == []
    assert await state.sagas.get("tr-2") is not None  # read again
    await state.flush()
    assert await db.rows("sagas") == 1 and await db.rows("saved_replies") == 0


@pytest.mark.integration
async def test_due_is_one_statement_and_the_buffer_overrides_stored_rows(db: Database) -> None:
    writer = db.state()
    for name, deadline in (("d1", T0 + 1), ("d2", T0 + 2), ("d3", T0 + 3)):
        writer.sagas.put(saga(name, deadline=deadline))
    await writer.flush()
    state = db.state()
    state.sagas.put(saga("d1", deadline=T0 + 50))  # stored due, buffered not yet due
    state.sagas.put(saga("d3", state=State.FAILED))
    db.statements.clear()
    assert await state.sagas.due(0, T0 + 10, 1) == ["d2"]  # not [] : the limit is the SQL's
    assert len(db.statements) == 1
    assert await state.sagas.due(0, T0 + 60, 10) == ["d2", "d1"]


@pytest.mark.integration
async def test_buffered_sagas_and_replies_are_not_purged(db: Database) -> None:
    state = db.state()
    state.sagas.put(saga("done", state=State.COMPLETED))
    state.replies.put("k", b"1", at=T0, partition=0)
    await state.flush()
    state.sagas.put(saga("done", state=State.COMPLETED, updated_at=T0 + 1))
    state.replies.put("k", b"2", at=T0 + 1, partition=0)
    assert await state.sagas.purge(0, T0 + 100) == 0
    assert await state.replies.purge(0, T0 + 100) == 0
    await state.flush()
    assert await state.sagas.purge(0, T0 + 100) == 1
    assert await state.replies.purge(0, T0 + 100) == 1
    assert await db.rows("sagas") == 0 and await db.rows("saved_replies") == 0


# --------------------------------------------------------------------------------------
# PostgreSQL: failures
# --------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_failed_flush_writes_nothing_and_keeps_the_buffer(db: Database) -> None:
    """One bad row fails the whole flush (one transaction) as the data's fault (poison);
    the rest of the batch, valid, is not written either. PostgreSQL refuses NUL in text
    (a transfer id: they are uuids, so it cannot happen but by a bug)."""
    state = db.state()
    for i in range(3):
        state.sagas.put(saga(f"tr-{i}", deadline=T0))
        state.replies.put(f"k-{i}", b"ok", at=T0, partition=0)
    state.sagas.put(saga("tr-\x00", deadline=T0))  # no transfer id holds one (a uuid)
    with pytest.raises(Exception) as failure:  # checked by its SQLSTATE
        await state.flush()
    assert (sqlstate(failure.value) or "")[:2] == "22"  # data exception
    assert not is_outage(failure.value)
    assert await db.rows("sagas") == 0 and await db.rows("saved_replies") == 0
    assert state.pending == 7
    assert await state.sagas.get("tr-1") is not None  # still the batch's
    assert await state.replies.get("k-1") == b"ok"


@pytest.mark.integration
async def test_any_string_a_saga_holds_is_stored_nul_included(db: Database) -> None:
    """A saga is stored as orjson's bytes: a note with a NUL (which jsonb refuses) is
    kept as it is, and the batch with it is written."""
    state = db.state()
    state.sagas.put(replace(saga("tr-nul"), transfer=transfer("tr-nul", note="a\x00b")))
    await state.flush()
    stored = await db.state().saga("tr-nul")
    assert stored is not None and stored.transfer.note == "a\x00b"


@pytest.mark.integration
async def test_a_flush_on_a_lost_connection_is_an_outage_and_can_be_retried(
    database_url: str, db: Database,
) -> None:
    engine = make_engine(database_url, db.schema, pool_size=1)
    pids = server_pids(engine)
    try:
        state = PostgresSagaState(engine, db.schema)
        assert await state.sagas.get("warm-up") is None  # the pool's one connection
        assert len(pids) == 1
        async with db.engine.connect() as admin:  # the server ends it (waits until gone)
            ended = await admin.scalar(text("SELECT pg_terminate_backend(:pid, 10000)"),
                                       {"pid": pids[0]})
        assert ended
        state.sagas.put(saga("tr-1", deadline=T0))
        state.replies.put("k-1", b"1", at=T0, partition=0)
        with pytest.raises(Exception) as failure:  # whatever asyncpg raises
            await state.flush()
        assert is_outage(failure.value), repr(failure.value)
        assert state.pending == 2
        await state.flush()  # a new connection
        assert len(pids) == 2
        assert state.pending == 0
        assert await db.rows("sagas") == 1 and await db.rows("saved_replies") == 1
    finally:
        await engine.dispose()


@pytest.mark.integration
async def test_an_unreachable_database_is_an_outage(db: Database) -> None:
    engine = make_engine("postgresql+asyncpg://nobody:nothing@127.0.0.1:1/none", db.schema,
                         pool_size=1)
    try:
        state = PostgresSagaState(engine, db.schema)
        state.sagas.put(saga("tr-1", deadline=T0))
        with pytest.raises(OSError) as failure:
            await state.flush()
        assert is_outage(failure.value)
        assert state.pending == 1
        with pytest.raises(OSError):
            await state.sagas.get("tr-2")
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------------------
# PostgreSQL: the storage form, the operator's reads, the migration
# --------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_saga_round_trips_with_its_columns(db: Database) -> None:
    built = real_sagas("rt")
    state = db.state()
    for one in built:
        state.sagas.put(one)
    await state.flush()
    reader = db.state()
    for one in built:
        tid = one.transfer.transfer_id
        stored = s.saga_to_dict(one)
        assert as_stored(await reader.sagas.get(tid)) == stored
        assert as_stored(await reader.saga(tid)) == stored
        again = await reader.saga(tid)
        assert again == one
        # Byte for byte: the stored form is orjson's bytes, key order included.
        assert orjson.dumps(s.saga_to_dict(again)) == orjson.dumps(stored)
        assert again.transfer.note == NOTE
    async with db.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT transfer_id, home_partition, operator_id, state, deadline, updated_at"
            " FROM sagas ORDER BY transfer_id"))).all()
    expected = sorted((x.transfer.transfer_id, 5, "alice", x.state.value, x.deadline(),
                       x.updated_at) for x in built)
    assert [tuple(r) for r in rows] == expected
    assert [r[4] is None for r in rows].count(True) == 2  # the completed and the failed


@pytest.mark.integration
async def test_the_operator_lists_sagas_by_state_and_age_from_the_table(db: Database) -> None:
    state = db.state()
    for name, st, at in (("m1", State.MANUAL_REVIEW, T0 + 3), ("m2", State.MANUAL_REVIEW, T0),
                         ("m3", State.MANUAL_REVIEW, T0 + 9), ("c1", State.COMPLETED, T0 + 1),
                         ("w1", State.DEBITING, T0 + 2)):
        state.sagas.put(saga(name, state=st, updated_at=at,
                             deadline=T0 + 5 if st in s.STEP_OF_STATE else None))
    await state.flush()
    state.sagas.put(saga("m0", state=State.MANUAL_REVIEW))  # buffered: not listed

    def ids(found: list[Saga]) -> list[str]:
        return [x.transfer.transfer_id for x in found]

    assert ids(await state.list_sagas(None, None, 10)) == ["m2", "c1", "w1", "m1", "m3"]
    assert ids(await state.list_sagas("MANUAL_REVIEW", None, 10)) == ["m2", "m1", "m3"]
    assert ids(await state.list_sagas("MANUAL_REVIEW", T0 + 9, 10)) == ["m2", "m1"]
    assert ids(await state.list_sagas(None, T0 + 2, 10)) == ["m2", "c1"]
    assert ids(await state.list_sagas("MANUAL_REVIEW", None, 1)) == ["m2"]
    assert await state.list_sagas("FAILED", None, 10) == []
    assert await state.list_sagas(None, None, 0) == []
    assert await state.saga("m0") is None  # the table only
    assert await state.saga("m3") is not None


@pytest.mark.integration
async def test_sagas_are_counted_by_state_for_the_given_partitions(db: Database) -> None:
    state = db.state()
    for name, partition, st in (("a", 0, State.DEBITING), ("b", 0, State.DEBITING),
                                ("c", 1, State.MANUAL_REVIEW), ("d", 1, State.COMPLETED),
                                ("e", 2, State.DEBITING)):
        state.sagas.put(saga(name, partition=partition, state=st,
                             deadline=T0 if st in s.STEP_OF_STATE else None))
    await state.flush()
    state.sagas.put(saga("f", partition=0, state=State.DEBITING, deadline=T0))  # buffered
    counts = await state.count_by_state([0, 1], ["DEBITING", "MANUAL_REVIEW", "CREDITING"])
    assert counts == {"DEBITING": 2, "MANUAL_REVIEW": 1}
    assert await state.count_by_state([], ["DEBITING"]) == {}


@pytest.mark.integration
async def test_migrate_adds_the_tables_to_an_existing_database(
    database_url: str, isolation_id: str,
) -> None:
    schema = f"{isolation_id}_old"
    engine = make_engine(database_url, schema, pool_size=1)
    before = DDL[: DDL.index("CREATE TABLE IF NOT EXISTS sagas")]  # the previous version
    try:
        await ensure_schema(engine, schema, before)
        async with engine.connect() as conn:
            assert (await conn.scalar(text("SELECT to_regclass('sagas')"))) is None
        state = PostgresSagaState(engine, schema)
        await state.migrate()
        state.sagas.put(saga("tr-1", deadline=T0))
        state.replies.put("k-1", b"1", at=T0, partition=0)
        await state.flush()
        await PostgresBusinessStore(engine, schema).migrate()  # one version: nothing to do
        assert await state.sagas.due(0, T0, 10) == ["tr-1"]
        async with engine.connect() as conn:
            indexes = set((await conn.execute(text(
                "SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                {"s": schema})).scalars())
        assert {"sagas_due_idx", "sagas_finished_idx", "sagas_state_idx",
                "saved_replies_age_idx"} <= indexes
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()



@pytest.mark.integration
async def test_reply_keys_holding_nul_or_backslashes_are_kept_apart(db: Database) -> None:
    """A request id may hold any character: keys with NUL (which PostgreSQL's text
    refuses) and backslashes are stored, read back by get and by prefetch, purged, and
    never confused with one another."""
    keys = ["op\x1freq", "op\x1freq\x00", "op\x1freq\\0", "op\x1freq\\\\0", "op\x1f\x00\\"]
    state = db.state()
    for i, key in enumerate(keys):
        state.replies.put(key, b"reply-%d" % i, at=T0, partition=1)
    await state.flush()
    assert await db.rows("saved_replies") == len(keys)
    reader = db.state()
    for i, key in enumerate(keys):
        assert await reader.replies.get(key) == b"reply-%d" % i
    ahead = db.state()
    await ahead.prefetch([], keys)
    for i, key in enumerate(keys):
        assert ahead.replies.cache[key] is not None
        assert await ahead.replies.get(key) == b"reply-%d" % i
    assert await db.state().replies.purge(1, T0 + 1) == len(keys)
    assert await db.rows("saved_replies") == 0


@pytest.mark.integration
async def test_a_flush_writes_nothing_once_another_engine_took_a_lease(db: Database) -> None:
    """Fencing: engine A holds partitions 0 and 1; B takes partition 1 (A lost it during
    an outage, say). A's batch touching partition 1 writes nothing at all (its partition 0
    rows neither) and keeps its buffer; B writes; A writing partition 0 alone still
    can."""
    a, b = db.state(), db.state()
    assert await a.take_leases([0, 1], "engine-a") == {0: 1, 1: 1}
    assert await b.take_leases([1], "engine-b") == {1: 2}
    a.sagas.put(saga("tr-a0", partition=0, deadline=T0))
    a.sagas.put(saga("tr-a1", partition=1, deadline=T0))
    a.replies.put("op\x1fr-a", b"a", at=T0, partition=1)
    with pytest.raises(LeaseLost):
        await a.flush()
    assert await db.rows("sagas") == 0 and await db.rows("saved_replies") == 0
    assert a.pending == 3
    b.sagas.put(saga("tr-a1", partition=1, state=State.COMPLETED, updated_at=T0 + 5))
    await b.flush()
    stored = await db.state().saga("tr-a1")
    assert stored is not None and stored.state is State.COMPLETED
    a.discard()
    a.sagas.put(saga("tr-a0", partition=0, deadline=T0))
    await a.flush()
    assert await db.rows("sagas") == 2
    # Taking again is one more generation, whoever held it.
    assert await a.take_leases([1], "engine-a") == {1: 3}
    b.sagas.put(saga("tr-b", partition=1, deadline=T0))
    with pytest.raises(LeaseLost):
        await b.flush()


@pytest.mark.integration
async def test_a_sealed_batch_is_what_was_buffered_when_sealed(db: Database) -> None:
    """The saga engine seals a cycle's writes, then decides the next cycle while they are
    written: a put made after the seal is not written with it and stays buffered; the
    sealed versions leave the buffer once written (one a later put replaced stays), and
    are then answered without I/O, as PostgreSQL holds them."""
    state = db.state()
    state.sagas.put(saga("tr-1", deadline=T0))
    state.sagas.put(saga("tr-2", deadline=T0))
    state.replies.put("k-1", b"first", at=T0, partition=0)
    sealed = state.seal()
    newer = saga("tr-2", state=State.COMPLETED, updated_at=T0 + 5)
    state.sagas.put(newer)  # the next cycle's decisions, made while the write runs
    state.sagas.put(saga("tr-3", deadline=T0))
    assert as_stored(await state.sagas.get("tr-2")) == as_stored(newer)
    await state.write(sealed)
    other = db.state()
    assert as_stored(await other.sagas.get("tr-2")) == as_stored(saga("tr-2", deadline=T0))
    assert await other.sagas.get("tr-3") is None
    state.written(sealed)
    assert state.pending == 2  # tr-2's later version and tr-3
    db.statements.clear()
    assert as_stored(await state.sagas.get("tr-1")) == as_stored(saga("tr-1", deadline=T0))
    assert as_stored(await state.sagas.get("tr-2")) == as_stored(newer)
    assert await state.replies.get("k-1") == b"first"
    assert db.statements == []
    await state.write(state.seal())
    assert (await db.state().saga("tr-2")).state is State.COMPLETED  # type: ignore[union-attr]


@pytest.mark.integration
async def test_a_sealed_batch_written_again_after_an_outage_is_the_same(db: Database) -> None:
    """A write the database did not take (an outage) is retried with the same sealed batch:
    the same versions, the upserts idempotent."""
    state = db.state()
    state.sagas.put(saga("tr-1", deadline=T0))
    state.replies.put("k-1", b"r", at=T0, partition=0)
    sealed = state.seal()
    await state.write(sealed)
    state.sagas.put(saga("tr-1", state=State.COMPLETED, updated_at=T0 + 5))
    await state.write(sealed)  # the retry of a write whose answer was lost
    assert await db.rows("sagas") == 1 and await db.rows("saved_replies") == 1
    state.written(sealed)
    await state.write(state.seal())
    assert (await db.state().saga("tr-1")).state is State.COMPLETED  # type: ignore[union-attr]


@pytest.mark.integration
async def test_a_batch_sealed_under_a_lease_taken_again_since_writes_nothing(
        db: Database) -> None:
    """The generations are the seal's: a batch sealed before the partition's lease was
    taken again, even by the same engine (a rebalance that gave it back), is refused, so
    what was decided under the old lease is never written over what came after."""
    state = db.state()
    assert await state.take_leases([0], "engine-a") == {0: 1}
    state.sagas.put(saga("tr-1", deadline=T0))
    sealed = state.seal()
    assert await state.take_leases([0], "engine-a") == {0: 2}
    with pytest.raises(LeaseLost):
        await state.write(sealed)
    assert await db.rows("sagas") == 0
    await state.write(state.seal())  # sealed under generation 2
    assert await db.rows("sagas") == 1


# --------------------------------------------------------------------------------------
# the account query rows (written by the saga engine's cycle, read by the query side)
# --------------------------------------------------------------------------------------


def account_event(account: str, n: int, balance: int, *, amount: int = 100) -> AccountEvent:
    return AccountEvent.model_validate({
        "eventId": f"ev-{account}-{n}", "commandId": f"cmd-{account}-{n}",
        "accountId": account, "type": "credited", "amountMinor": amount, "currency": "EUR",
        "balanceAfterMinor": balance, "occurredAt": f"2026-11-30T10:00:{n:02d}Z"})


def projection(state: PostgresSagaState) -> AccountProjection:
    rows = state.rows
    return AccountProjection(rows["query_balances"], rows["query_history"],
                             rows["query_events_seen"])


def dict_projection() -> tuple[AccountProjection, list[DictKeyValue]]:
    tables = [DictKeyValue(), DictKeyValue(), DictKeyValue()]
    return AccountProjection(*tables), tables


async def stored_rows(db: Database, table: str) -> dict[str, tuple[int, bytes]]:
    async with db.engine.connect() as conn:
        result = await conn.execute(text(
            f"SELECT key, home_partition, value FROM {table}"))  # noqa: S608
        return {str(k): (int(p), bytes(v)) for k, p, v in result}


#: Account ids the rows must keep apart: a NUL, backslashes, the separator's neighbours.
ACCOUNTS = ("p0-alice", "p1-bob\\0", "p1-bob\x00", "p2-carol")


@pytest.mark.integration
async def test_query_rows_are_read_ahead_written_in_the_flush_and_match_the_projection(
    db: Database,
) -> None:
    """The engine's use: the cycle's keys read in one statement, the projection applied
    with no I/O, every row written by the one flush statement, with its key's home
    partition; the rows are exactly what the projection writes over dicts."""
    events = [account_event(a, n, 1_000 + 100 * n) for n in range(1, 4) for a in ACCOUNTS]
    state = db.state()
    await state.prefetch([], [], {
        "query_balances": [e.account_id for e in events],
        "query_events_seen": [f"{e.account_id}{SEP}{e.command_id}" for e in events]})
    assert len(db.statements) == 1
    applied = projection(state)
    expected, tables = dict_projection()
    for ev in events:
        assert applied.apply(ev) is expected.apply(ev) is True
    assert len(db.statements) == 1  # nothing read while applying
    await state.flush()
    assert len(db.statements) == 2 and "INSERT INTO query_balances" in db.statements[1]
    assert state.pending == 0
    for table, dicts in zip(ROW_TABLES[:3], tables, strict=True):  # the account tables
        stored = await stored_rows(db, table)
        assert len(stored) == len(dicts.rows), table
        for key, value in dicts.rows.items():
            home, got = stored[db_key(key)]
            assert (home, got) == (account_home(key), value), (table, key)
    # Applied again by a later batch (a redelivery): nothing changes.
    again = db.state()
    await again.prefetch([], [], {
        "query_balances": [e.account_id for e in events],
        "query_events_seen": [f"{e.account_id}{SEP}{e.command_id}" for e in events]})
    for ev in events:  # a seen mark found: its history row is read, then it is known
        while True:
            try:
                assert projection(again).apply(ev) is False
                break
            except NotReadAhead as miss:
                await again.read_row(miss.table, miss.key)
    assert again.pending == 0


@pytest.mark.integration
async def test_a_query_row_not_read_ahead_is_refused_then_read_alone(db: Database) -> None:
    writer = db.state()
    writer.rows["query_balances"].put("p3-dave", b'{"seq": 1}')
    await writer.flush()
    state = db.state()
    view = state.rows["query_balances"]
    with pytest.raises(NotReadAhead) as refused:
        view.get("p3-dave")
    assert (refused.value.table, refused.value.key) == ("query_balances", "p3-dave")
    db.statements.clear()
    await state.read_row("query_balances", "p3-dave")
    await state.read_row("query_balances", "p3-nobody")
    assert len(db.statements) == 2
    assert view.get("p3-dave") == b'{"seq": 1}' and view.get("p3-nobody") is None
    view.put("p3-dave", b'{"seq": 2}')  # the buffer answers before the cache
    assert view.get("p3-dave") == b'{"seq": 2}'
    await state.prefetch([], [], {"query_balances": ["p3-dave", "p3-nobody"]})
    assert len(db.statements) == 2  # all known: nothing read
    state.discard()
    assert state.pending == 0
    with pytest.raises(NotReadAhead):
        view.get("p3-dave")
    assert (await stored_rows(db, "query_balances"))["p3-dave"][1] == b'{"seq": 1}'


@pytest.mark.integration
async def test_query_rows_are_fenced_by_their_account_s_partition_lease(db: Database) -> None:
    """A worker that lost the partition of an account writes none of its rows (nor any
    other row of its batch)."""
    a, b = db.state(), db.state()
    await a.take_leases([0, 1], "engine-a")
    await b.take_leases([1], "engine-b")
    await a.prefetch([], [], {"query_balances": ["p0-alice", "p1-bob"],
                              "query_events_seen": ["p0-alice\x1fcmd-p0-alice-1",
                                                    "p1-bob\x1fcmd-p1-bob-1"]})
    projection(a).apply(account_event("p0-alice", 1, 500))
    projection(a).apply(account_event("p1-bob", 1, 700))
    with pytest.raises(LeaseLost):
        await a.flush()
    assert [await db.rows(t) for t in ROW_TABLES] == [0, 0, 0, 0]
    a.discard()
    await a.prefetch([], [], {"query_balances": ["p0-alice"],
                              "query_events_seen": ["p0-alice\x1fcmd-p0-alice-1"]})
    assert projection(a).apply(account_event("p0-alice", 1, 500)) is True
    await a.flush()
    assert [await db.rows(t) for t in ROW_TABLES] == [1, 1, 1, 0]


@pytest.mark.integration
async def test_a_flush_under_leases_is_still_one_statement(db: Database) -> None:
    """The leases' check costs no round trip of its own: locked and compared inside the
    flush's one statement, written or refused whole."""
    state, other = db.state(), db.state()
    await state.take_leases([0, 2], "engine-a")
    state.sagas.put(saga("tr-l0", partition=0, deadline=T0))
    state.replies.put("op\x1fr-l2", b"r", at=T0, partition=2)
    db.statements.clear()
    await state.flush()
    assert len(db.statements) == 1 and "FOR SHARE" in db.statements[0]
    assert await db.rows("sagas") == 1 and await db.rows("saved_replies") == 1
    await other.take_leases([2], "engine-b")
    state.replies.put("op\x1fr-l2b", b"r", at=T0, partition=2)
    state.sagas.put(saga("tr-l0b", partition=0, deadline=T0))
    db.statements.clear()
    with pytest.raises(LeaseLost, match=r"\[2\]"):
        await state.flush()
    assert len(db.statements) == 1
    assert await db.rows("sagas") == 1 and await db.rows("saved_replies") == 1
    # A partition this engine never leased is lost too.
    state.discard()
    state.sagas.put(saga("tr-l5", partition=5, deadline=T0))
    with pytest.raises(LeaseLost, match=r"\[5\]"):
        await state.flush()
    assert await db.rows("sagas") == 1


@pytest.mark.integration
async def test_a_transfer_s_row_is_homed_with_its_saga_and_written_in_the_same_flush(
        db: Database) -> None:
    """``at(partition)``: a transfer's details row carries its saga's home partition (not
    its key's hash), is fenced by that lease, and goes in the saga's flush statement."""
    state = db.state()
    await state.take_leases([3], "engine-a")
    await state.prefetch(["tr-h"], [], {"query_transfers": ["tr-h"]})
    view = state.rows["query_transfers"].at(3)
    assert view.get("tr-h") is None  # read ahead: known absent
    state.sagas.put(saga("tr-h", partition=3, deadline=T0))
    view.put("tr-h", b'{"state": "DEBITING", "seq": 1}')
    db.statements.clear()
    await state.flush()
    assert len(db.statements) == 1
    assert (await stored_rows(db, "query_transfers"))["tr-h"] == (
        3, b'{"state": "DEBITING", "seq": 1}')
    other = db.state()
    await other.take_leases([3], "engine-b")
    state.rows["query_transfers"].at(3).put("tr-h", b'{"state": "COMPLETED", "seq": 2}')
    with pytest.raises(LeaseLost):
        await state.flush()
    assert (await stored_rows(db, "query_transfers"))["tr-h"][1] == (
        b'{"state": "DEBITING", "seq": 1}')


@pytest.mark.integration
async def test_the_read_ahead_keeps_an_index_plan_as_its_tables_grow(
        database_url: str, isolation_id: str) -> None:
    """The business center's connections (``PostgresBusinessStore.from_settings``: the
    saga state's, the store's and the query tables') read by index whatever a table's size
    when PostgreSQL cached a statement's plan (app/adapters/db.py ``key_lookups``). Without
    it, the read-ahead's generic plan, cached after five executions while
    ``query_events_seen`` was young and analyzed (autovacuum does it after 50 rows), scans
    that table sequentially, comparing every row with every key, until it is analyzed
    again: measured 13 ms an execution to 40-80 ms 30 s into a run, growing with the
    table."""
    from app.adapters import saga_state as saga_state_module
    from app.settings import Settings

    schema = f"{isolation_id}_readplan"
    store = PostgresBusinessStore.from_settings(Settings(
        database_url=database_url, db_schema=schema, db_pool_size=1,
        kafka_bootstrap_servers="127.0.0.1:1"))
    grow = ("INSERT INTO query_events_seen (key, home_partition, value)"
            " SELECT 'acc' || chr(31) || 'cmd-' || i, 0, '\\x01'::bytea"
            " FROM generate_series($1::int, $2::int) AS i")
    try:
        await store.migrate()
        async with store.engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert await raw.fetchval("SHOW enable_seqscan") == "off"
            assert await raw.fetchval("SHOW jit") == "off"
            # Analyzed young, and not again during the test (an analyze would replan).
            await raw.execute("ALTER TABLE query_events_seen SET (autovacuum_enabled = off)")
            await raw.execute(grow, 1, 60)
            await raw.execute("ANALYZE query_events_seen")
            await raw.execute("PREPARE ahead(text[], text[], text[], text[], text[], text[])"
                              f" AS {saga_state_module._PREFETCH}")
            # The generic plan, as PostgreSQL takes it after five custom ones when it costs
            # no more than they did (the read-ahead's arrays vary in size from a cycle to
            # the next), planned and cached now, while the table is young.
            await raw.execute("SET plan_cache_mode = force_generic_plan")
            args = "'{t-1,t-2}', '{r-1}', '{a-1}', '{h-1}', $${k1,k2}$$, '{t-1,t-2}'"
            assert await raw.fetch(f"EXECUTE ahead({args})") == []
            await raw.execute(grow, 61, 30_000)
            plan = "\n".join(r[0] for r in await raw.fetch(f"EXPLAIN EXECUTE ahead({args})"))
            generic = await raw.fetchval(
                "SELECT generic_plans FROM pg_prepared_statements WHERE name = 'ahead'")
            await raw.execute("DEALLOCATE ahead; RESET plan_cache_mode")
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()
    assert generic >= 1, "the statement never reached a generic plan: nothing was tested"
    assert "query_events_seen_pkey" in plan and "Seq Scan" not in plan, plan
