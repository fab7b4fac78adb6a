"""The query tables' read side on PostgreSQL (app/adapters/query_tables.py).

The rows are written as the saga engine writes them: ``AccountProjection`` (or
``TransferProjection``) run over dicts, then every row inserted with its key escaped
(``saga_state.db_key``) and its home partition (the account's; a transfer's: its saga's).
The ``QueryService`` over PostgreSQL must then answer every balance, history and details
query exactly as the same service over the dicts does (tests/unit/test_queries_service.py
holds the answers' own rules), in the statements counted here (the adapter's connection,
wrapped, logs every statement sent through it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.db import make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.adapters.query_tables import PostgresQueryTables, stored_key
from app.adapters.saga_state import db_key
from app.query_service import (
    NOT_YOURS,
    SEP,
    AccountProjection,
    Answer,
    DictKeyValue,
    KeyValueReads,
    QueryService,
    TransferProjection,
    history_key,
)
from events.topics import partition_of
from schemas.wire import AccountEvent, AccountEventType, ErrorCode, QueryRequest, TransferEvent

pytestmark = pytest.mark.integration

PARTITIONS = 6
T0 = datetime(2030, 1, 2, tzinfo=UTC)
#: Account ids that only the key escaping keeps apart: NUL, a backslash, and the stored
#: form of the first one as a plain id.
NUL_ACCOUNT = "acc-\x00\\0-x"
ESCAPED_LOOKALIKE = "acc-\\0\\\\0-x"


class CountingConnection:
    """An asyncpg connection that logs the statements sent through it; any other use fails
    the test (so that nothing is sent uncounted)."""

    _STATEMENTS = frozenset({"fetch", "fetchrow", "fetchval", "execute"})
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

        def logged(query: str, *args: Any) -> Any:
            self._log.append(query)
            return method(query, *args)

        return logged


class CountedQueryTables(PostgresQueryTables):
    def __init__(self, engine: AsyncEngine, schema: str, statements: list[str]) -> None:
        super().__init__(engine, schema)
        self.statements = statements

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        async with super().connection() as raw:
            yield CountingConnection(raw, self.statements)


@dataclass
class Database:
    engine: AsyncEngine
    schema: str
    statements: list[str] = field(default_factory=list)


@dataclass
class Written:
    """The projection's tables over dicts, and the services over both stores."""

    db: Database
    balances: DictKeyValue = field(default_factory=DictKeyValue)
    history: DictKeyValue = field(default_factory=DictKeyValue)
    seen: DictKeyValue = field(default_factory=DictKeyValue)
    transfers: DictKeyValue = field(default_factory=DictKeyValue)

    def __post_init__(self) -> None:
        self.projection = AccountProjection(self.balances, self.history, self.seen)
        self.transfer_projection = TransferProjection(self.transfers)
        self.tables = CountedQueryTables(self.db.engine, self.db.schema, self.db.statements)
        self.pg = QueryService(self.tables.balances, self.tables.history,
                               self.tables.transfers)
        self.dicts = QueryService(KeyValueReads(self.balances), KeyValueReads(self.history),
                                  KeyValueReads(self.transfers))

    async def apply(self, events: Iterable[AccountEvent]) -> None:
        """Apply, then write every row of the three tables as the saga engine does."""
        for e in events:
            assert self.projection.apply(e)
        async with self.db.engine.begin() as conn:
            for table, kv in (("query_balances", self.balances),
                              ("query_history", self.history),
                              ("query_events_seen", self.seen)):
                await conn.execute(text(
                    f"INSERT INTO {table} (key, home_partition, value)"  # noqa: S608
                    " VALUES (:k, :p, :v)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ), [{"k": db_key(key), "p": home(key), "v": value}
                    for key, value in kv.rows.items()])

    async def apply_transfer_events(self, events: Iterable[TransferEvent],
                                    home_partition: int) -> None:
        """Apply, then write each transfer's row as the saga engine does: keyed by its
        transfer id (escaped), homed with its saga (``home_partition``, not where the id
        hashes), the projection's bytes as put; a later event overwrites it."""
        changed: set[str] = set()
        for e in events:
            assert self.transfer_projection.apply(e)
            changed.add(e.transfer_id)
        async with self.db.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO query_transfers (key, home_partition, value)"
                " VALUES (:k, :p, :v)"
                " ON CONFLICT (key) DO UPDATE SET home_partition = EXCLUDED.home_partition,"
                " value = EXCLUDED.value"
            ), [{"k": db_key(key), "p": home_partition, "v": self.transfers.rows[key]}
                for key in sorted(changed)])

    async def both(self, account: str, type_: str, params: dict[str, Any]
                   ) -> tuple[Answer, Answer]:
        """The answer over PostgreSQL, and over the dicts."""
        request = QueryRequest(request_id="r", operator_id="u", account_id=account,
                               currency="EUR", type=type_, params=params)
        return await self.pg.answer(request), await self.dicts.answer(request)


