"""PostgresBusinessStore against the real PostgreSQL (own schema per module)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import text

from app.adapters.db import make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_matches, pin_verifier
from app.domain.ports import (
    ConfirmChecks,
    ConfirmOutcome,
    ConfirmRequest,
    GuessBudgets,
    PinCheck,
    PinOutcome,
    TokenClaim,
    UserRecord,
    UserStatus,
)
from reference.demo_seed import DEMO_USERS, seed_directory

pytestmark = pytest.mark.integration

PEPPER = b"test-pepper"
DAY = date(2024, 5, 17)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(database_url: str, isolation_id: str) -> AsyncIterator[PostgresBusinessStore]:
    schema = f"{isolation_id}_biz"
    s = PostgresBusinessStore(make_engine(database_url, schema, pool_size=10), schema)
    try:
        await s.migrate()
        await s.migrate()  # idempotent
        yield s
    finally:
        async with s.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await s.close()


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _new_user(store: PostgresBusinessStore, pin: str = "123456") -> UserRecord:
    user_id = _uid("u")
    user = UserRecord(
        user_id=user_id,
        account_id=f"acc-{user_id}",
        currency="USD",
        phone="+15550001111",
        pin_verifier=pin_verifier(PEPPER, user_id, pin),
        otp_threshold_minor=50_000,
        daily_limit_minor=1_000_000,
        status=UserStatus.ACTIVE,
    )
    await store.upsert_user(user)
    return user


def _pin(user: UserRecord, pin: str):  # type: ignore[no-untyped-def]
    return lambda verifier: pin_matches(PEPPER, user.user_id, pin, verifier)


async def test_upsert_and_get_user_round_trip(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    assert await store.get_user(user.user_id) == user
    changed = UserRecord(
        user_id=user.user_id,
        account_id=user.account_id + "-2",
        currency="EUR",
        phone="+15559999999",
        pin_verifier=pin_verifier(PEPPER, user.user_id, "654321"),
        otp_threshold_minor=1,
        daily_limit_minor=2,
        status=UserStatus.BLOCKED,
    )
    await store.upsert_user(changed)
    assert await store.get_user(user.user_id) == changed
    assert await store.get_user("nobody") is None


async def test_account_exists(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    assert await store.account_exists(user.account_id)
    assert not await store.account_exists("acc-nobody")


async def test_seed_directory(store: PostgresBusinessStore) -> None:
    await seed_directory(store, PEPPER, DEMO_USERS)
    await seed_directory(store, PEPPER, DEMO_USERS)  # idempotent
    for demo in DEMO_USERS:
        user = await store.get_user(demo.user_id)
        assert user is not None
        assert user.account_id == demo.account_id
        assert pin_matches(PEPPER, demo.user_id, demo.pin, user.pin_verifier)


async def test_check_pin_ok_resets_counter(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    assert await store.check_pin(user.user_id, "r1", _pin(user, "000000"), 5) == PinCheck(
        PinOutcome.INVALID, 4
    )
    assert await store.check_pin(user.user_id, "r2", _pin(user, "000000"), 5) == PinCheck(
        PinOutcome.INVALID, 3
    )
    ok = await store.check_pin(user.user_id, "r3", _pin(user, "123456"), 5)
    assert ok.outcome is PinOutcome.OK
    # Counter was reset: a new failure leaves max - 1 attempts.
    assert await store.check_pin(user.user_id, "r4", _pin(user, "000000"), 5) == PinCheck(
        PinOutcome.INVALID, 4
    )


async def test_unknown_user_pin_is_invalid(store: PostgresBusinessStore) -> None:
    called: list[str] = []

    def matches(verifier: str) -> bool:
        called.append(verifier)
        return True

    assert await store.check_pin("nobody", "r1", matches, 5) == PinCheck(PinOutcome.INVALID, 0)
    assert called == []


async def test_five_wrong_pins_lock(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    outcomes = [
        await store.check_pin(user.user_id, f"r{i}", _pin(user, "000000"), 5) for i in range(5)
    ]
    assert [o.attempts_left for o in outcomes[:4]] == [4, 3, 2, 1]
    assert all(o.outcome is PinOutcome.INVALID for o in outcomes[:4])
    assert outcomes[4] == PinCheck(PinOutcome.LOCKED, 0)

    called: list[str] = []

    def right_pin(verifier: str) -> bool:
        called.append(verifier)
        return pin_matches(PEPPER, user.user_id, "123456", verifier)

    assert await store.check_pin(user.user_id, "r9", right_pin, 5) == PinCheck(
        PinOutcome.LOCKED, 0
    )
    assert called == []  # a locked PIN is not even compared

    await store.unlock_pin(user.user_id)
    assert (await store.check_pin(user.user_id, "r10", right_pin, 5)).outcome is PinOutcome.OK


async def test_same_request_failing_twice_counts_once(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    wrong = _pin(user, "000000")
    assert await store.check_pin(user.user_id, "dup", wrong, 5) == PinCheck(PinOutcome.INVALID, 4)
    assert await store.check_pin(user.user_id, "dup", wrong, 5) == PinCheck(PinOutcome.INVALID, 4)
    assert await store.check_pin(user.user_id, "next", wrong, 5) == PinCheck(
        PinOutcome.INVALID, 3
    )


async def test_concurrent_wrong_pins_never_exceed_max(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    wrong = _pin(user, "000000")
    results = await asyncio.gather(
        *(store.check_pin(user.user_id, f"c{i}", wrong, 5) for i in range(12))
    )
    assert sum(r.outcome is PinOutcome.INVALID for r in results) == 4
    assert sum(r.outcome is PinOutcome.LOCKED for r in results) == 8
    assert sorted(r.attempts_left for r in results if r.outcome is PinOutcome.INVALID) == [
        1, 2, 3, 4,
    ]


async def test_claim_transfer_token(store: PostgresBusinessStore) -> None:
    jti, t1, t2 = _uid("jti"), _uid("t"), _uid("t")
    assert await store.claim_transfer_token(jti, t1) is TokenClaim.CLAIMED
    assert await store.claim_transfer_token(jti, t1) is TokenClaim.CLAIMED
    assert await store.claim_transfer_token(jti, t2) is TokenClaim.USED_ELSEWHERE
    assert await store.claim_transfer_token(jti, t1) is TokenClaim.CLAIMED


async def test_concurrent_claims_one_winner(store: PostgresBusinessStore) -> None:
    jti = _uid("jti")
    transfers = [_uid("t") for _ in range(20)]
    results = await asyncio.gather(*(store.claim_transfer_token(jti, t) for t in transfers))
    winners = [t for t, r in zip(transfers, results, strict=True) if r is TokenClaim.CLAIMED]
    assert len(winners) == 1
    assert results.count(TokenClaim.USED_ELSEWHERE) == 19
    assert await store.claim_transfer_token(jti, winners[0]) is TokenClaim.CLAIMED


async def test_concurrent_reservations_respect_limit(store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    results = await asyncio.gather(
        *(
            store.reserve_daily_limit(user_id, f"{user_id}-t{i}", DAY, 30_000, 1_000_000)
            for i in range(50)
        )
    )
    assert results.count(True) == 33
    assert await store.reserved_today(user_id, DAY) == 990_000
    assert await store.reserved_today(user_id, date(2024, 5, 18)) == 0


async def test_reserve_is_idempotent_per_transfer(store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    assert await store.reserve_daily_limit(user_id, "tx-a", DAY, 600_000, 1_000_000)
    # The same transfer again: True without reserving twice (even though twice would exceed).
    assert await store.reserve_daily_limit(user_id, "tx-a", DAY, 600_000, 1_000_000)
    assert await store.reserved_today(user_id, DAY) == 600_000
    assert not await store.reserve_daily_limit(user_id, "tx-b", DAY, 400_001, 1_000_000)
    assert await store.reserve_daily_limit(user_id, "tx-c", DAY, 400_000, 1_000_000)
    assert await store.reserved_today(user_id, DAY) == 1_000_000


async def test_concurrent_same_transfer_reserves_once(store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    results = await asyncio.gather(
        *(store.reserve_daily_limit(user_id, f"{user_id}-t", DAY, 30_000, 1_000_000)
          for _ in range(10))
    )
    assert all(results)
    assert await store.reserved_today(user_id, DAY) == 30_000


async def test_release_gives_back_once(store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    assert await store.reserve_daily_limit(user_id, "rel-a", DAY, 100_000, 1_000_000)
    assert await store.reserve_daily_limit(user_id, "rel-b", DAY, 200_000, 1_000_000)
    await store.release_daily_limit("rel-a")
    assert await store.reserved_today(user_id, DAY) == 200_000
    await store.release_daily_limit("rel-a")  # no-op
    await store.release_daily_limit("never-reserved")  # no-op
    assert await store.reserved_today(user_id, DAY) == 200_000


async def test_concurrent_releases_give_back_once(store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    assert await store.reserve_daily_limit(user_id, f"{user_id}-x", DAY, 100_000, 1_000_000)
    assert await store.reserve_daily_limit(user_id, f"{user_id}-y", DAY, 50_000, 1_000_000)
    await asyncio.gather(*(store.release_daily_limit(f"{user_id}-x") for _ in range(10)))
    assert await store.reserved_today(user_id, DAY) == 50_000


async def test_reserve_rejects_non_positive_amount(store: PostgresBusinessStore) -> None:
    with pytest.raises(ValueError, match="positive"):
        await store.reserve_daily_limit("u", "t", DAY, 0, 1_000_000)


# --- the confirm's checks in one transaction ------------------------------------------


async def _confirm(store: PostgresBusinessStore, user: UserRecord, *, pin: str = "123456",
                   jti: str | None = None, transfer_id: str | None = None,
                   amount: int = 1_000, record: str | None = None,
                   account: str | None = None, key: str | None = None,
                   kind: str = "transfer", limit: int | None = None,
                   now: datetime | None = None,
                   budgets: GuessBudgets | None = None) -> ConfirmChecks:
    transfer_id = transfer_id or _uid("t")
    jti = jti or _uid("j")
    return await store.confirm_checks(ConfirmRequest(
        user_id=user.user_id, idempotency_key=key or transfer_id, fingerprint=jti,
        transfer_id=transfer_id, attempt=uuid.uuid4().hex[:16], matches=_pin(user, pin),
        record=record or _uid("rec"), day=date(2026, 1, 2), now=now or datetime.now(UTC),
        amount_minor=amount, from_account_id=None if kind == "topup" else (
            account or user.account_id), jti=None if kind == "topup" else jti,
        kind=kind, limit_minor=limit), budgets or GuessBudgets())


async def test_confirm_checks_in_order(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    assert (await _confirm(store, user, account="acc-other")).outcome is ConfirmOutcome.FORBIDDEN
    wrong = await _confirm(store, user, pin="000000")
    assert (wrong.outcome, wrong.attempts_left) == (ConfirmOutcome.INVALID_PIN, 4)
    ok = await _confirm(store, user, jti="j-1", transfer_id="t-1")
    assert ok.outcome is ConfirmOutcome.OK and ok.user == user
    assert (await _confirm(store, user, jti="j-1", transfer_id="t-1")).outcome \
        is ConfirmOutcome.OK  # the same transfer again: idempotent
    assert (await _confirm(store, user, jti="j-1")).outcome is ConfirmOutcome.TOKEN_USED
    big = await _confirm(store, user, amount=user.daily_limit_minor)
    assert big.outcome is ConfirmOutcome.LIMIT_EXCEEDED
    assert await store.reserved_today(user.user_id, date(2026, 1, 2)) == 1_000


async def test_concurrent_confirms_of_one_user_respect_the_limit(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)  # daily limit 1,000,000
    results = await asyncio.gather(*(_confirm(store, user, amount=300_000)
                                     for _ in range(10)))
    assert sum(r.outcome is ConfirmOutcome.OK for r in results) == 3
    assert {r.outcome for r in results} == {ConfirmOutcome.OK, ConfirmOutcome.LIMIT_EXCEEDED}
    assert await store.reserved_today(user.user_id, date(2026, 1, 2)) == 900_000


async def test_init_facts_reads_user_payee_and_reservations_together(
        store: PostgresBusinessStore) -> None:
    payer, payee = await _new_user(store), await _new_user(store)
    day = date(2026, 3, 4)
    assert await store.reserve_daily_limit(payer.user_id, _uid("t"), day, 2_500, 10_000)
    facts = await store.init_facts(payer.user_id, payee.account_id, day)
    assert (facts.user, facts.payee_exists, facts.reserved_today_minor) == (payer, True, 2_500)
    assert facts.payee_currency == payee.currency
    facts = await store.init_facts(payer.user_id, "acc-nobody", date(2026, 3, 5))
    assert (facts.payee_exists, facts.reserved_today_minor) == (False, 0)
    facts = await store.init_facts("nobody", payee.account_id, day)
    assert facts.user is None and facts.payee_exists


# --- issue 11: guess budgets, top-up limit, idempotency records ------------------------


async def test_a_redelivered_record_counts_once_any_other_record_counts(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    first = await _confirm(store, user, pin="000000", record="cmds/3/17/abc")
    again = await _confirm(store, user, pin="000000", record="cmds/3/17/abc")  # redelivery
    other = await _confirm(store, user, pin="000000", record="cmds/5/2/def")
    assert [c.attempts_left for c in (first, again, other)] == [4, 4, 3]


async def test_the_pin_lock_expires_and_a_right_pin_resets_the_count(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    budgets = GuessBudgets(pin_lock_seconds=3_600)
    t0 = datetime(2026, 1, 2, 8, tzinfo=UTC)
    outcomes = [(await _confirm(store, user, pin="000000", now=t0, budgets=budgets)).outcome
                for _ in range(5)]
    assert outcomes == [ConfirmOutcome.INVALID_PIN] * 4 + [ConfirmOutcome.PIN_LOCKED]
    right = await _confirm(store, user, now=t0 + timedelta(minutes=59), budgets=budgets)
    assert right.outcome is ConfirmOutcome.PIN_LOCKED  # even the right PIN, while locked
    later = await _confirm(store, user, pin="000000", now=t0 + timedelta(minutes=61),
                           budgets=budgets)
    assert (later.outcome, later.attempts_left) == (ConfirmOutcome.INVALID_PIN, 4)
    ok = await _confirm(store, user, now=t0 + timedelta(minutes=62), budgets=budgets)
    assert ok.outcome is ConfirmOutcome.OK
    after = await _confirm(store, user, pin="000000", now=t0 + timedelta(minutes=63),
                           budgets=budgets)
    assert after.attempts_left == 4  # the right PIN reset the count


async def test_unlock_user_ends_the_pin_lock_and_the_otp_lock(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    now = datetime.now(UTC)
    for _ in range(5):
        await _confirm(store, user, pin="000000")
    for i in range(10):
        await store.record_otp_failure(user.user_id, f"{user.user_id}:t:{i}", now)
    assert (await _confirm(store, user)).outcome is ConfirmOutcome.PIN_LOCKED
    big = 60_000  # above the user's OTP threshold (50,000)
    assert await store.unlock_user(user.user_id) is True
    assert await store.otp_failures_since(user.user_id, now - timedelta(hours=1)) == 0
    assert (await _confirm(store, user, amount=big)).outcome is ConfirmOutcome.OK
    assert await store.unlock_user("nobody") is False


async def test_otp_budgets_per_user_in_rolling_windows(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    budgets = GuessBudgets(otp_max_failures=3, otp_max_sends=2, otp_send_window_seconds=900)
    t0 = datetime(2026, 1, 2, 9, tzinfo=UTC)
    big = 60_000
    sent = [await _confirm(store, user, amount=big, now=t0, budgets=budgets) for _ in range(3)]
    assert [c.outcome for c in sent] == [ConfirmOutcome.OK, ConfirmOutcome.OK,
                                         ConfirmOutcome.RATE_LIMITED]
    small = await _confirm(store, user, amount=1_000, now=t0, budgets=budgets)
    assert small.outcome is ConfirmOutcome.OK  # no OTP needed: no OTP budget spent
    later = await _confirm(store, user, amount=big, now=t0 + timedelta(seconds=901),
                           budgets=budgets)
    assert later.outcome is ConfirmOutcome.OK  # the send window rolled on
    for i in range(3):
        await store.record_otp_failure(user.user_id, f"x:{i}", t0 + timedelta(seconds=950))
        await store.record_otp_failure(user.user_id, f"x:{i}", t0 + timedelta(seconds=950))
    assert await store.otp_failures_since(user.user_id, t0) == 3  # once per key
    locked = await _confirm(store, user, amount=big, now=t0 + timedelta(seconds=2_000),
                            budgets=budgets)
    assert locked.outcome is ConfirmOutcome.OTP_LOCKED
    expired = await _confirm(store, user, amount=big, now=t0 + timedelta(days=1, seconds=960),
                             budgets=budgets)
    assert expired.outcome is ConfirmOutcome.OK  # the failure window rolled on


async def test_top_ups_have_their_own_daily_limit(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    first = await _confirm(store, user, kind="topup", limit=5_000, amount=3_000)
    assert first.outcome is ConfirmOutcome.OK
    over = await _confirm(store, user, kind="topup", limit=5_000, amount=3_000)
    assert over.outcome is ConfirmOutcome.LIMIT_EXCEEDED
    wrong = await _confirm(store, user, kind="topup", limit=5_000, amount=1_000, pin="000000")
    assert wrong.outcome is ConfirmOutcome.INVALID_PIN  # confirmed with the PIN
    assert await store.reserved_today(user.user_id, date(2026, 1, 2)) == 0  # transfers'
    transfer = await _confirm(store, user, amount=3_000)
    assert transfer.outcome is ConfirmOutcome.OK  # the transfers' limit is apart


async def test_released_top_up_gives_back_the_top_up_limit(store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    first = await _confirm(store, user, kind="topup", limit=5_000, amount=5_000,
                           transfer_id="tu-rel-" + user.user_id)
    assert first.outcome is ConfirmOutcome.OK
    await store.release_daily_limit("tu-rel-" + user.user_id)
    again = await _confirm(store, user, kind="topup", limit=5_000, amount=5_000)
    assert again.outcome is ConfirmOutcome.OK


async def test_idempotency_records_keep_the_key_and_its_outcome(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    key = _uid("k")
    ok = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-" + key)
    assert ok.outcome is ConfirmOutcome.OK and len(ok.attempt) == 16
    redo = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-" + key)
    assert redo.outcome is ConfirmOutcome.OK and redo.attempt == ok.attempt  # first kept
    other = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j2-" + key)
    assert other.outcome is ConfirmOutcome.KEY_REUSED  # another payload under the key
    await store.save_outcome(user.user_id, key, "COMPLETED", None)
    kept = await store.kept_outcome(user.user_id, key)
    assert kept is not None and (kept.transfer_id, kept.state) == ("t-" + key, "COMPLETED")
    answered = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-" + key,
                              pin="000000")
    assert answered.outcome is ConfirmOutcome.ANSWERED and answered.kept == kept
    assert await store.kept_outcome(user.user_id, "never-used") is None


async def test_a_key_of_a_transfer_from_before_the_records_stays_used(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    key = _uid("k")
    await store.claim_transfer_token("j-old-" + key, "t-" + key)  # no idempotency record
    reuse = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-new-" + key)
    assert reuse.outcome is ConfirmOutcome.KEY_REUSED
    same = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-old-" + key)
    assert same.outcome is ConfirmOutcome.OK  # the same token under its own key


async def test_a_confirm_refused_by_the_limit_claims_no_token(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)
    key = _uid("k")
    big = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-big-" + key,
                         amount=user.daily_limit_minor + 1)
    assert big.outcome is ConfirmOutcome.LIMIT_EXCEEDED
    async with store.engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM transfer_token_uses"
                                      " WHERE transfer_id = :t"), {"t": "t-" + key}) == 0
    small = await _confirm(store, user, key=key, transfer_id="t-" + key, jti="j-small-" + key)
    assert small.outcome is ConfirmOutcome.OK  # the key was free for another token


async def test_a_start_beside_busy_transactions_takes_no_table_lock(
        store: PostgresBusinessStore) -> None:
    """Every process migrates at start, also while other processes are busy (a worker
    joining a loaded group). Once the schema is at this version, migrating runs no DDL: an
    ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` would queue for an exclusive lock behind
    the live transactions and deadlock with them (a second worker crashed at start)."""
    async with store.engine.connect() as busy:
        transaction = await busy.begin()
        # A live transaction holding a lock on the users table, as a confirm's does.
        await busy.execute(text("LOCK TABLE users IN ROW SHARE MODE"))
        try:
            await asyncio.wait_for(store.migrate(), timeout=15)
        finally:
            await transaction.rollback()
