"""PostgresBusinessStore against the real PostgreSQL (own schema per module): what the
in-memory fake cannot show. The port's behaviour, the same on both stores, is in
tests/integration/test_store_contract.py; here are the plain methods (seeding, the single steps of
``confirm_checks``), concurrency and migration."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import pytest
import pytest_asyncio
from conftest import wait_for
from sqlalchemy import text

from app.adapters.db import make_engine
from app.adapters.postgres_store import PinCheck, PinOutcome, PostgresBusinessStore, TokenClaim
from app.domain.pin import pin_matches, pin_verifier
from app.domain.ports import (
    ConfirmChecks,
    ConfirmOutcome,
    ConfirmRequest,
    GuessBudgets,
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

    assert await store.unlock_user(user.user_id)
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


async def _confirm(store: PostgresBusinessStore, user: UserRecord, amount: int) -> ConfirmChecks:
    transfer_id, jti = _uid("t"), _uid("j")
    return await store.confirm_checks(ConfirmRequest(
        user_id=user.user_id, idempotency_key=transfer_id, fingerprint=jti,
        transfer_id=transfer_id, attempt=uuid.uuid4().hex[:16], matches=_pin(user, "123456"),
        record=_uid("rec"), day=date(2026, 1, 2), now=datetime.now(UTC), amount_minor=amount,
        from_account_id=user.account_id, jti=jti), GuessBudgets())


async def test_concurrent_confirms_of_one_user_respect_the_limit(
        store: PostgresBusinessStore) -> None:
    user = await _new_user(store)  # daily limit 1,000,000
    results = await asyncio.gather(*(_confirm(store, user, 300_000) for _ in range(10)))
    assert sum(r.outcome is ConfirmOutcome.OK for r in results) == 3
    assert {r.outcome for r in results} == {ConfirmOutcome.OK, ConfirmOutcome.LIMIT_EXCEEDED}
    assert await store.reserved_today(user.user_id, date(2026, 1, 2)) == 900_000


async def test_concurrent_confirms_of_one_key_with_two_payloads(
        store: PostgresBusinessStore) -> None:
    """The key's record is read after the user's lock is granted: of two confirms of one
    key with two tokens racing, one is OK and the other sees its record (KEY_REUSED)."""
    user = await _new_user(store)
    key = _uid("k")
    jtis = [_uid("j") for _ in range(6)]
    results = await asyncio.gather(*(store.confirm_checks(ConfirmRequest(
        user_id=user.user_id, idempotency_key=key, fingerprint=jti, transfer_id="t-" + key,
        attempt=jti, matches=_pin(user, "123456"), record=_uid("rec"), day=DAY,
        now=datetime.now(UTC), amount_minor=1_000, from_account_id=user.account_id, jti=jti),
        GuessBudgets()) for jti in jtis))
    assert sorted(r.outcome for r in results) == sorted(
        [ConfirmOutcome.OK] + [ConfirmOutcome.KEY_REUSED] * 5)
    assert await store.reserved_today(user.user_id, DAY) == 1_000


async def test_confirms_and_releases_of_one_user_race_without_deadlock(
        store: PostgresBusinessStore) -> None:
    """Confirms (token, reservation, usage row) and releases (reservation, usage row) of
    one user and day in any interleaving: no deadlock, and the usage row ends equal to
    the reservations kept."""
    user = await _new_user(store)  # daily limit 1,000,000
    first = [await _confirm(store, user, 50_000) for _ in range(16)]  # no OTP
    assert all(c.outcome is ConfirmOutcome.OK for c in first)
    async with store.engine.connect() as conn:
        reserved = list((await conn.execute(text(
            "SELECT transfer_id FROM limit_reservations WHERE user_id = :u"),
            {"u": user.user_id})).scalars())
    results = await asyncio.gather(
        *(_confirm(store, user, 50_000) for _ in range(8)),
        *(store.release_daily_limit(t) for t in reserved))
    oks = sum(isinstance(r, ConfirmChecks) and r.outcome is ConfirmOutcome.OK
              for r in results)
    assert 4 <= oks <= 8, [getattr(r, "outcome", r) for r in results]
    async with store.engine.connect() as conn:
        kept = (await conn.execute(text(
            "SELECT coalesce(sum(amount_minor), 0) FROM limit_reservations"
            " WHERE user_id = :u AND day = :d"), {"u": user.user_id, "d": date(2026, 1, 2)}
        )).scalar_one()
    expected = (16 - len(reserved) + oks) * 50_000
    assert await store.reserved_today(user.user_id, date(2026, 1, 2)) == kept == expected


async def test_a_retry_over_the_limit_keeps_the_transfers_own_token(
        store: PostgresBusinessStore) -> None:
    """LIMIT_EXCEEDED undoes only what the refused confirm claimed: the same transfer
    asking again after its reservation was released, now over the limit, leaves its token
    claimed by itself (another transfer with it is TOKEN_USED)."""
    user = await _new_user(store)  # daily limit 1,000,000
    transfer_id, jti = _uid("t"), _uid("j")

    def request(amount: int, transfer: str = transfer_id) -> ConfirmRequest:
        return ConfirmRequest(
            user_id=user.user_id, idempotency_key=transfer, fingerprint=jti,
            transfer_id=transfer, attempt="a1", matches=_pin(user, "123456"),
            record=_uid("rec"), day=DAY, now=datetime.now(UTC), amount_minor=amount,
            from_account_id=user.account_id, jti=jti)

    assert (await store.confirm_checks(request(600_000), GuessBudgets())).outcome \
        is ConfirmOutcome.OK
    await store.release_daily_limit(transfer_id)
    assert await store.reserve_daily_limit(user.user_id, _uid("t"), DAY, 500_000, 1_000_000)
    again = await store.confirm_checks(request(600_000), GuessBudgets())
    assert again.outcome is ConfirmOutcome.LIMIT_EXCEEDED
    assert await store.claim_transfer_token(jti, transfer_id) is TokenClaim.CLAIMED
    other = await store.confirm_checks(request(1_000, _uid("t")), GuessBudgets())
    assert other.outcome is ConfirmOutcome.TOKEN_USED
    assert await store.reserved_today(user.user_id, DAY) == 500_000


async def test_a_limit_refusal_of_reserve_daily_limit_leaves_nothing(
        store: PostgresBusinessStore) -> None:
    user_id = _uid("u")
    assert not await store.reserve_daily_limit(user_id, "over-a", DAY, 2_000, 1_000)
    assert await store.reserved_today(user_id, DAY) == 0
    assert await store.reserve_daily_limit(user_id, "over-a", DAY, 1_000, 1_000)
    assert not await store.reserve_daily_limit(user_id, "over-b", DAY, 1, 1_000)
    assert await store.reserve_daily_limit(user_id, "over-a", DAY, 1_000, 1_000)  # once
    assert await store.reserved_today(user_id, DAY) == 1_000


# --- the confirms of one batch (app/adapters/coalesce.py) --------------------------------


def _request(user: UserRecord, amount: int, *, pin: str = "123456", key: str | None = None,
             jti: str | None = None, kind: str = "transfer") -> ConfirmRequest:
    transfer_id = _uid("t")
    token = _uid("j") if jti is None and kind == "transfer" else jti
    return ConfirmRequest(
        user_id=user.user_id, idempotency_key=key or transfer_id,
        fingerprint=token or transfer_id, transfer_id=transfer_id, attempt=_uid("a"),
        matches=_pin(user, pin), record=_uid("rec"), day=DAY, now=datetime.now(UTC),
        amount_minor=amount, from_account_id=user.account_id if kind == "transfer" else None,
        jti=token, kind=kind, limit_minor=200_000 if kind == "topup" else None)


async def _mixed_batch(store: PostgresBusinessStore
                       ) -> tuple[list[ConfirmRequest], list[ConfirmOutcome]]:
    """One confirm per user, each meeting another check: the requests and, for each, the
    outcome that ``confirm_checks`` gives it alone (tests/integration/test_store_contract.py)."""
    ok, wrong, blocked, over, otp, reused, used, locked, after, topup, stranger = [
        await _new_user(store) for _ in range(11)]
    await store.upsert_user(dataclasses.replace(blocked, status=UserStatus.BLOCKED))
    reused_key, taken_jti = _uid("k"), _uid("j")
    assert (await store.confirm_checks(_request(reused, 1_000, key=reused_key),
                                       GuessBudgets())).outcome is ConfirmOutcome.OK
    assert (await store.confirm_checks(_request(used, 1_000, jti=taken_jti),
                                       GuessBudgets())).outcome is ConfirmOutcome.OK
    for i in range(5):
        await store.check_pin(locked.user_id, f"lock-{i}", _pin(locked, "000000"), 5)
    for i in range(2):
        await store.check_pin(after.user_id, f"fail-{i}", _pin(after, "000000"), 5)
    foreign = _request(stranger, 1_000)
    requests = [
        _request(ok, 1_000),
        _request(wrong, 1_000, pin="000000"),
        _request(blocked, 1_000),
        _request(over, 1_000_001),
        _request(otp, 60_000),
        _request(reused, 1_000, key=reused_key),
        _request(used, 1_000, jti=taken_jti),
        _request(locked, 1_000),
        _request(after, 1_000),
        _request(topup, 150_000, kind="topup"),
        dataclasses.replace(foreign, from_account_id=ok.account_id),
    ]
    expected = [ConfirmOutcome.OK, ConfirmOutcome.INVALID_PIN, ConfirmOutcome.FORBIDDEN,
                ConfirmOutcome.LIMIT_EXCEEDED, ConfirmOutcome.OK, ConfirmOutcome.KEY_REUSED,
                ConfirmOutcome.TOKEN_USED, ConfirmOutcome.PIN_LOCKED, ConfirmOutcome.OK,
                ConfirmOutcome.OK, ConfirmOutcome.FORBIDDEN]
    return requests, expected


async def test_the_confirms_waiting_together_share_one_transaction(
        store: PostgresBusinessStore) -> None:
    """Confirms of different users called at once are one batch (one checkout, one
    transaction), and each gets the outcome it would get alone, with its writes."""
    requests, expected = await _mixed_batch(store)
    checkouts: list[int] = []
    connection = store._connection

    def counted():  # type: ignore[no-untyped-def]
        checkouts.append(1)
        return connection()

    store._connection = counted  # type: ignore[method-assign]
    batches = store._confirms.batches
    try:
        results = await asyncio.gather(*(store.confirm_checks(r, GuessBudgets())
                                         for r in requests))
    finally:
        del store._connection
    assert [r.outcome for r in results] == expected
    assert store._confirms.batches == batches + 1 and len(checkouts) == 1
    assert results[1].attempts_left == 4
    assert results[0].attempt == requests[0].attempt
    assert results[4].attempt == requests[4].attempt
    async with store.engine.connect() as conn:
        def scalar(sql: str, **params: object):  # type: ignore[no-untyped-def]
            return conn.scalar(text(sql), params)
        # What each call wrote, and only that: the reservations of the OK ones, the OTP
        # send of the OTP one, the wrong PIN counted, the counter reset after failures,
        # nothing for the one over the limit (its token free again).
        assert await scalar("SELECT count(*) FROM limit_reservations WHERE transfer_id ="
                            " ANY(:t)", t=[r.transfer_id for r in requests]) == 4
        assert await scalar("SELECT count(*) FROM otp_sends WHERE transfer_id = :t",
                            t=requests[4].transfer_id) == 1
        assert await scalar("SELECT pin_failed_attempts FROM users WHERE user_id = :u",
                            u=requests[1].user_id) == 1
        assert await scalar("SELECT pin_failed_attempts FROM users WHERE user_id = :u",
                            u=requests[8].user_id) == 0
        assert await scalar("SELECT count(*) FROM transfer_token_uses WHERE jti = :j",
                            j=requests[3].jti) == 0
        assert await scalar("SELECT reserved_minor FROM topup_usage WHERE user_id = :u",
                            u=requests[9].user_id) == 150_000


async def test_a_call_that_raises_fails_alone(store: PostgresBusinessStore) -> None:
    """A non-positive amount raises ``ValueError``; in a batch it rolls the batch back,
    and then every call runs alone: it raises, the others get their own outcomes."""
    requests, expected = await _mixed_batch(store)
    zero = _request(await _new_user(store), 0)
    results = await asyncio.gather(
        *(store.confirm_checks(r, GuessBudgets()) for r in [zero, *requests]),
        return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert [getattr(r, "outcome", r) for r in results[1:]] == expected
    assert await store.reserved_today(zero.user_id, DAY) == 0


async def test_batches_of_two_workers_lock_their_users_in_one_order(
        database_url: str, store: PostgresBusinessStore, isolation_id: str) -> None:
    """Two stores (two workers) confirming for the same users at once, in opposite
    orders: the users' rows are locked by user_id, so no batch ever deadlocks (a failed
    batch would run again call by call, which would hide it: the batches are watched)."""
    other = PostgresBusinessStore(make_engine(database_url, f"{isolation_id}_biz", 10),
                                  f"{isolation_id}_biz")
    failures: list[BaseException] = []
    runs = [s._confirms._run_batch for s in (store, other)]
    for s, run in zip((store, other), runs, strict=True):

        async def watched(calls, run=run):  # type: ignore[no-untyped-def]
            try:
                return await run(calls)
            except Exception as exc:
                failures.append(exc)
                raise
        s._confirms._run_batch = watched  # type: ignore[method-assign]
    try:
        users = [await _new_user(store) for _ in range(12)]
        for _ in range(5):
            results = await asyncio.gather(
                *(store.confirm_checks(_request(u, 1_000), GuessBudgets()) for u in users),
                *(other.confirm_checks(_request(u, 1_000), GuessBudgets())
                  for u in reversed(users)))
            assert all(r.outcome is ConfirmOutcome.OK for r in results)
        assert failures == []
        for u in users:
            assert await store.reserved_today(u.user_id, DAY) == 10 * 1_000
    finally:
        for s, run in zip((store, other), runs, strict=True):
            s._confirms._run_batch = run  # type: ignore[method-assign]
        await other.close()


async def test_the_inits_waiting_together_are_one_read(store: PostgresBusinessStore) -> None:
    users = [await _new_user(store) for _ in range(6)]
    await store.reserve_daily_limit(users[0].user_id, _uid("t"), DAY, 7_000, 1_000_000)
    batches = store._init_reads.batches
    facts = await asyncio.gather(
        *(store.init_facts(u.user_id, users[-1].account_id, DAY) for u in users),
        store.init_facts("nobody", "acc-nobody", DAY))
    assert store._init_reads.batches == batches + 1
    assert [f.user for f in facts] == [*users, None]
    assert [f.reserved_today_minor for f in facts] == [7_000, 0, 0, 0, 0, 0, 0]
    assert [f.payee_exists for f in facts] == [True] * 6 + [False]
    assert facts[0].payee_currency == "USD"


async def test_the_outcomes_saved_together_are_one_write(
        store: PostgresBusinessStore) -> None:
    """``save_outcome`` calls waiting together are one pipelined write, applied in the
    calls' order (the last outcome of a key wins, as one call after another)."""
    users = [await _new_user(store) for _ in range(4)]
    requests = [_request(u, 1_000) for u in users]
    for r in requests:
        assert (await store.confirm_checks(r, GuessBudgets())).outcome is ConfirmOutcome.OK
    batches = store._outcome_writes.batches
    await asyncio.gather(
        *(store.save_outcome(r.user_id, r.idempotency_key, "COMPLETED", None)
          for r in requests[:3]),
        store.save_outcome(requests[3].user_id, requests[3].idempotency_key, "FAILED", "X"),
        store.save_outcome(requests[3].user_id, requests[3].idempotency_key, "FAILED", "Y"),
        store.save_outcome("nobody", "no-key", "COMPLETED", None))  # no record: none made
    assert store._outcome_writes.batches == batches + 1
    kept = [await store.kept_outcome(r.user_id, r.idempotency_key) for r in requests]
    assert [(k.state, k.code) for k in kept if k is not None] == [
        ("COMPLETED", None)] * 3 + [("FAILED", "Y")]
    assert await store.kept_outcome("nobody", "no-key") is None