def home(key: str) -> int:
    return partition_of(key.split(SEP, 1)[0].encode(), PARTITIONS)


def event(n: int, *, account: str = "acc-alice", minutes: int | None = None,
          kind: AccountEventType = AccountEventType.CREDITED) -> AccountEvent:
    return AccountEvent(
        command_id=f"t{n:05d}:{'debit' if kind == AccountEventType.DEBITED else 'credit'}:0",
        type=kind, account_id=account, amount_minor=100, balance_after_minor=n * 100,
        occurred_at=T0 + timedelta(minutes=n if minutes is None else minutes))


def events(count: int, account: str = "acc-alice") -> list[AccountEvent]:
    return [event(n, account=account) for n in range(1, count + 1)]


def transfer_event(transfer_id: str, seq: int, state: str, *, code: str | None = None
                   ) -> TransferEvent:
    return TransferEvent(
        event_id=f"{transfer_id}:{seq}", transfer_id=transfer_id, seq=seq, state=state,
        operator_id="alice", from_account_id="acc-alice", to_account_id="acc-bob",
        amount_minor=1_250, currency="EUR", code=code,
        occurred_at=T0 + timedelta(seconds=seq))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def database(database_url: str, isolation_id: str) -> AsyncIterator[Database]:
    schema = f"{isolation_id}_queries"
    engine = make_engine(database_url, schema, pool_size=2)
    try:
        await PostgresBusinessStore(engine, schema).migrate()  # the store's DDL: all tables
        yield Database(engine, schema)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def written(database: Database) -> Written:
    async with database.engine.begin() as conn:
        await conn.execute(text(
            "TRUNCATE query_balances, query_history, query_events_seen, query_transfers"))
    database.statements.clear()
    return Written(database)


# --------------------------------------------------------------------------------------
# balance
# --------------------------------------------------------------------------------------


async def test_a_balance_is_the_stored_one_in_one_statement(written: Written) -> None:
    await written.apply([event(1), event(2, kind=AccountEventType.DEBITED)])
    written.db.statements.clear()
    pg, dicts = await written.both("acc-alice", "queryBalance", {})
    assert pg == dicts
    assert pg.data == {"accountId": "acc-alice", "currency": "EUR", "balanceMinor": 200,
                       "asOf": "2030-01-02T00:02:00Z"}
    assert len(written.db.statements) == 1
    unknown, _ = await written.both("acc-nobody", "queryBalance", {})
    assert unknown.data == {"accountId": "acc-nobody", "currency": "EUR", "balanceMinor": 0}


async def test_another_workers_commit_is_read_at_once(written: Written) -> None:
    """No cache: a row committed after a read is what the next read returns."""
    for n in (1, 2):
        await written.apply([event(n)])
        answer = await written.pg.balance("acc-alice", "EUR")
        assert answer.data is not None and answer.data["balanceMinor"] == n * 100


# --------------------------------------------------------------------------------------
# history pages
# --------------------------------------------------------------------------------------


async def test_history_pages_answer_as_the_dicts_do(written: Written) -> None:
    await written.apply(events(250))
    await written.apply(events(3, account="acc-bob"))
    at = (T0 + timedelta(minutes=1)).isoformat()
    cases: list[dict[str, Any]] = [
        {}, {"limit": 100}, {"limit": 7, "cursor": "250"}, {"limit": 7, "cursor": "3"},
        {"cursor": "1"}, {"cursor": "251"}, {"cursor": "0"},
        {"from": (T0 + timedelta(minutes=100)).isoformat()},
        {"to": (T0 + timedelta(minutes=100, seconds=30)).isoformat(), "limit": 5},
        {"from": (T0 + timedelta(minutes=40)).isoformat(),
         "to": (T0 + timedelta(minutes=60)).isoformat(), "limit": 100},
        {"from": (T0 + timedelta(minutes=40)).isoformat(),
         "to": (T0 + timedelta(minutes=60)).isoformat(), "limit": 8, "cursor": "50"},
        {"from": (T0 + timedelta(days=1)).isoformat()}, {"to": T0.isoformat()},
        {"from": at, "to": at},
    ]
    for params in cases:
        pg, dicts = await written.both("acc-alice", "queryTransactionHistory", params)
        assert pg == dicts, params
    bob, _ = await written.both("acc-bob", "queryTransactionHistory", {})
    assert bob.data is not None
    assert [i["balanceAfterMinor"] for i in bob.data["items"]] == [300, 200, 100]


