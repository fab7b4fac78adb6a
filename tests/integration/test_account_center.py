"""The reference account center: the ledger against real PostgreSQL, the service against
real Kafka. Own schema, topics and consumer groups per module (isolation_id)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from conftest import wait_for
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.settings import Settings
from reference.account_center.ledger import (
    _STORED_COMMANDS,
    COMMAND_ID_CONFLICT,
    CURRENCY_MISMATCH,
    Ledger,
    clearing_account,
)
from reference.account_center.service import run_account_center
from schemas.wire import (
    AccountCommand,
    AccountCommandType,
    AccountEvent,
    AccountEventType,
    DeadLetter,
)

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 17, 12, 0, 0, 123456, tzinfo=UTC)
TOPICS = ("account.commands", "account.events", "business.dlq")


def _settings(database_url: str, isolation_id: str, kafka: str = "127.0.0.1:19092") -> Settings:
    return Settings(
        kafka_bootstrap_servers=kafka,
        database_url=database_url,
        topic_prefix=f"{isolation_id}.",
        account_center_db_schema=f"{isolation_id}_ac",
        account_center_group=f"{isolation_id}-ac",
        db_pool_size=20,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ledger(database_url: str, isolation_id: str, pg_admin: Any) -> AsyncIterator[Ledger]:
    led = Ledger.from_settings(_settings(database_url, isolation_id))
    try:
        await led.migrate()
        await led.migrate()  # idempotent
        yield led
    finally:
        await led.close()
        async with pg_admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{led.schema}" CASCADE'))


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _cmd(
    kind: AccountCommandType,
    account_id: str,
    amount: int,
    currency: str = "USD",
    command_id: str | None = None,
    transfer_id: str | None = None,
) -> AccountCommand:
    return AccountCommand(
        command_id=command_id or _uid(f"cmd-{kind.value}"),
        type=kind,
        account_id=account_id,
        amount_minor=amount,
        currency=currency,
        transfer_id=transfer_id or _uid("tr"),
    )


def debit(acc: str, amount: int, **kw: Any) -> AccountCommand:
    return _cmd(AccountCommandType.DEBIT, acc, amount, **kw)


def credit(acc: str, amount: int, **kw: Any) -> AccountCommand:
    return _cmd(AccountCommandType.CREDIT, acc, amount, **kw)


def refund(acc: str, amount: int, **kw: Any) -> AccountCommand:
    return _cmd(AccountCommandType.REFUND, acc, amount, **kw)


async def _account(ledger: Ledger, balance: int, currency: str = "USD") -> str:
    acc = _uid("acc")
    assert await ledger.open_account(acc, currency, balance) is True
    return acc


async def _assert_books_balanced(ledger: Ledger, *currencies: str) -> None:
    assert await ledger.unbalanced_commands() == []
    assert await ledger.mismatched_accounts() == []
    for cur in currencies:
        total = await ledger.total_balances(cur)
        clearing = await ledger.clearing_balance(cur)
        assert total + clearing == await ledger.seeded_total(cur), cur


# --------------------------------------------------------------------------------------
# ledger
# --------------------------------------------------------------------------------------


async def test_open_account_is_idempotent(ledger: Ledger) -> None:
    seeded = await ledger.seeded_total("USD")
    acc = await _account(ledger, 1_000)
    assert await ledger.open_account(acc, "USD", 1_000) is False
    assert await ledger.open_account(acc, "USD", 5_000) is False
    assert await ledger.balance(acc) == 1_000
    assert await ledger.seeded_total("USD") == seeded + 1_000
    assert await ledger.journal_lines(f"open:{acc}") == [
        ("external:seed:USD", -1_000),
        (acc, 1_000),
    ]
    with pytest.raises(ValueError):
        await ledger.open_account(acc, "EUR", 0)
    with pytest.raises(ValueError):
        await ledger.open_account("clearing:USD", "USD", 0)
    assert await ledger.balance(_uid("nobody")) is None


async def test_debit_credit_refund_are_double_entry(ledger: Ledger) -> None:
    payer = await _account(ledger, 1_000)
    payee = await _account(ledger, 0)
    clearing = clearing_account("USD")
    clearing_before = await ledger.clearing_balance("USD")

    d = debit(payer, 300)
    ev = await ledger.apply(d, T0)
    assert ev == AccountEvent(
        command_id=d.command_id,
        type=AccountEventType.DEBITED,
        account_id=payer,
        amount_minor=300,
        balance_after_minor=700,
        occurred_at=T0,
    )
    assert await ledger.journal_lines(d.command_id) == [(payer, -300), (clearing, 300)]
    assert await ledger.clearing_balance("USD") == clearing_before + 300

    c = credit(payee, 300, transfer_id=d.transfer_id)
    ev = await ledger.apply(c, T0)
    assert (ev.type, ev.balance_after_minor, ev.reason) == (AccountEventType.CREDITED, 300, None)
    assert await ledger.journal_lines(c.command_id) == [(clearing, -300), (payee, 300)]
    assert await ledger.clearing_balance("USD") == clearing_before

    d2 = debit(payer, 100)
    r = refund(payer, 100, transfer_id=d2.transfer_id)
    assert (await ledger.apply(d2, T0)).balance_after_minor == 600
    ev = await ledger.apply(r, T0)
    assert (ev.type, ev.balance_after_minor) == (AccountEventType.REFUNDED, 700)
    assert await ledger.journal_lines(r.command_id) == [(clearing, -100), (payer, 100)]

    assert (await ledger.balance(payer), await ledger.balance(payee)) == (700, 300)
    assert await ledger.journal_balance(payer) == 700
    assert await ledger.clearing_balance("USD") == clearing_before
    await _assert_books_balanced(ledger, "USD")


async def test_debit_beyond_balance_is_rejected_and_stays_rejected(ledger: Ledger) -> None:
    acc = await _account(ledger, 100)
    d = debit(acc, 101)
    ev = await ledger.apply(d, T0)
    assert ev.type is AccountEventType.REJECTED
    assert ev.reason == "INSUFFICIENT_FUNDS"
    assert ev.balance_after_minor == 100
    assert ev.amount_minor == 101
    assert await ledger.balance(acc) == 100
    assert await ledger.journal_lines(d.command_id) == []

    # Funds arrive; the redelivered rejected command is still rejected, identically.
    await ledger.apply(credit(acc, 50), T0)
    again = await ledger.apply(d, T0 + timedelta(minutes=5))
    assert again == ev
    assert await ledger.balance(acc) == 150
    stored = await ledger.processed_event(d.command_id)
    assert stored == ev


async def test_same_command_twice_has_one_effect(ledger: Ledger) -> None:
    acc = await _account(ledger, 500)
    d = debit(acc, 200)
    first = await ledger.apply(d, T0)
    second = await ledger.apply(d, T0 + timedelta(hours=1))
    assert second == first
    assert second.to_wire() == first.to_wire()
    assert orjson.dumps(second.to_wire()) == orjson.dumps(first.to_wire())
    assert await ledger.balance(acc) == 300
    assert len(await ledger.journal_lines(d.command_id)) == 2

    # Twice in the same batch, and again later: still one effect.
    c = credit(acc, 7)
    e1, e2 = await ledger.apply_batch([c, c], T0)
    assert e1 == e2
    assert (await ledger.apply_batch([c], T0 + timedelta(days=1)))[0] == e1
    assert await ledger.balance(acc) == 307
    await _assert_books_balanced(ledger, "USD")


@pytest.mark.parametrize("change", ["amount", "account", "type", "transfer"])
async def test_a_known_command_id_with_other_content_is_refused(
        ledger: Ledger, change: str, caplog: pytest.LogCaptureFixture) -> None:
    """TigerBeetle's exists_with_different_*: the id's own event stands, the other command
    is rejected COMMAND_ID_CONFLICT (not stored, not applied) and an ERROR is logged."""
    acc, other = await _account(ledger, 1_000), await _account(ledger, 1_000)
    first = debit(acc, 200)
    applied = await ledger.apply(first, T0)
    forged = first.model_copy(update={
        "amount": {"amount_minor": 900}, "account": {"account_id": other},
        "type": {"type": AccountCommandType.CREDIT},
        "transfer": {"transfer_id": _uid("tr")}}[change])
    with caplog.at_level("ERROR", logger="reference.account_center.ledger"):
        refused = await ledger.apply(forged, T0 + timedelta(seconds=1))
    assert (refused.type, refused.reason) == (AccountEventType.REJECTED, COMMAND_ID_CONFLICT)
    assert (refused.command_id, refused.account_id, refused.amount_minor) == (
        first.command_id, forged.account_id, forged.amount_minor)
    assert any("COMMAND_ID_CONFLICT" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)
    assert (await ledger.balance(acc), await ledger.balance(other)) == (800, 1_000)
    assert await ledger.processed_event(first.command_id) == applied  # the stored one stays
    assert await ledger.apply(first, T0 + timedelta(seconds=2)) == applied
    # In one batch with the original, too.
    fresh = debit(acc, 100)
    events = await ledger.apply_batch(
        [fresh, fresh.model_copy(update={"amount_minor": 101})], T0)
    assert events[0].type is AccountEventType.DEBITED
    assert (events[1].type, events[1].reason) == (AccountEventType.REJECTED,
                                                  COMMAND_ID_CONFLICT)
    assert await ledger.balance(acc) == 700
    await _assert_books_balanced(ledger, "USD")


async def test_missing_or_closed_account_is_rejected(ledger: Ledger) -> None:
    missing = _uid("missing")
    for cmd in (credit(missing, 10), debit(missing, 10), refund(missing, 10)):
        ev = await ledger.apply(cmd, T0)
        assert ev.type is AccountEventType.REJECTED
        assert ev.reason == "ACCOUNT_NOT_FOUND"
        assert ev.balance_after_minor is None
        assert await ledger.journal_lines(cmd.command_id) == []

    acc = await _account(ledger, 40)
    assert await ledger.close_account(acc) is True
    assert await ledger.close_account(_uid("missing")) is False
    for cmd in (credit(acc, 10), debit(acc, 10)):
        ev = await ledger.apply(cmd, T0)
        assert (ev.type, ev.reason) == (AccountEventType.REJECTED, "ACCOUNT_NOT_FOUND")
    assert await ledger.balance(acc) == 40

    # Journal-only accounts are not user accounts.
    ev = await ledger.apply(credit(clearing_account("USD"), 10), T0)
    assert ev.reason == "ACCOUNT_NOT_FOUND"


async def test_currency_mismatch_is_rejected(ledger: Ledger) -> None:
    acc = await _account(ledger, 100, "EUR")
    ev = await ledger.apply(debit(acc, 10, currency="USD"), T0)
    assert (ev.type, ev.reason, ev.balance_after_minor) == (
        AccountEventType.REJECTED,
        CURRENCY_MISMATCH,
        100,
    )
    assert await ledger.balance(acc) == 100


async def test_concurrent_debits_never_overdraw(ledger: Ledger) -> None:
    acc = await _account(ledger, 50)
    commands = [debit(acc, 1) for _ in range(100)]
    events = await asyncio.gather(*(ledger.apply(c, T0) for c in commands))
    kinds = Counter(e.type for e in events)
    assert kinds == {AccountEventType.DEBITED: 50, AccountEventType.REJECTED: 50}
    assert all(e.reason == "INSUFFICIENT_FUNDS" for e in events if e.type == "rejected")
    after = sorted(e.balance_after_minor or 0 for e in events if e.type == "debited")
    assert after == list(range(50))  # each debit saw a distinct, non-negative balance
    assert await ledger.balance(acc) == 0
    assert await ledger.journal_balance(acc) == 0
    await _assert_books_balanced(ledger, "USD")


async def test_concurrent_duplicates_have_one_effect(ledger: Ledger) -> None:
    acc = await _account(ledger, 1_000)
    d = debit(acc, 100)
    missing = credit(_uid("missing"), 5)
    events = await asyncio.gather(
        *(ledger.apply(d, T0 + timedelta(seconds=i)) for i in range(20)),
        *(ledger.apply(missing, T0 + timedelta(seconds=i)) for i in range(20)),
    )
    assert len({orjson.dumps(e.to_wire()) for e in events[:20]}) == 1
    assert len({orjson.dumps(e.to_wire()) for e in events[20:]}) == 1
    assert await ledger.balance(acc) == 900
    assert len(await ledger.journal_lines(d.command_id)) == 2


async def test_concurrent_batches_in_any_order_do_not_deadlock(ledger: Ledger) -> None:
    accounts = [await _account(ledger, 10_000) for _ in range(6)]
    rng = random.Random(7)
    batches = []
    for _ in range(12):
        batch = []
        for acc in rng.sample(accounts, len(accounts)):  # different order per batch
            batch.append(debit(acc, 10))
            batch.append(credit(rng.choice(accounts), 10))
        batches.append(batch)
    results = await asyncio.gather(*(ledger.apply_batch(b, T0) for b in batches))
    assert all(e.type is not AccountEventType.REJECTED for r in results for e in r)
    assert sum([await ledger.balance(a) or 0 for a in accounts]) == 60_000
    await _assert_books_balanced(ledger, "USD")


async def test_conservation_after_random_mix(ledger: Ledger) -> None:
    rng = random.Random(20240517)
    cur = "GBP"
    accounts = [await _account(ledger, rng.randint(0, 2_000), cur) for _ in range(8)]
    accounts.append(_uid("missing"))
    model = {a: await ledger.balance(a) for a in accounts}
    history: list[AccountCommand] = []
    for _ in range(15):
        batch: list[AccountCommand] = []
        for _ in range(rng.randint(1, 30)):
            roll = rng.random()
            if history and roll < 0.15:
                batch.append(rng.choice(history))  # redelivery
                continue
            kind = rng.choice(list(AccountCommandType))
            batch.append(_cmd(kind, rng.choice(accounts), rng.randint(1, 800), cur))
        events = await ledger.apply_batch(batch, T0)
        seen: set[str] = {c.command_id for c in history}
        for cmd, ev in zip(batch, events, strict=True):
            assert ev.command_id == cmd.command_id
            if cmd.command_id in seen:
                continue
            seen.add(cmd.command_id)
            bal = model[cmd.account_id]
            if bal is None:
                assert ev.reason == "ACCOUNT_NOT_FOUND"
            elif cmd.type is AccountCommandType.DEBIT and bal < cmd.amount_minor:
                assert ev.reason == "INSUFFICIENT_FUNDS"
            else:
                sign = -1 if cmd.type is AccountCommandType.DEBIT else 1
                model[cmd.account_id] = bal + sign * cmd.amount_minor
                assert ev.balance_after_minor == model[cmd.account_id]
        history.extend(batch)
    for acc, bal in model.items():
        assert await ledger.balance(acc) == bal
    await _assert_books_balanced(ledger, cur, "USD", "EUR")


async def test_crash_before_produce_redelivers_same_events(ledger: Ledger) -> None:
    payer = await _account(ledger, 1_000)
    payee = await _account(ledger, 0)
    d = debit(payer, 250)
    batch = [d, credit(payee, 250, transfer_id=d.transfer_id), debit(payer, 5_000)]
    first = await ledger.apply_batch(batch, T0)
    # "Crash" before producing: the same records are redelivered later.
    redelivered = await ledger.apply_batch(batch, T0 + timedelta(minutes=3))
    assert [orjson.dumps(e.to_wire()) for e in redelivered] == [
        orjson.dumps(e.to_wire()) for e in first
    ]
    assert [e.type for e in first] == ["debited", "credited", "rejected"]
    assert (await ledger.balance(payer), await ledger.balance(payee)) == (750, 250)
    await _assert_books_balanced(ledger, "USD")


# --------------------------------------------------------------------------------------
# the set-based batch (issue 13): per-command semantics inside one batch
# --------------------------------------------------------------------------------------


async def test_a_command_repeated_inside_a_batch_is_a_duplicate_of_the_first(
        ledger: Ledger) -> None:
    acc = await _account(ledger, 100)
    d, poor = debit(acc, 30), debit(acc, 1_000)
    events = await ledger.apply_batch([d, poor, d, credit(acc, 5), poor, d], T0)
    assert [e.type for e in events] == ["debited", "rejected", "debited", "credited",
                                        "rejected", "debited"]
    assert events[0] == events[2] == events[5] and events[0].balance_after_minor == 70
    assert events[1] == events[4] and events[1].reason == "INSUFFICIENT_FUNDS"
    assert events[3].balance_after_minor == 75  # the repeated debit took nothing more
    assert await ledger.balance(acc) == 75
    assert len(await ledger.journal_lines(d.command_id)) == 2
    assert await ledger.processed_event(poor.command_id) == events[1]  # rejections stored
    await _assert_books_balanced(ledger, "USD")


async def test_later_commands_of_a_batch_see_earlier_balance_effects(ledger: Ledger) -> None:
    acc, other = await _account(ledger, 100), await _account(ledger, 50)
    batch = [debit(acc, 60), debit(acc, 40), debit(acc, 1), credit(acc, 5), debit(acc, 6),
             debit(acc, 5), refund(other, 7), debit(other, 57), debit(other, 1)]
    events = await ledger.apply_batch(batch, T0)
    assert [(e.type, e.balance_after_minor) for e in events] == [
        ("debited", 40), ("debited", 0), ("rejected", 0), ("credited", 5), ("rejected", 5),
        ("debited", 0), ("refunded", 57), ("debited", 0), ("rejected", 0)]
    assert (await ledger.balance(acc), await ledger.balance(other)) == (0, 0)
    assert await ledger.journal_balance(acc) == 0
    await _assert_books_balanced(ledger, "USD")


async def test_a_batch_of_mixed_currencies(ledger: Ledger) -> None:
    cur_before = {c: (await ledger.total_balances(c), await ledger.clearing_balance(c))
                  for c in ("USD", "EUR")}
    usd, eur = await _account(ledger, 1_000), await _account(ledger, 1_000, "EUR")
    batch = [debit(usd, 100), debit(eur, 200, currency="EUR"), debit(usd, 1, currency="EUR"),
             credit(eur, 3, currency="USD"), credit(usd, 40), credit(eur, 50, currency="EUR"),
             debit(_uid("missing"), 1, currency="EUR")]
    events = await ledger.apply_batch(batch, T0)
    assert [(e.type, e.reason) for e in events] == [
        ("debited", None), ("debited", None), ("rejected", CURRENCY_MISMATCH),
        ("rejected", CURRENCY_MISMATCH), ("credited", None), ("credited", None),
        ("rejected", "ACCOUNT_NOT_FOUND")]
    assert (await ledger.balance(usd), await ledger.balance(eur)) == (940, 850)
    assert await ledger.journal_lines(batch[1].command_id) == [
        (eur, -200), (clearing_account("EUR"), 200)]
    for cur, moved in (("USD", 60), ("EUR", 150)):  # what each currency's clearing holds
        assert await ledger.clearing_balance(cur) == cur_before[cur][1] + moved
        assert await ledger.total_balances(cur) == cur_before[cur][0] + 1_000 - moved
    await _assert_books_balanced(ledger, "USD", "EUR")


async def test_a_conflicting_command_in_a_batch_leaves_the_others_applied(
        ledger: Ledger) -> None:
    acc = await _account(ledger, 500)
    known = debit(acc, 100)
    stored = await ledger.apply(known, T0)
    forged = known.model_copy(update={"amount_minor": 400})
    batch = [debit(acc, 10), forged, known, credit(acc, 1)]
    events = await ledger.apply_batch(batch, T0 + timedelta(seconds=1))
    assert [(e.type, e.reason) for e in events] == [
        ("debited", None), ("rejected", COMMAND_ID_CONFLICT), ("debited", None),
        ("credited", None)]
    assert events[2] == stored  # the original's event, unchanged
    assert events[3].balance_after_minor == 391
    assert await ledger.balance(acc) == 391
    assert await ledger.processed_event(known.command_id) == stored
    await _assert_books_balanced(ledger, "USD")


async def test_two_large_concurrent_batches_in_random_order(ledger: Ledger) -> None:
    """Many accounts, each batch in its own random order, debits that may fail: no deadlock
    (locks in one order), every command decided once, money conserved, balances equal to
    their journals."""
    accounts = [await _account(ledger, 1_000) for _ in range(40)]
    rng = random.Random(13)
    for _round in range(3):
        batches: list[list[AccountCommand]] = []
        for _ in range(2):
            batch: list[AccountCommand] = []
            for _ in range(150):
                payer, payee = rng.sample(accounts, 2)
                amount = rng.randint(1, 400)
                tr = _uid("tr")
                batch += [debit(payer, amount, transfer_id=tr),
                          credit(payee, amount, transfer_id=tr)]
            rng.shuffle(batch)
            batches.append(batch)
        results = await asyncio.wait_for(
            asyncio.gather(*(ledger.apply_batch(b, T0) for b in batches)), 60)
        for batch, events in zip(batches, results, strict=True):
            assert [e.command_id for e in events] == [c.command_id for c in batch]
            assert all(e.reason in (None, "INSUFFICIENT_FUNDS") for e in events)
    balances = [await ledger.balance(a) or 0 for a in accounts]
    assert all(b >= 0 for b in balances)
    # What is not in the accounts is in clearing: credits of rejected debits' transfers.
    assert await ledger.mismatched_accounts() == []
    await _assert_books_balanced(ledger, "USD")


async def test_a_raced_duplicate_with_other_content_is_refused_once(ledger: Ledger) -> None:
    """Two transactions decide the same new commandId for two accounts (no common lock):
    the primary key of processed_commands lets one commit, the other rolls back, is run
    again and then finds the id known: COMMAND_ID_CONFLICT."""
    for _ in range(5):
        a, b = await _account(ledger, 100), await _account(ledger, 100)
        first = debit(a, 10)
        other = first.model_copy(update={"account_id": b})
        e1, e2 = await asyncio.gather(ledger.apply_batch([first, credit(a, 1)], T0),
                                      ledger.apply_batch([other, credit(b, 1)], T0))
        outcomes = sorted([(e1[0].type, e1[0].reason), (e2[0].type, e2[0].reason)])
        assert outcomes == [("debited", None), ("rejected", COMMAND_ID_CONFLICT)]
        assert [e1[1].type, e2[1].type] == ["credited", "credited"]
        assert sorted([await ledger.balance(a), await ledger.balance(b)]) == [91, 101]
    await _assert_books_balanced(ledger, "USD")


async def test_the_check_backstop_fails_the_batch_whole_as_a_data_error(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a decision were ever wrong (here: a _decide that ignores the balance), the CHECK
    (balance_minor >= 0) refuses the batch: nothing of it is written, the error is a data
    error (the service isolates and dead-letters the command), and the pooled connection
    is clean for the next batch."""
    from app.record_failures import is_outage
    from reference.account_center import ledger as ledger_module

    acc = await _account(ledger, 10)
    ok, over = credit(acc, 5), debit(acc, 100)
    real = ledger_module._decide

    def careless(cmd: AccountCommand, acct: Any, now: datetime) -> Any:
        if acct is not None and cmd.type is AccountCommandType.DEBIT:
            acct.balance += 10**6  # pretend there is money
            event, lines = real(cmd, acct, now)
            acct.balance -= 10**6
            return event, lines
        return real(cmd, acct, now)

    monkeypatch.setattr(ledger_module, "_decide", careless)
    with pytest.raises(Exception) as caught:
        await ledger.apply_batch([ok, over], T0)
    assert ledger_module.sqlstate(caught.value) == "23514"
    assert is_outage(caught.value) is False
    monkeypatch.setattr(ledger_module, "_decide", real)
    assert await ledger.balance(acc) == 10
    assert await ledger.processed_event(ok.command_id) is None
    assert await ledger.journal_lines(ok.command_id) == []
    events = await asyncio.gather(*(ledger.apply_batch([ok, over], T0) for _ in range(3)))
    assert [(e.type, e.reason) for e in events[0]] == [("credited", None),
                                                        ("rejected", "INSUFFICIENT_FUNDS")]
    assert events[0] == events[1] == events[2]
    await _assert_books_balanced(ledger, "USD")