async def test_a_confirm_cancelled_while_its_batch_waits_leaves_what_a_crash_would(
        store: PostgresBusinessStore) -> None:
    """A caller cancelled while its batch waits for a user's lock (another worker's
    transaction) does not stop the batch: its checks commit once the lock is released,
    as if the worker had crashed after the commit, and the redelivered record finds them:
    OK again with the same attempt, the limit reserved once."""
    user = await _new_user(store)
    request = _request(user, 4_000)
    async with store.engine.connect() as other:
        held = await other.begin()
        await other.execute(text("SELECT 1 FROM users WHERE user_id = :u FOR UPDATE"),
                            {"u": user.user_id})

        async def blocked() -> bool:  # the batch's lock statement waits for ``other``
            async with store.engine.connect() as conn:
                return bool(await conn.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%FROM users WHERE user_id = ANY%'")))

        call = asyncio.ensure_future(store.confirm_checks(request, GuessBudgets()))
        await wait_for(blocked, timeout=15, what="the batch waiting for the user's lock")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await held.rollback()
    await wait_for(lambda: store._confirms._runner is None, timeout=15,
                   what="the batch's end")
    again = await store.confirm_checks(dataclasses.replace(request, attempt="other"),
                                       GuessBudgets())
    assert again.outcome is ConfirmOutcome.OK and again.attempt == request.attempt
    assert await store.reserved_today(user.user_id, DAY) == 4_000


# --- the asyncpg connection under SQLAlchemy's pool --------------------------------------


async def test_errors_on_the_asyncpg_path_never_show_bound_values(
        store: PostgresBusinessStore) -> None:
    """The store's statements run on asyncpg directly, without SQLAlchemy's
    ``hide_parameters``: a server error's text names the failure, never the values bound
    (asyncpg sends them apart from the statement)."""
    with pytest.raises(Exception) as info:
        async with store._connection() as raw:
            await raw.fetchval("SELECT length($1::text) / 0", "97531864")
    assert getattr(info.value, "sqlstate", None) == "22012"
    assert "97531864" not in str(info.value) and "97531864" not in repr(info.value)
    assert await store.get_user("nobody") is None  # the pool still serves


async def test_a_connection_left_in_a_transaction_never_returns_to_the_pool(
        store: PostgresBusinessStore) -> None:
    seen: list[object] = []
    with pytest.raises(RuntimeError):
        async with store._connection() as raw:
            seen.append(raw)
            await raw.execute("BEGIN")
            raise RuntimeError("interrupted mid-transaction")
    assert seen[0].is_closed()  # type: ignore[attr-defined]
    with pytest.raises(asyncio.CancelledError):
        async with store._connection() as raw:
            seen.append(raw)
            raise asyncio.CancelledError
    assert seen[1].is_closed()  # type: ignore[attr-defined]
    for _ in range(12):  # every pooled connection: none is left inside a transaction
        async with store._connection() as raw:
            assert not raw.is_in_transaction()
    user = await _new_user(store)
    assert (await _confirm(store, user, 1_000)).outcome is ConfirmOutcome.OK


# --- migration -------------------------------------------------------------------------


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


async def test_a_session_frozen_inside_a_transaction_loses_its_locks(
        database_url: str) -> None:
    """A process that stops mid-transaction (frozen, cut off) must not hold its row locks
    until TCP keepalive notices: the server ends the idle transaction and frees them."""
    key = int(uuid.uuid4().int % 2**62)
    frozen = make_engine(database_url, "public", pool_size=1, idle_in_transaction_timeout=1.0)
    other = make_engine(database_url, "public", pool_size=1)
    try:
        conn = await frozen.connect()
        await conn.begin()
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

        async def lock_free() -> bool:
            async with other.begin() as c:
                return bool((await c.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key})).scalar_one())

        assert not await lock_free()  # held while the session is inside its transaction
        await wait_for(lock_free, timeout=30.0, what="the idle transaction's lock to be freed")
        async with other.connect() as c:
            alive = (await c.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid})).scalar_one()
        assert alive == 0
        with pytest.raises(Exception):  # noqa: B017 - the session is gone, whatever the error type
            await conn.execute(text("SELECT 1"))
        await conn.invalidate()
    finally:
        await frozen.dispose()
        await other.dispose()