async def test_paging_to_the_end_costs_two_statements_a_page(written: Written) -> None:
    await written.apply(events(95))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        written.db.statements.clear()
        params: dict[str, Any] = {"limit": 20} | ({"cursor": cursor} if cursor else {})
        pg, dicts = await written.both("acc-alice", "queryTransactionHistory", params)
        assert pg == dicts and pg.data is not None
        assert len(written.db.statements) == 2  # the head, then the page in one statement
        seen += [i["transferId"] for i in pg.data["items"]]
        cursor = pg.data.get("nextCursor")
        if cursor is None:
            break
    assert seen == [f"t{n:05d}" for n in range(95, 0, -1)]


async def test_a_window_is_found_by_point_reads(written: Written) -> None:
    await written.apply(events(1_000))
    written.db.statements.clear()
    window = {"from": (T0 + timedelta(minutes=500)).isoformat(),
              "to": (T0 + timedelta(minutes=510)).isoformat(), "limit": 100}
    pg, dicts = await written.both("acc-alice", "queryTransactionHistory", window)
    assert pg == dicts and pg.data is not None
    assert [i["transferId"] for i in pg.data["items"]] == [
        f"t{n:05d}" for n in range(509, 499, -1)]
    assert len(written.db.statements) <= 1 + 2 * 11 + 1  # head, two searches, the page


async def test_holes_are_skipped_and_cost_one_more_statement_each(written: Written) -> None:
    """A history row missing (a crash, until the event's redelivery): the page is still
    whole and its cursor right."""
    await written.apply(events(30))
    gone = [history_key("acc-alice", 28), history_key("acc-alice", 25)]
    async with written.db.engine.begin() as conn:
        await conn.execute(text("DELETE FROM query_history WHERE key = ANY(:keys)"),
                           {"keys": [db_key(k) for k in gone]})
    for key in gone:
        del written.history.rows[key]
    written.db.statements.clear()
    pg, dicts = await written.both("acc-alice", "queryTransactionHistory", {"limit": 5})
    assert pg == dicts and pg.data is not None
    assert [i["transferId"] for i in pg.data["items"]] == [
        "t00030", "t00029", "t00027", "t00026", "t00024"]
    assert pg.data["nextCursor"] == "23"
    assert len(written.db.statements) == 4  # the head, 30..26, 25, 24


# --------------------------------------------------------------------------------------
# keys and the balance check's read
# --------------------------------------------------------------------------------------


async def test_account_ids_with_nul_and_backslashes_are_kept_apart(written: Written) -> None:
    await written.apply([event(1, account=NUL_ACCOUNT), event(2, account=NUL_ACCOUNT)])
    await written.apply([event(7, account=ESCAPED_LOOKALIKE)])
    assert db_key(NUL_ACCOUNT) == ESCAPED_LOOKALIKE  # the lookalike: stored apart all the same
    for account, balance, items in ((NUL_ACCOUNT, 200, 2), (ESCAPED_LOOKALIKE, 700, 1)):
        got, dicts = await written.both(account, "queryBalance", {})
        assert got == dicts and got.data is not None and got.data["balanceMinor"] == balance
        page, dicts = await written.both(account, "queryTransactionHistory", {})
        assert page == dicts and page.data is not None and len(page.data["items"]) == items
    async with written.db.engine.connect() as conn:
        stored = set((await conn.execute(text("SELECT key FROM query_balances"))).scalars())
    assert stored == {"acc-\\0\\\\0-x", "acc-\\\\0\\\\\\\\0-x"}
    assert {stored_key(k) for k in stored} == {NUL_ACCOUNT, ESCAPED_LOOKALIKE}


