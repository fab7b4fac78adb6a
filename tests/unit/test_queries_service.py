"""Queries without Kafka: the projections and the QueryService over dict tables (written
through ``KeyValue``, read through ``AsyncKeyValue`` as the worker reads PostgreSQL; the
same reads on PostgreSQL: tests/integration/test_query_tables.py), and the TransferService
hook that authenticates a query and forwards it to business.queries.

Over 400 lines: the query side's unit tests, in sections, over the same dict tables.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fakes import Harness

from app.query_service import (
    NOT_YOURS,
    AccountProjection,
    Answer,
    DictKeyValue,
    KeyValueReads,
    QueryService,
    TransferProjection,
    history_key,
    reply_value,
)
from schemas.wire import (
    AccountEvent,
    AccountEventType,
    ErrorCode,
    QueryRequest,
    QueryTransactionHistoryPayload,
    TransferEvent,
)

T0 = datetime(2030, 1, 2, tzinfo=UTC)
ACC = "acc-alice"


class Tables:
    def __init__(self) -> None:
        self.balances = DictKeyValue()
        self.history = DictKeyValue()
        self.seen = DictKeyValue()
        self.transfers = DictKeyValue()
        self.accounts = AccountProjection(self.balances, self.history, self.seen)
        self.transfer_events = TransferProjection(self.transfers)
        self.read_ports = [KeyValueReads(kv) for kv in (self.balances, self.history,
                                                         self.transfers)]
        self.service = QueryService(*self.read_ports)

    def reads(self) -> int:
        """Keys read."""
        return self.balances.reads + self.history.reads + self.transfers.reads

    def round_trips(self) -> int:
        """Reads asked of the ports (a statement each, on PostgreSQL)."""
        return sum(port.round_trips for port in self.read_ports)

    async def page(self, account: str = ACC, **params: Any) -> Answer:
        return await self.service.history_page(
            account, QueryTransactionHistoryPayload.model_validate(params))

    async def balance_minor(self, account: str = ACC) -> int:
        data = (await self.service.balance(account, "EUR")).data
        assert data is not None
        return int(data["balanceMinor"])

    async def items(self, account: str = ACC, **params: Any) -> list[dict[str, Any]]:
        data = (await self.page(account, **params)).data
        assert data is not None
        return list(data["items"])

    async def request(self, type_: str, params: dict[str, Any], account: str = ACC
                      ) -> Answer:
        return await self.service.answer(QueryRequest(
            request_id="r", operator_id="alice", account_id=account, currency="EUR",
            type=type_, params=params))  # type: ignore[arg-type]


def event(n: int, *, kind: AccountEventType = AccountEventType.CREDITED, amount: int = 100,
          balance: int | None = None, account: str = ACC, at: datetime | None = None,
          command_id: str | None = None) -> AccountEvent:
    return AccountEvent(
        command_id=command_id or f"t{n:05d}:{'debit' if kind == 'debited' else 'credit'}:0",
        type=kind, account_id=account, amount_minor=amount,
        balance_after_minor=balance if balance is not None else n * 100,
        reason="INSUFFICIENT_FUNDS" if kind == AccountEventType.REJECTED else None,
        occurred_at=at or T0 + timedelta(minutes=n),
    )


def fill(t: Tables, count: int) -> None:
    for n in range(1, count + 1):
        assert t.accounts.apply(event(n))


def transfer_event(seq: int, state: str, *, transfer_id: str = "t-1", code: str | None = None,
                   at: datetime | None = None) -> TransferEvent:
    return TransferEvent(
        event_id=f"{transfer_id}:{seq}", transfer_id=transfer_id, seq=seq, state=state,
        operator_id="alice", from_account_id="acc-alice", to_account_id="acc-bob",
        amount_minor=1_250, currency="EUR", code=code,
        occurred_at=at or T0 + timedelta(seconds=seq),
    )


# --------------------------------------------------------------------------------------
# balance
# --------------------------------------------------------------------------------------


async def test_balance_is_the_last_applied_balance_after() -> None:
    t = Tables()
    t.accounts.apply(event(1, balance=10_000))
    t.accounts.apply(event(2, kind=AccountEventType.DEBITED, amount=2_500, balance=7_500))
    answer = await t.service.balance(ACC, "EUR")
    assert answer == Answer({"accountId": ACC, "currency": "EUR", "balanceMinor": 7_500,
                             "asOf": "2030-01-02T00:02:00Z"})


async def test_an_account_with_no_movement_reads_zero_without_as_of() -> None:
    assert (await Tables().service.balance(ACC, "EUR")).data == {
        "accountId": ACC, "currency": "EUR", "balanceMinor": 0}


async def test_rejected_events_change_nothing() -> None:
    t = Tables()
    t.accounts.apply(event(1, balance=500))
    assert not t.accounts.apply(event(2, kind=AccountEventType.REJECTED, balance=500))
    assert await t.balance_minor() == 500
    assert [i["balanceAfterMinor"] for i in await t.items()] == [500]


async def test_a_redelivered_or_re_emitted_event_is_applied_once() -> None:
    t = Tables()
    first, second = event(1, balance=100), event(2, balance=200)
    assert t.accounts.apply(first) and t.accounts.apply(second)
    # The account center re-emits the first event (a command re-sent by a saga deadline):
    # the newer balance stays and the history does not grow.
    assert not t.accounts.apply(first)
    assert not t.accounts.apply(second)
    assert await t.balance_minor() == 200
    assert len(await t.items()) == 2


async def test_an_event_cut_short_by_a_crash_is_completed_not_duplicated() -> None:
    t = Tables()
    t.accounts.apply(event(1))
    # Only the seen mark of event 2 survived the crash.
    t.seen.put(f"{ACC}\x1ft00002:credit:0", b"2")
    assert t.accounts.apply(event(2))
    # Seen mark and balance survived, the history entry did not.
    t.accounts.apply(event(3))
    del t.history.rows[history_key(ACC, 3)]
    assert t.accounts.apply(event(3))
    # History entry and balance survived, the seen mark did not.
    t.accounts.apply(event(4))
    del t.seen.rows[f"{ACC}\x1ft00004:credit:0"]
    assert not t.accounts.apply(event(4))
    assert not t.accounts.apply(event(4))
    items = await t.items()
    assert [i["transferId"] for i in items] == ["t00004", "t00003", "t00002", "t00001"]
    assert await t.balance_minor() == 400


async def test_history_entries_carry_the_sign_of_the_money_and_the_transfer() -> None:
    t = Tables()
    t.accounts.apply(event(1, kind=AccountEventType.DEBITED, amount=700, balance=300,
                           command_id="tr-9:debit:4"))
    t.accounts.apply(event(2, kind=AccountEventType.REFUNDED, amount=700, balance=1_000,
                           command_id="tr-9:refund:4"))
    t.accounts.apply(event(3, amount=5, balance=1_005, command_id="open:acc-alice"))
    assert (await t.page()).data == {"items": [  # newest first
        {"transferId": "open:acc-alice", "kind": "credit", "amountMinor": 5,
         "balanceAfterMinor": 1_005, "occurredAt": "2030-01-02T00:03:00Z"},
        {"transferId": "tr-9", "kind": "refund", "amountMinor": 700,
         "balanceAfterMinor": 1_000, "occurredAt": "2030-01-02T00:02:00Z"},
        {"transferId": "tr-9", "kind": "debit", "amountMinor": -700,
         "balanceAfterMinor": 300, "occurredAt": "2030-01-02T00:01:00Z"},
    ]}


async def test_accounts_do_not_see_each_other() -> None:
    t = Tables()
    fill(t, 3)
    t.accounts.apply(event(1, account="acc-bob", balance=42))
    assert [i["balanceAfterMinor"] for i in await t.items("acc-bob")] == [42]
    assert await t.balance_minor("acc-bob") == 42


# --------------------------------------------------------------------------------------
# history pages
# --------------------------------------------------------------------------------------


async def test_paging_to_the_end_has_no_gap_and_no_repeat_and_costs_the_page() -> None:
    t = Tables()
    fill(t, 1_037)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        before, trips = t.reads(), t.round_trips()
        params: dict[str, Any] = {"limit": 100}
        if cursor is not None:
            params["cursor"] = cursor
        answer = await t.page(**params)
        assert answer.ok and answer.data is not None
        assert t.reads() - before <= 100 + 1  # the head, then the page's entries
        assert t.round_trips() - trips == 2  # the head, then the page in one read
        seen += [i["transferId"] for i in answer.data["items"]]
        pages += 1
        cursor = answer.data.get("nextCursor")
        if cursor is None:
            break
    assert pages == 11
    assert seen == [f"t{n:05d}" for n in range(1_037, 0, -1)]


async def test_default_limit_is_20_and_the_last_page_has_no_cursor() -> None:
    t = Tables()
    fill(t, 25)
    first = (await t.page()).data
    assert first is not None and len(first["items"]) == 20 and first["nextCursor"] == "5"
    last = (await t.page(cursor="5")).data
    assert last is not None and len(last["items"]) == 5 and "nextCursor" not in last
    exact = Tables()
    fill(exact, 20)
    assert "nextCursor" not in (await exact.page()).data  # type: ignore[operator]


async def test_an_empty_history() -> None:
    assert (await Tables().page()).data == {"items": []}


async def test_from_and_to_bound_the_page_with_a_logarithmic_search() -> None:
    t = Tables()
    fill(t, 1_000)  # entry n occurred at T0 + n minutes
    before, trips = t.reads(), t.round_trips()
    answer = await t.page(limit=100, **{"from": (T0 + timedelta(minutes=200)).isoformat(),
                                        "to": (T0 + timedelta(minutes=250)).isoformat()})
    assert answer.data is not None
    assert [i["transferId"] for i in answer.data["items"]] == [
        f"t{n:05d}" for n in range(249, 199, -1)]  # from inclusive, to exclusive
    assert "nextCursor" not in answer.data
    assert t.reads() - before <= 1 + 2 * 11 + 50  # head, two binary searches, the page
    assert t.round_trips() - trips <= 1 + 2 * 11 + 1


async def test_a_hole_costs_one_more_read_and_the_page_stays_whole() -> None:
    """An entry missing (a crash, until the event's redelivery): the page reads as many
    entries again as it lacks, and its cursor is the next seq it did not read."""
    t = Tables()
    fill(t, 30)
    del t.history.rows[history_key(ACC, 28)]
    del t.history.rows[history_key(ACC, 25)]
    trips = t.round_trips()
    data = (await t.page(limit=5)).data
    assert data is not None
    assert [i["transferId"] for i in data["items"]] == [
        "t00030", "t00029", "t00027", "t00026", "t00024"]
    assert data["nextCursor"] == "23"
    # The head, 30..26 (one hole), 25 (a hole), 24.
    assert t.round_trips() - trips == 4
    rest = (await t.page(limit=100, cursor="23")).data
    assert rest is not None and len(rest["items"]) == 23 and "nextCursor" not in rest


async def test_paging_inside_a_window() -> None:
    t = Tables()
    fill(t, 300)
    window = {"from": (T0 + timedelta(minutes=10)).isoformat(),
              "to": (T0 + timedelta(minutes=40, seconds=30)).isoformat()}
    got: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 7, **window}
        if cursor:
            params["cursor"] = cursor
        data = (await t.page(**params)).data
        assert data is not None
        got += [i["transferId"] for i in data["items"]]
        cursor = data.get("nextCursor")
        if not cursor:
            break
    assert got == [f"t{n:05d}" for n in range(40, 9, -1)]


async def test_windows_outside_the_history_are_empty() -> None:
    t = Tables()
    fill(t, 10)
    later = (T0 + timedelta(days=1)).isoformat()
    assert (await t.page(**{"from": later})).data == {"items": []}
    assert (await t.page(to=T0.isoformat())).data == {"items": []}


@pytest.mark.parametrize("cursor", ["0", "11", "9999999999999999"])
async def test_a_cursor_outside_the_history_is_invalid(cursor: str) -> None:
    t = Tables()
    fill(t, 10)
    answer = await t.page(cursor=cursor)
    assert answer.code is ErrorCode.INVALID_REQUEST and answer.message is not None
    assert "cursor" in answer.message


async def test_to_before_from_is_invalid() -> None:
    answer = await Tables().page(**{"from": T0.isoformat(), "to": T0.isoformat()})
    assert answer.code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": 101}, {"limit": "5"}, {"cursor": "next"}, {"cursor": ""},
    {"from": "yesterday"}, {"from": "2030-01-02T00:00:00"}, {"other": 1},
])
async def test_invalid_history_parameters_are_invalid_requests(params: dict[str, Any]) -> None:
    t = Tables()
    fill(t, 3)
    answer = await t.request("queryTransactionHistory", params)
    assert answer.code is ErrorCode.INVALID_REQUEST
    assert answer.message and next(iter(params)) in answer.message  # names the field


async def test_limit_100_is_allowed() -> None:
    t = Tables()
    fill(t, 150)
    data = (await t.request("queryTransactionHistory", {"limit": 100})).data
    assert data is not None and len(data["items"]) == 100 and data["nextCursor"] == "50"


# --------------------------------------------------------------------------------------
# details
# --------------------------------------------------------------------------------------


async def test_details_for_the_payer_and_the_payee() -> None:
    t = Tables()
    t.transfer_events.apply(transfer_event(1, "DEBITING"))
    t.transfer_events.apply(transfer_event(2, "CREDITING"))
    t.transfer_events.apply(transfer_event(3, "COMPLETED"))
    expected = {"transferId": "t-1", "fromAccountId": "acc-alice", "toAccountId": "acc-bob",
                "amountMinor": 1_250, "currency": "EUR", "state": "COMPLETED",
                "createdAt": "2030-01-02T00:00:01Z", "updatedAt": "2030-01-02T00:00:03Z"}
    trips = t.round_trips()
    assert await t.service.details("acc-alice", "t-1") == Answer(expected)
    assert await t.service.details("acc-bob", "t-1") == Answer(expected)
    assert t.round_trips() - trips == 2  # one read each: the row, nothing else


async def test_someone_elses_transfer_looks_exactly_like_an_unknown_one() -> None:
    t = Tables()
    t.transfer_events.apply(transfer_event(1, "DEBITING"))
    others = await t.request("queryTransactionDetails", {"transferId": "t-1"},
                             account="acc-carol")
    unknown = await t.request("queryTransactionDetails", {"transferId": "t-404"},
                        account="acc-carol")
    assert others == unknown == Answer.error(ErrorCode.FORBIDDEN, NOT_YOURS)
    request = QueryRequest(request_id="r", operator_id="carol", account_id="acc-carol",
                           currency="EUR", type="queryTransactionDetails",
                           params={"transferId": "t-1"})
    assert reply_value(request, others) == reply_value(request, unknown)


async def test_old_transfer_events_do_not_move_a_transfer_back() -> None:
    t = Tables()
    t.transfer_events.apply(transfer_event(1, "DEBITING"))
    t.transfer_events.apply(transfer_event(2, "FAILED", code="INSUFFICIENT_FUNDS"))
    assert not t.transfer_events.apply(transfer_event(1, "DEBITING"))  # replayed
    assert not t.transfer_events.apply(transfer_event(2, "FAILED", code="INSUFFICIENT_FUNDS"))
    data = (await t.service.details("acc-alice", "t-1")).data
    assert data is not None and data["state"] == "FAILED"
    assert data["code"] == "INSUFFICIENT_FUNDS"


async def test_a_running_transfer_is_answered_at_once_as_stored() -> None:
    """No wait for a final state: the row is the saga's own (written in its transaction),
    so what it holds is what the caller can have been told; each read sees the last put."""
    t = Tables()
    t.transfer_events.apply(transfer_event(1, "DEBITING"))
    running = (await t.request("queryTransactionDetails", {"transferId": "t-1"})).data
    assert running is not None and running["state"] == "DEBITING"
    assert running["createdAt"] == running["updatedAt"] == "2030-01-02T00:00:01Z"
    t.transfer_events.apply(transfer_event(2, "CREDITING"))
    t.transfer_events.apply(transfer_event(3, "COMPLETED"))
    done = (await t.request("queryTransactionDetails", {"transferId": "t-1"})).data
    assert done is not None and done["state"] == "COMPLETED"
    assert (done["createdAt"], done["updatedAt"]) == ("2030-01-02T00:00:01Z",
                                                      "2030-01-02T00:00:03Z")


# --------------------------------------------------------------------------------------
# the TransferService hook: authenticate, find the account, forward
# --------------------------------------------------------------------------------------


def forwarded(h: Harness) -> list[tuple[bytes | None, dict[str, Any]]]:
    return [(o.key, orjson.loads(o.value)) for o in h.emitted if o.topic == h.topics.queries]


async def test_queries_are_forwarded_keyed_by_account_or_transfer() -> None:
    h = Harness()
    await h.send(h.command("queryBalance", "alice", {}, request_id="q1"))
    await h.send(h.command("queryTransactionHistory", "alice", {"limit": 5}, request_id="q2"))
    await h.send(h.command("queryTransactionDetails", "alice", {"transferId": "t-1"},
                           request_id="q3"))
    assert forwarded(h) == [
        (b"acc-alice", {"requestId": "q1", "operatorId": "alice", "accountId": "acc-alice",
                        "currency": "EUR", "type": "queryBalance", "params": {}}),
        (b"acc-alice", {"requestId": "q2", "operatorId": "alice", "accountId": "acc-alice",
                        "currency": "EUR", "type": "queryTransactionHistory",
                        "params": {"limit": 5}}),
        (b"t-1", {"requestId": "q3", "operatorId": "alice", "accountId": "acc-alice",
                  "currency": "EUR", "type": "queryTransactionDetails",
                  "params": {"transferId": "t-1"}}),
    ]
    assert h.replies == []  # answered by answer_queries, not here
    assert h.reply_cache.rows == {}


async def test_queries_are_authenticated_like_transfers_and_never_saved() -> None:
    h = Harness()
    expired = h.access_token("alice", ttl_seconds=-60)
    await h.send(h.command("queryBalance", "alice", {}, request_id="q1", token=expired))
    await h.send(h.command("queryBalance", "alice", {}, request_id="q2",
                           token=h.access_token("bob")))
    await h.send(h.command("queryBalance", "alice", {}, request_id="q3", token="garbage"))
    await h.send(h.command("queryTransactionHistory", "alice", {"limit": 500},
                           request_id="q4"))
    assert [(r["requestId"], r["code"]) for r in h.replies] == [
        ("q1", "UNAUTHENTICATED"), ("q2", "FORBIDDEN"), ("q3", "UNAUTHENTICATED"),
        ("q4", "INVALID_REQUEST")]
    assert forwarded(h) == []
    assert h.reply_cache.rows == {}
    # The same requestId again, now with a good token: answered afresh (forwarded).
    await h.send(h.command("queryBalance", "alice", {}, request_id="q1"))
    assert [k for k, _ in forwarded(h)] == [b"acc-alice"]


async def test_a_blocked_user_cannot_query() -> None:
    from dataclasses import replace

    from app.domain.ports import UserStatus

    h = Harness()
    row = h.store.users["alice"]
    h.store.put_user(replace(row.record, status=UserStatus.BLOCKED))
    await h.send(h.command("queryBalance", "alice", {}, request_id="q1"))
    assert h.reply("q1")["code"] == "FORBIDDEN"  # type: ignore[index]


async def test_the_whole_loop_balance_and_history_after_transfers() -> None:
    """Transfers through the service and the account center simulator; the account
    events it emits feed the projection; the forwarded queries are answered."""
    h = Harness()
    t = Tables()
    await h.transfer("alice", "acc-bob", 1_000)
    await h.transfer("bob", "acc-alice", 250)
    for out in h.emitted:
        if out.topic == h.topics.account_events:
            t.accounts.apply_raw(out.value)
        elif out.topic == h.topics.transfer_events:
            t.transfer_events.apply_raw(out.value)
    await h.send(h.command("queryBalance", "alice", {}, request_id="qb"))
    await h.send(h.command("queryTransactionHistory", "alice", {}, request_id="qh"))
    (_, balance), (_, history) = forwarded(h)
    answer = await t.service.answer(QueryRequest.model_validate(balance))
    assert answer.data is not None
    assert answer.data["balanceMinor"] == h.balance("alice") == 100_000 - 1_000 + 250
    page = (await t.service.answer(QueryRequest.model_validate(history))).data
    assert page is not None
    items = page["items"]
    assert [(i["kind"], i["amountMinor"]) for i in items] == [("credit", 250),
                                                              ("debit", -1_000)]
    transfer_ids = {i["transferId"] for i in items}
    for transfer_id in transfer_ids:
        details = (await t.service.details("acc-alice", transfer_id)).data
        assert details is not None and details["state"] == "COMPLETED"


def test_a_query_whose_answering_failed_is_answered_in_the_reply_envelope() -> None:
    """agents/query_agents.py answers it ``INTERNAL`` through app/replies.py, the envelope
    of every reply (fields in the order of ``schemas.wire.Reply``), and dead-letters it."""
    from types import SimpleNamespace

    from agents.query_agents import QueryRuntime
    from app.record_failures import SourceRecord

    runtime: Any = SimpleNamespace(topics=SimpleNamespace(dlq="dlq", replies="replies"))
    value = orjson.dumps({"requestId": "q-1", "type": "queryBalance",
                          "idempotencyKey": "k-1"})
    record = SourceRecord("queries", 0, 7, b"acc", value)
    dead, reply = QueryRuntime.query_poison(runtime, record, RuntimeError("boom"))
    assert (dead.topic, reply.topic, reply.key) == ("dlq", "replies", b"q-1")
    assert reply.value == (b'{"requestId":"q-1","type":"queryBalance","status":"error",'
                           b'"idempotencyKey":"k-1","code":"INTERNAL",'
                           b'"message":"internal error; retry"}')