async def test_the_pool_keeps_its_connections_through_bursts(database_url: str) -> None:
    """A burst of more calls than the pool holds waits for its connections instead of
    opening and closing extra ones (each new backend cost PostgreSQL a fork, asyncpg's type
    introspection and every statement's preparation again): across two bursts of 12 calls
    on a pool of 3, the same 3 backends serve every call."""
    from app.adapters.db import bare_connection

    engine = make_engine(database_url, "public", pool_size=3)

    async def call() -> int:
        async with bare_connection(engine) as raw:
            # Server-side work keeps the connection busy while the others ask.
            return int(await raw.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.02)"))

    try:
        first = set(await asyncio.gather(*(call() for _ in range(12))))
        second = set(await asyncio.gather(*(call() for _ in range(12))))
    finally:
        await engine.dispose()
    assert len(first) == 3
    assert second == first



async def test_the_confirm_facts_keep_a_generic_plan(database_url: str) -> None:
    """The confirm's facts statement is planned five times per connection, then its generic
    plan is kept. With the OTP budgets folded in (``CASE WHEN $7``), PostgreSQL planned it
    again at every execution in this same setting (a user with many OTP sends; measured
    under load: 4,125 plans for 4,769 executions)."""
    from app.adapters import postgres_store
    from app.adapters.db import bare_connection

    schema = f"plans_{uuid.uuid4().hex[:8]}"
    store = PostgresBusinessStore(make_engine(database_url, schema, pool_size=1), schema)
    try:
        await store.migrate()
        async with bare_connection(store.engine) as raw:
            await raw.execute(
                "INSERT INTO otp_sends (transfer_id, user_id, sent_at) SELECT 't' || i,"
                " 'u' || (i % 100), now() - i * interval '1 s' FROM generate_series(1, 3000) i;"
                "INSERT INTO transfer_token_uses (jti, transfer_id) SELECT 'j' || i, 't' || i"
                " FROM generate_series(1, 30000) i;"
                "ANALYZE")
            statement = await raw.prepare(postgres_store._CONFIRM_FACTS)
            for i in range(12):
                await statement.fetchrow(f"u{i}", f"key-{i}", f"t{i}", "jti")
            plans = await raw.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = $1", postgres_store._CONFIRM_FACTS)
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()
    assert plans is not None
    assert (plans["custom_plans"], plans["generic_plans"]) == (5, 7)