async def test_the_balance_checks_read_takes_the_partitions_asked(written: Written) -> None:
    accounts = [f"acc-{n}" for n in range(40)] + [NUL_ACCOUNT]
    for n, account in enumerate(accounts, start=1):
        await written.apply([event(n, account=account)])
    by_partition: dict[int, set[str]] = {}
    for account in accounts:
        by_partition.setdefault(home(account), set()).add(account)
    assert len(by_partition) > 2
    mine = sorted(by_partition)[:2]
    written.db.statements.clear()
    read = await written.tables.balances_in(mine)
    assert set(read) == by_partition[mine[0]] | by_partition[mine[1]]
    assert all(read[a] == written.balances.rows[a] for a in read)  # the bytes as put
    assert len(written.db.statements) == 1
    everything = await written.tables.balances_in(range(PARTITIONS))
    assert set(everything) == set(accounts)
    assert await written.tables.balances_in([]) == {}
    async with written.db.engine.connect() as conn:
        indexes = set((await conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE schemaname = :s AND tablename = "
            "'query_balances'"), {"s": written.db.schema})).scalars())
    assert "query_balances_partition_idx" in indexes


async def test_get_many_leaves_absent_keys_out(written: Written) -> None:
    await written.apply(events(3))
    keys = [history_key("acc-alice", n) for n in (4, 3, 1, 0)]
    found = await written.tables.history.get_many(keys)
    assert found == {k: written.history.rows[k] for k in keys[1:3]}
    assert await written.tables.history.get_many([]) == {}
    assert await written.tables.history.get(history_key("acc-alice", 9)) is None


# --------------------------------------------------------------------------------------
# a transfer's details
# --------------------------------------------------------------------------------------


async def test_details_are_the_row_the_engine_wrote_in_one_statement(
        written: Written) -> None:
    """The engine's row (``TransferProjection``'s bytes, homed with the saga) answers the
    payer and the payee exactly as the dicts do, in one statement each; a stranger gets
    the answer of an unknown id."""
    await written.apply_transfer_events(
        [transfer_event("t-1", 1, "DEBITING"), transfer_event("t-1", 2, "FAILED",
                                                              code="INSUFFICIENT_FUNDS")],
        home_partition=5)
    expected = {"transferId": "t-1", "fromAccountId": "acc-alice", "toAccountId": "acc-bob",
                "amountMinor": 1_250, "currency": "EUR", "state": "FAILED",
                "code": "INSUFFICIENT_FUNDS", "createdAt": "2030-01-02T00:00:01Z",
                "updatedAt": "2030-01-02T00:00:02Z"}
    for account in ("acc-alice", "acc-bob"):
        written.db.statements.clear()
        pg, dicts = await written.both(account, "queryTransactionDetails",
                                       {"transferId": "t-1"})
        assert pg == dicts == Answer(expected), account
        assert len(written.db.statements) == 1
    stranger, _ = await written.both("acc-carol", "queryTransactionDetails",
                                     {"transferId": "t-1"})
    unknown, _ = await written.both("acc-alice", "queryTransactionDetails",
                                    {"transferId": "t-404"})
    assert stranger == unknown == Answer.error(ErrorCode.FORBIDDEN, NOT_YOURS)
    async with written.db.engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT home_partition, value FROM query_transfers WHERE key = 't-1'"))).one()
    assert (row[0], bytes(row[1])) == (5, written.transfers.rows["t-1"])  # bytes as put


async def test_a_transfers_next_state_is_read_at_once(written: Written) -> None:
    """No cache: the row another worker's engine committed since is what the next read
    returns (the saga's every step, as the client is told of it)."""
    for seq, state in enumerate(("DEBITING", "CREDITING", "COMPLETED"), start=1):
        await written.apply_transfer_events([transfer_event("t-2", seq, state)],
                                            home_partition=0)
        answer = await written.pg.details("acc-bob", "t-2")
        assert answer.data is not None and answer.data["state"] == state


async def test_transfer_ids_with_nul_and_backslashes_are_kept_apart(
        written: Written) -> None:
    nul_id, lookalike = "t-\x00\\0-x", "t-\\0\\\\0-x"
    assert db_key(nul_id) == lookalike
    await written.apply_transfer_events([transfer_event(nul_id, 1, "DEBITING")],
                                        home_partition=1)
    await written.apply_transfer_events([transfer_event(lookalike, 1, "COMPLETED")],
                                        home_partition=2)
    for transfer_id, state in ((nul_id, "DEBITING"), (lookalike, "COMPLETED")):
        pg, dicts = await written.both("acc-alice", "queryTransactionDetails",
                                       {"transferId": transfer_id})
        assert pg == dicts and pg.data is not None, transfer_id
        assert (pg.data["transferId"], pg.data["state"]) == (transfer_id, state)
    found = await written.tables.transfers.get_many([nul_id, lookalike, "t-none"])
    assert found == {k: written.transfers.rows[k] for k in (nul_id, lookalike)}