async def test_a_batch_is_a_fixed_number_of_statements(
        ledger: Ledger, database_url: str) -> None:
    """Set-based: the statements of apply_batch do not grow with the batch (one
    connection, asyncpg's query logger)."""
    from app.adapters.db import make_engine

    counted = Ledger(make_engine(database_url, ledger.schema, pool_size=1), ledger.schema)
    queries: list[str] = []
    try:
        async with counted.engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            raw.add_query_logger(lambda q: queries.append(q.query))
        accounts = [await _account(ledger, 1_000) for _ in range(20)]
        await counted.apply_batch([credit(accounts[0], 1)], T0)  # asyncpg's first prepares
        per_batch = []
        for size in (1, 10, 200):
            queries.clear()
            batch = [(debit if i % 2 else credit)(accounts[i % 20], 1) for i in range(size)]
            await counted.apply_batch(batch, T0)
            per_batch.append(len(queries))
            queries.clear()
            await counted.apply_batch(batch, T0)  # all duplicates: reads only
            per_batch.append(len(queries))
        # BEGIN, lock, read the known commands, (write,) COMMIT
        assert per_batch == [5, 4] * 3, queries
    finally:
        await counted.close()


async def test_the_duplicate_check_is_planned_for_the_table_it_meets(
        database_url: str, isolation_id: str, pg_admin: Any) -> None:
    """The ledger's connections plan each statement for its own arrays and the table as it
    is (``plan_cache_mode = force_custom_plan``): a statement run often while its table
    was small does not keep a sequential scan as the table grows. Without the setting,
    PostgreSQL caches a generic plan after five executions; on a young table that plan
    reads every processed command for each batch (the account center's duplicate check
    measured 2.1 ms a batch after 20 s of load, 0.14 ms planned per batch)."""
    led = Ledger.from_settings(_settings(database_url, f"{isolation_id}_plans"))
    try:
        await led.migrate()
        async with led.engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert await raw.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            grow = ("INSERT INTO processed_commands (command_id, transfer_id, type,"
                    " account_id, result) SELECT 'c' || i, 't' || i, 'DEBIT', 'acc',"
                    " '{}'::jsonb FROM generate_series($1::int, $2::int) AS i")
            # Analyzed young (autovacuum does it after 50 rows; here: empty, as migrated).
            await raw.execute(grow, 1, 40)
            await raw.execute("ANALYZE processed_commands")
            await raw.execute(f"PREPARE known(text[]) AS {_STORED_COMMANDS}")
            for _ in range(8):  # more than the five custom plans before a generic one
                assert await raw.fetch("EXECUTE known('{a,b}')") == []
            await raw.execute(grow, 41, 30_000)
            ids = [f"c{i}" for i in range(1, 14)]
            array = "'{" + ",".join(ids) + "}'"
            plan = "\n".join(r[0] for r in await raw.fetch(f"EXPLAIN EXECUTE known({array})"))
            assert "processed_commands_pkey" in plan and "Seq Scan" not in plan, plan
            assert sorted(r[0] for r in await raw.fetch(f"EXECUTE known({array})")) == sorted(ids)
            await raw.execute("DEALLOCATE known")
    finally:
        await led.close()
        async with pg_admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{led.schema}" CASCADE'))