@pytest.mark.parametrize("table", ["query_transfers", "idempotency_records"])
async def test_rows_updated_in_place_stay_in_their_page(
        store: PostgresBusinessStore, table: str) -> None:
    """The tables whose rows each transfer updates in place leave room in their pages: one
    statement updating every row of a few pages (as the cycle's flush does) keeps a good
    part of the new versions in their pages, without a new index entry (HOT): 41-52 of 100
    here at fillfactor 70, none at the default 100 (the pages full). Under load (K=512,
    the versions of earlier cycles pruned meanwhile): 15 → 75 % and 42 → 71 % HOT."""
    from app.adapters.db import bare_connection

    tag = uuid.uuid4().hex[:8]
    insert = {
        "query_transfers": "INSERT INTO query_transfers (key, home_partition, value)"
                           " SELECT $1 || i, 0, decode(repeat('ab', 300), 'hex')"
                           " FROM generate_series(1, 100) i",
        "idempotency_records": "INSERT INTO idempotency_records (operator_id, idempotency_key,"
                               " fingerprint, transfer_id, attempt) SELECT $1 || i, 'k',"
                               " repeat('f', 200), $1 || i, 'a' FROM generate_series(1, 100) i",
    }[table]
    update = {
        "query_transfers": "UPDATE query_transfers SET value = decode(repeat('cd', 300), 'hex')"
                           " WHERE key LIKE $1 || '%'",
        "idempotency_records": "UPDATE idempotency_records SET state = 'COMPLETED'"
                               " WHERE operator_id LIKE $1 || '%'",
    }[table]
    async with bare_connection(store.engine) as raw, raw.transaction():
        await raw.execute(insert, tag)
        updated = int((await raw.execute(update, tag)).split()[-1])
        hot = await raw.fetchval(
            "SELECT pg_stat_get_xact_tuples_hot_updated($1::regclass)", table)
        options = await raw.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", table)
    assert "fillfactor=70" in (options or [])
    assert updated == 100
    assert hot >= 30, f"{hot} of {updated} updates of {table} were HOT"
