"""Idempotency outlives the retention purge (issue 11 point 4), on the real PostgreSQL store.

The purge of finished sagas and saved replies needs 24 h to pass (the minimum of
``BIZ_IDEMPOTENCY_RETENTION_HOURS``): the service runs on a clock the test moves, with its
PostgreSQL effects in the real ``PostgresBusinessStore`` (own schema) and the account center
simulated with the reference ledger's rules (tests/fakes.py, checked against the real
ledger in tests/integration/test_account_center.py). A key reused after the purge must never be
answered with another transfer's outcome, nor reuse an eventId or a commandId; an operator
replay after the purge never answers differently from before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import pytest_asyncio
from fakes import Harness
from sqlalchemy import text

from app.adapters.db import make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.transfers.ids import transfer_id_for
from schemas.wire import ErrorCode

pytestmark = pytest.mark.integration

DAY = 24 * 3600


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(database_url: str, isolation_id: str) -> AsyncIterator[PostgresBusinessStore]:
    schema = f"{isolation_id}_biz"
    s = PostgresBusinessStore(make_engine(database_url, schema, pool_size=4), schema)
    try:
        await s.migrate()
        yield s
    finally:
        async with s.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await s.close()


async def _harness(store: PostgresBusinessStore) -> Harness:
    """A harness whose service keeps its shared state in PostgreSQL (fresh user ids)."""
    h = Harness(purge_interval_seconds=60)
    for row in h.store.users.values():
        await store.upsert_user(row.record)  # the harness's users: alice, bob, carol
    h.use_store(store)
    return h


async def _purge(h: Harness) -> None:
    h.clock.advance(DAY + 61)
    await h.tick(0)  # schedules the first purge of partition 0
    h.clock.advance(61)
    await h.tick(0)
    assert not h.reply_cache.rows and not h.sagas.rows


@pytest.fixture(autouse=True)
async def _clean(store: PostgresBusinessStore) -> AsyncIterator[None]:
    """Every test starts from an empty business schema (the harness's users are fixed)."""
    yield
    async with store.engine.begin() as conn:
        await conn.execute(text(
            "TRUNCATE users, transfer_token_uses, daily_usage, topup_usage, limit_reservations,"
            " idempotency_records, pin_failures, otp_failures, otp_sends CASCADE"))


async def test_key_reuse_after_the_purge_no_false_completed_no_reused_event_id(
        store: PostgresBusinessStore) -> None:
    h = await _harness(store)
    first = await h.transfer("alice", "acc-bob", 1_000, idem="k-reused")
    assert first["status"] == "ok"
    events_before = [e["eventId"] for e in h.transfer_events]
    commands_before = [c["commandId"] for c in h.account_commands]
    await _purge(h)

    # The key again, for another payee and amount, with a fresh token.
    token = await h.transfer_token("alice", "acc-carol", 7_000)
    reply = await h.confirm("alice", token, "k-reused")
    assert reply is not None
    assert (reply["status"], reply["code"]) == ("error", ErrorCode.IDEMPOTENCY_KEY_REUSED)
    assert "COMPLETED" not in str(reply)
    assert [e["eventId"] for e in h.transfer_events] == events_before  # no eventId again
    assert [c["commandId"] for c in h.account_commands] == commands_before
    assert h.balance("carol") == 0 and h.balance("alice") == 99_000

    # The first transfer's own confirm again (same token, new request): its true outcome,
    # kept in PostgreSQL beyond the purge.
    kept = await store.kept_outcome("alice", "k-reused")
    assert kept is not None and kept.state == "COMPLETED"
    again = await h.confirm("alice", h_token(h, "k-reused"), "k-reused")
    assert again is not None and again["status"] == "ok"
    assert again["data"] == {"transferId": transfer_id_for("alice", "k-reused"),
                             "state": "COMPLETED"}
    assert h.balance("alice") == 99_000


def h_token(h: Harness, idem: str) -> str:
    """The transfer token the first confirm under ``idem`` presented (from history)."""
    for delivery in h.history:
        if delivery.topic != h.topics.commands or delivery.value is None:
            continue
        doc = orjson.loads(delivery.value)
        if doc.get("type") == "transferConfirm" and doc.get("idempotencyKey") == idem:
            return str(doc["payload"]["transferToken"])
    raise AssertionError(f"no confirm under {idem}")


async def test_a_failed_transfer_after_the_purge_answers_its_failure(
        store: PostgresBusinessStore) -> None:
    h = await _harness(store)
    failed = await h.transfer("bob", "acc-alice", 60_000, idem="k-failed")  # bob has 50,000
    assert failed["code"] == ErrorCode.INSUFFICIENT_FUNDS
    await _purge(h)
    again = await h.confirm("bob", h_token(h, "k-failed"), "k-failed")
    assert again is not None and again["code"] == ErrorCode.INSUFFICIENT_FUNDS
    assert again["data"]["transferId"] == transfer_id_for("bob", "k-failed")


async def test_an_operator_replay_after_the_purge_answers_nothing_new(
        store: PostgresBusinessStore) -> None:
    h = await _harness(store)
    await h.transfer("alice", "acc-bob", 1_000, idem="k-replay")
    originals = [d for d in h.history if d.topic == h.topics.commands]
    replies_before = len(h.replies)
    await _purge(h)
    first = list(h.replies)
    for delivery in originals:
        await h.process(delivery)
    await h.run_until_quiet()
    # The confirm is answered from its idempotency record (kept in PostgreSQL), with the
    # very reply it had; the init, which left nothing but its purged reply, is not
    # answered: nothing answered otherwise than the first time.
    again = h.replies[replies_before:]
    assert [r["type"] for r in again] == ["transferConfirm"], again
    assert all(r in first for r in again), (again, first)
    assert h.service.counters["stale_requests_unanswered"] == len(originals) - 1
    assert h.balance("alice") == 99_000