# --------------------------------------------------------------------------------------
# service (Kafka)
# --------------------------------------------------------------------------------------


class Collector:
    """Reads account.events and business.dlq from the beginning (own consumer group)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.events: list[tuple[bytes | None, bytes]] = []
        self.dead: list[DeadLetter] = []

    async def poll(self) -> None:
        batches = await self.consumer.getmany(timeout_ms=100)
        for records in batches.values():
            for r in records:
                if r.topic.endswith("business.dlq"):
                    self.dead.append(DeadLetter.model_validate(orjson.loads(r.value)))
                else:
                    self.events.append((r.key, r.value))

    def by_command(self, command_id: str) -> list[bytes]:
        return [v for _, v in self.events if orjson.loads(v)["commandId"] == command_id]

    def until(self, check: Any) -> Any:
        async def predicate() -> Any:
            await self.poll()
            return check()

        return predicate


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service_settings(
    kafka_bootstrap: str, database_url: str, isolation_id: str, ledger: Ledger
) -> AsyncIterator[Settings]:
    settings = _settings(database_url, isolation_id, kafka_bootstrap)
    names = [settings.topic(t) for t in TOPICS]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        for name in names:
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=3, replication_factor=1)]
                )
            except TopicAlreadyExistsError:
                pass
        yield settings
    finally:
        try:
            await admin.delete_topics(names)
        finally:
            await admin.close()


async def _committed_everything(settings: Settings) -> bool:
    topic = settings.topic("account.commands")
    probe = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.account_center_group,
        enable_auto_commit=False,
    )
    await probe.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        ends = await probe.end_offsets(tps)
        for tp in tps:
            if ((await probe.committed(tp)) or 0) != ends[tp]:
                return False
        return True
    finally:
        await probe.stop()


async def test_service_end_to_end(service_settings: Settings, ledger: Ledger) -> None:
    settings = service_settings
    commands_topic = settings.topic("account.commands")
    payer = await _account(ledger, 1_000)
    payee = await _account(ledger, 0)

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    reader = AIOKafkaConsumer(
        settings.topic("account.events"),
        settings.topic("business.dlq"),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=_uid("reader"),
        auto_offset_reset="earliest",
    )
    await producer.start()
    await reader.start()
    collector = Collector(reader)
    stop = asyncio.Event()
    task = asyncio.create_task(run_account_center(settings, stop=stop))

    async def send(cmd: AccountCommand) -> None:
        await producer.send_and_wait(
            commands_topic, orjson.dumps(cmd.to_wire()), key=cmd.account_id.encode()
        )

    try:
        # A command decided before a "crash" (DB committed, nothing produced yet).
        pre = debit(payer, 1)
        pre_event = await ledger.apply(pre, T0)

        d = debit(payer, 100)
        batch = [pre, d, credit(payee, 100, transfer_id=d.transfer_id), debit(payer, 10_000)]
        for cmd in batch:
            await send(cmd)
        await wait_for(
            collector.until(lambda: all(collector.by_command(c.command_id) for c in batch)),
            timeout=60,
            what="the first events",
        )
        first = {c.command_id: collector.by_command(c.command_id)[0] for c in batch}
        events = {k: AccountEvent.model_validate(orjson.loads(v)) for k, v in first.items()}
        assert events[pre.command_id] == pre_event  # the stored event, occurredAt included
        assert events[d.command_id].type is AccountEventType.DEBITED
        assert events[d.command_id].balance_after_minor == 899
        assert events[batch[2].command_id].type is AccountEventType.CREDITED
        assert events[batch[3].command_id].reason == "INSUFFICIENT_FUNDS"
        for key, value in collector.events:
            assert key == orjson.loads(value)["accountId"].encode()
        assert (await ledger.balance(payer), await ledger.balance(payee)) == (899, 100)

        # Redelivery of every command: identical events, no new effect.
        for cmd in batch:
            await send(cmd)
        await wait_for(
            collector.until(lambda: all(len(collector.by_command(c)) == 2 for c in first)),
            timeout=60,
            what="the re-emitted events",
        )
        for cid, value in first.items():
            assert collector.by_command(cid) == [value, value]
        assert (await ledger.balance(payer), await ledger.balance(payee)) == (899, 100)

        # Garbage, then an invalid command, then a valid one on the same partition.
        await producer.send_and_wait(commands_topic, b"not json", key=payee.encode())
        bad = orjson.dumps({"commandId": "x", "type": "steal", "accountId": payee})
        await producer.send_and_wait(commands_topic, bad, key=payee.encode())
        after = credit(payee, 5)
        await send(after)
        await wait_for(
            collector.until(lambda: len(collector.dead) >= 2 and collector.by_command(
                after.command_id)),
            timeout=60,
            what="dead letters and the next event",
        )
        garbage = next(x for x in collector.dead
                       if x.value_sha256 == hashlib.sha256(b"not json").hexdigest())
        assert garbage.source_topic == commands_topic
        assert garbage.key_b64 == base64.b64encode(payee.encode()).decode()
        assert "JSON" in garbage.reason
        assert garbage.value_size == len(b"not json")  # coordinates and digest, no value
        invalid = next(x for x in collector.dead
                       if x.value_sha256 == hashlib.sha256(bad).hexdigest())
        assert "AccountCommand" in invalid.reason
        assert orjson.loads(collector.by_command(after.command_id)[0])["balanceAfterMinor"] == 105
        assert await ledger.balance(payee) == 105

        # Offsets are committed once everything was produced.
        await wait_for(lambda: _committed_everything(settings), timeout=30,
                       what="committed offsets")
        assert not task.done()
        await _assert_books_balanced(ledger, "USD")
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=30)
        finally:
            await reader.stop()
            await producer.stop()
    assert task.exception() is None


async def test_service_stops_on_cancellation(
    service_settings: Settings, ledger: Ledger
) -> None:
    settings = service_settings
    acc = await _account(ledger, 10)
    cmd = debit(acc, 3)
    task = asyncio.create_task(run_account_center(settings))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("account.commands"), orjson.dumps(cmd.to_wire()), key=acc.encode()
        )
        await wait_for(lambda: ledger.processed_event(cmd.command_id), timeout=60,
                       what="the service to process a command")
        await wait_for(lambda: _committed_everything(settings), timeout=30,
                       what="committed offsets")
    finally:
        await producer.stop()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
    assert await ledger.balance(acc) == 7


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


async def test_service_retries_db_outage_and_dead_letters_poison(
    service_settings: Settings, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings
    poison_account = _uid("poison")
    original = Ledger.apply_batch
    calls = Counter[str]()

    async def flaky(
        self: Ledger, commands: Any, now: datetime | None = None
    ) -> list[AccountEvent]:
        calls["batch"] += 1
        if calls["batch"] <= 2:  # the database is unreachable for a while
            raise DBAPIError("SELECT", {}, ConnectionResetError("connection lost"))
        if any(c.account_id == poison_account for c in commands):
            calls["poison"] += 1
            raise DBAPIError("UPDATE", {}, _PgError("22003"))  # numeric out of range
        return await original(self, commands, now)

    monkeypatch.setattr(Ledger, "apply_batch", flaky)

    acc = await _account(ledger, 100)
    good1, poison, good2 = debit(acc, 10), credit(poison_account, 1), debit(acc, 20)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    reader = AIOKafkaConsumer(
        settings.topic("account.events"),
        settings.topic("business.dlq"),
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=_uid("reader"),
        auto_offset_reset="earliest",
    )
    await producer.start()
    await reader.start()
    collector = Collector(reader)
    stop = asyncio.Event()
    try:
        for cmd in (good1, poison, good2):
            await producer.send(
                settings.topic("account.commands"),
                orjson.dumps(cmd.to_wire()),
                key=cmd.account_id.encode(),
            )
        await producer.flush()
        task = asyncio.create_task(run_account_center(settings, stop=stop))
        poison_sha = hashlib.sha256(orjson.dumps(poison.to_wire())).hexdigest()
        await wait_for(
            collector.until(
                lambda: collector.by_command(good1.command_id)
                and collector.by_command(good2.command_id)
                and any(d.value_sha256 == poison_sha for d in collector.dead)
            ),
            timeout=60,
            what="events of the good commands and the poison dead letter",
        )
        letter = next(d for d in collector.dead if d.value_sha256 == poison_sha)
        assert "22003" in letter.reason
        assert collector.by_command(poison.command_id) == []
        assert calls["poison"] >= 3
        assert await ledger.balance(acc) == 70
        await wait_for(lambda: _committed_everything(settings), timeout=30,
                       what="committed offsets")
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    finally:
        stop.set()
        await reader.stop()
        await producer.stop()


# --------------------------------------------------------------------------------------
# the poison/outage rule at the producer (no broker: a fake producer)
# --------------------------------------------------------------------------------------


class _FakeBatch:
    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any) -> object:
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        pass


class _FakeProducer:
    """aiokafka's batch interface on one partition: a batch is refused whole when ``fail``
    refuses any of its records (as the broker refuses a batch), or delivered whole."""

    def __init__(self, fail: Any) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.batches = 0

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> _FakeBatch:
        return _FakeBatch()

    async def send_batch(self, batch: _FakeBatch, topic: str, *, partition: int) -> Any:
        self.batches += 1
        future = asyncio.get_running_loop().create_future()
        error = next((e for _k, v in batch.records
                      if (e := self.fail(topic, v)) is not None), None)
        if error is not None:
            future.set_exception(error)
        else:
            self.sent.extend((topic, k, v) for k, v in batch.records)
            future.set_result(None)
        return future


async def test_an_event_that_cannot_be_produced_is_dead_lettered_not_retried() -> None:
    """Until issue 9, a KafkaError was retried forever: one oversized output stopped all
    command processing. An output refused for its own sake now becomes the dead letter of
    the command it answers, and only it: a batch is refused whole, so its batch mates are
    tried again alone and delivered; an outage is still retried (then everything is
    sent)."""
    from types import SimpleNamespace

    from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

    from reference.account_center.service import AccountCenter, _Out

    settings = Settings(topic_prefix="p.", _env_file=None)  # type: ignore[call-arg]
    outages = 2

    def fail(topic: str, value: bytes) -> BaseException | None:
        nonlocal outages
        if outages:
            outages -= 1
            return KafkaTimeoutError()
        return MessageSizeTooLargeError() if value == b"huge" else None

    producer = _FakeProducer(fail)
    center = AccountCenter(settings, None, None, producer, asyncio.Event())  # type: ignore[arg-type]
    source = SimpleNamespace(topic="p.account.commands", partition=1, offset=5, key=b"acc",
                             value=b"command")
    await asyncio.wait_for(center._produce([
        _Out("p.account.events", b"acc", b"huge", source),
        _Out("p.account.events", b"acc-2", b"fine", source),
    ]), 30)
    # The refused batch held both events: the one refused alone is dead-lettered, its
    # batch mate delivered (once, after the outages).
    assert [(t, v) for t, _k, v in producer.sent if t == "p.account.events"] == [
        ("p.account.events", b"fine")]
    assert [t for t, _k, _v in producer.sent] == ["p.account.events", "p.business.dlq"]
    letter = DeadLetter.model_validate_json(producer.sent[1][2])
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "p.account.commands", 1, 5)
    assert letter.value_sha256 == hashlib.sha256(b"command").hexdigest()
    assert "MessageSizeTooLargeError" in letter.reason
