"""One contract, two stores: every test here runs against the in-memory fake
(tests/fakes.py) and the PostgreSQL store (app/adapters/postgres_store.py, own schema per
module), pyeventsourcing's pattern. PostgreSQL is the truth: where the fake differs, the
fake is wrong.

The tests call the ``BusinessStore`` port (app/domain/ports.py) and nothing else, except
through ``Backend``: seeding users and funding sources, the operator's unlock, and a token
claimed without an idempotency record (a transfer from before the records). Every
``ConfirmOutcome`` is produced here on both stores.

Over 400 lines: one contract, read whole: the specification both stores must meet.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

import pytest
import pytest_asyncio
from sqlalchemy import text

from app.adapters.db import make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_matches, pin_verifier
from app.domain.ports import (
    BusinessStore,
    ConfirmChecks,
    ConfirmOutcome,
    ConfirmRequest,
    FundingSource,
    GuessBudgets,
    InitFacts,
    KeptOutcome,
    UserRecord,
    UserStatus,
)
from tests.fakes import InMemoryBusinessStore

PEPPER = b"contract-pepper"
PIN = "123456"
WRONG = "000000"
DAY = date(2026, 1, 2)
T0 = datetime(2026, 1, 2, 9, tzinfo=UTC)
THRESHOLD = 50_000  # the users' OTP threshold: amounts strictly above need an OTP
LIMIT = 1_000_000  # the users' daily transfer limit


class Backend(Protocol):
    """A store under test and what the port does not offer: seeding and the operator."""

    @property
    def store(self) -> BusinessStore: ...

    async def add_user(self, user: UserRecord) -> None: ...

    async def add_funding_source(self, source: FundingSource) -> None: ...

    async def claim_token(self, jti: str, transfer_id: str) -> None: ...

    async def unlock_user(self, user_id: str) -> bool: ...


@dataclass
class MemoryBackend:
    fake: InMemoryBusinessStore = field(default_factory=InMemoryBusinessStore)

    @property
    def store(self) -> BusinessStore:
        return self.fake

    async def add_user(self, user: UserRecord) -> None:
        self.fake.put_user(user)

    async def add_funding_source(self, source: FundingSource) -> None:
        self.fake.funding_sources[source.funding_source_id] = source

    async def claim_token(self, jti: str, transfer_id: str) -> None:
        await self.fake.claim_transfer_token(jti, transfer_id)

    async def unlock_user(self, user_id: str) -> bool:
        return await self.fake.unlock_user(user_id)


@dataclass
class PostgresBackend:
    pg: PostgresBusinessStore

    @property
    def store(self) -> BusinessStore:
        return self.pg

    async def add_user(self, user: UserRecord) -> None:
        await self.pg.upsert_user(user)

    async def add_funding_source(self, source: FundingSource) -> None:
        await self.pg.upsert_funding_source(source)

    async def claim_token(self, jti: str, transfer_id: str) -> None:
        await self.pg.claim_transfer_token(jti, transfer_id)

    async def unlock_user(self, user_id: str) -> bool:
        return await self.pg.unlock_user(user_id)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pg_store(database_url: str, isolation_id: str) -> AsyncIterator[PostgresBusinessStore]:
    schema = f"{isolation_id}_biz"
    s = PostgresBusinessStore(make_engine(database_url, schema, pool_size=4), schema)
    try:
        await s.migrate()
        yield s
    finally:
        async with s.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await s.close()


@pytest.fixture(params=[
    "in-memory",
    pytest.param("postgresql", marks=pytest.mark.integration),
])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test on a fresh fake, or on the module's schema (every test uses fresh ids)."""
    if request.param == "in-memory":
        return MemoryBackend()
    return PostgresBackend(request.getfixturevalue("pg_store"))


# --- helpers ---------------------------------------------------------------------------


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _user(backend: Backend, *, status: UserStatus = UserStatus.ACTIVE,
                currency: str = "EUR") -> UserRecord:
    user_id = _uid("u")
    user = UserRecord(
        user_id=user_id, account_id=f"acc-{user_id}", currency=currency, phone="+15550001111",
        pin_verifier=pin_verifier(PEPPER, user_id, PIN), otp_threshold_minor=THRESHOLD,
        daily_limit_minor=LIMIT, status=status,
    )
    await backend.add_user(user)
    return user


def _pin(user: UserRecord, pin: str, seen: list[str] | None = None) -> Callable[[str], bool]:
    def matches(verifier: str) -> bool:
        if seen is not None:
            seen.append(verifier)
        return pin_matches(PEPPER, user.user_id, pin, verifier)
    return matches


@dataclass(frozen=True)
class Confirm:
    """A confirm's request, fresh ids unless given (its key defaults to its transfer)."""

    user: UserRecord
    pin: str = PIN
    amount: int = 1_000
    jti: str = field(default_factory=lambda: _uid("j"))
    transfer_id: str = field(default_factory=lambda: _uid("t"))
    key: str | None = None
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    record: str | None = field(default_factory=lambda: _uid("rec"))
    account: str | None = None  # the token's payer: the user's account unless given
    topup_limit: int | None = None  # a top-up against this limit (no token, no payer)
    day: date = DAY
    now: datetime = T0
    seen: list[str] | None = None  # the verifiers ``matches`` was asked about

    def request(self) -> ConfirmRequest:
        topup = self.topup_limit is not None
        return ConfirmRequest(
            user_id=self.user.user_id, idempotency_key=self.key or self.transfer_id,
            fingerprint=self.jti, transfer_id=self.transfer_id, attempt=self.attempt,
            matches=_pin(self.user, self.pin, self.seen), record=self.record, day=self.day,
            now=self.now, amount_minor=self.amount,
            from_account_id=None if topup else (self.account or self.user.account_id),
            jti=None if topup else self.jti, kind="topup" if topup else "transfer",
            limit_minor=self.topup_limit)


async def _confirm(backend: Backend, confirm: Confirm,
                   budgets: GuessBudgets | None = None) -> ConfirmChecks:
    return await backend.store.confirm_checks(confirm.request(), budgets or GuessBudgets())


async def _reserved(backend: Backend, user: UserRecord, day: date = DAY) -> int:
    facts = await backend.store.init_facts(user.user_id, user.account_id, day)
    return facts.reserved_today_minor


# --- UserDirectory ---------------------------------------------------------------------


async def test_get_user_returns_the_record_whatever_its_status(backend: Backend) -> None:
    active, blocked = await _user(backend), await _user(backend, status=UserStatus.BLOCKED)
    assert await backend.store.get_user(active.user_id) == active
    assert await backend.store.get_user(blocked.user_id) == blocked
    assert await backend.store.get_user("nobody") is None


async def test_get_funding_source(backend: Backend) -> None:
    user = await _user(backend)
    source = FundingSource(_uid("fs"), user.user_id, "card", "Visa •••• 4242",
                           UserStatus.BLOCKED)
    await backend.add_funding_source(source)
    assert await backend.store.get_funding_source(source.funding_source_id) == source
    assert await backend.store.get_funding_source("fs-nobody") is None


async def test_init_facts_reads_payer_payee_and_the_transfers_reservations(
        backend: Backend) -> None:
    payer, payee = await _user(backend), await _user(backend, currency="USD")
    assert (await _confirm(backend, Confirm(payer, amount=2_500))).outcome is ConfirmOutcome.OK
    topup = await _confirm(backend, Confirm(payer, amount=700, topup_limit=10_000))
    assert topup.outcome is ConfirmOutcome.OK
    assert await backend.store.init_facts(payer.user_id, payee.account_id, DAY) == InitFacts(
        payer, True, 2_500, "USD")  # the top-up counts against its own limit, not here
    assert await backend.store.init_facts(payer.user_id, "acc-nobody", DAY) == InitFacts(
        payer, False, 2_500, None)
    next_day = await backend.store.init_facts(payer.user_id, payee.account_id,
                                              DAY + timedelta(days=1))
    assert next_day.reserved_today_minor == 0
    assert await backend.store.init_facts("nobody", payee.account_id, DAY) == InitFacts(
        None, True, 0, "USD")


# --- confirm_checks: the user and the token's payer -------------------------------------


async def test_an_unknown_or_blocked_user_is_forbidden_before_any_pin(backend: Backend) -> None:
    blocked = await _user(backend, status=UserStatus.BLOCKED)
    ghost = UserRecord("ghost-" + _uid("u"), "acc-ghost", "EUR", "+1", "00", 0, LIMIT,
                       UserStatus.ACTIVE)  # never added
    seen: list[str] = []
    for user in (blocked, ghost):
        checks = await _confirm(backend, Confirm(user, seen=seen))
        assert checks == ConfirmChecks(ConfirmOutcome.FORBIDDEN)
    assert seen == []


async def test_a_token_of_another_payer_is_forbidden_and_spends_nothing(
        backend: Backend) -> None:
    user = await _user(backend)
    seen: list[str] = []
    other = Confirm(user, pin=WRONG, account="acc-someone-else", seen=seen)
    assert await _confirm(backend, other) == ConfirmChecks(ConfirmOutcome.FORBIDDEN, user)
    assert seen == []
    # No PIN failure counted, no token claimed, no key used, nothing reserved:
    wrong = await _confirm(backend, Confirm(user, pin=WRONG))
    assert (wrong.outcome, wrong.attempts_left) == (ConfirmOutcome.INVALID_PIN, 4)
    again = Confirm(user, jti=other.jti, transfer_id=_uid("t"), key=other.transfer_id)
    assert (await _confirm(backend, again)).outcome is ConfirmOutcome.OK
    assert await _reserved(backend, user) == again.amount


# --- confirm_checks: OK, the token's single use, idempotent per transfer ----------------


async def test_ok_returns_the_user_and_keeps_the_first_attempt(backend: Backend) -> None:
    user = await _user(backend)
    first = Confirm(user, amount=30_000)
    assert await _confirm(backend, first) == ConfirmChecks(ConfirmOutcome.OK, user,
                                                           attempt=first.attempt)
    assert await backend.store.kept_outcome(user.user_id, first.transfer_id) == KeptOutcome(
        first.transfer_id, first.jti, first.attempt)
    # The same transfer asking again (a redelivery, a retry): OK with the first attempt,
    # the token still its own, the limit reserved once.
    again = Confirm(user, amount=30_000, jti=first.jti, transfer_id=first.transfer_id)
    assert await _confirm(backend, again) == ConfirmChecks(ConfirmOutcome.OK, user,
                                                           attempt=first.attempt)
    assert await _reserved(backend, user) == 30_000


async def test_a_token_funds_one_transfer(backend: Backend) -> None:
    user = await _user(backend)
    first = Confirm(user)
    assert (await _confirm(backend, first)).outcome is ConfirmOutcome.OK
    elsewhere = Confirm(user, jti=first.jti)  # another transfer, another key
    assert await _confirm(backend, elsewhere) == ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
    assert await _reserved(backend, user) == first.amount  # the refused one reserved nothing
    assert await backend.store.kept_outcome(user.user_id, elsewhere.transfer_id) is None
    fresh = Confirm(user, transfer_id=elsewhere.transfer_id)  # the key is free: new token
    assert (await _confirm(backend, fresh)).outcome is ConfirmOutcome.OK


# --- confirm_checks: the PIN ------------------------------------------------------------


async def test_wrong_pins_count_down_then_lock_until_the_lock_ends(backend: Backend) -> None:
    user = await _user(backend)
    budgets = GuessBudgets(pin_max_attempts=5, pin_lock_seconds=3_600)
    results = [await _confirm(backend, Confirm(user, pin=WRONG), budgets) for _ in range(5)]
    assert [(c.outcome, c.attempts_left) for c in results] == [
        (ConfirmOutcome.INVALID_PIN, 4), (ConfirmOutcome.INVALID_PIN, 3),
        (ConfirmOutcome.INVALID_PIN, 2), (ConfirmOutcome.INVALID_PIN, 1),
        (ConfirmOutcome.PIN_LOCKED, 0)]
    assert all(c.user == user for c in results)
    seen: list[str] = []
    right = Confirm(user, now=T0 + timedelta(minutes=59), seen=seen)
    assert await _confirm(backend, right, budgets) == ConfirmChecks(
        ConfirmOutcome.PIN_LOCKED, user)
    assert seen == []  # a locked PIN is not even compared
    assert await backend.store.kept_outcome(user.user_id, right.transfer_id) is None
    assert await _reserved(backend, user) == 0
    # The lock has ended: the budget is whole again.
    later = await _confirm(backend, Confirm(user, pin=WRONG, now=T0 + timedelta(minutes=61)),
                           budgets)
    assert (later.outcome, later.attempts_left) == (ConfirmOutcome.INVALID_PIN, 4)


async def test_a_right_pin_resets_the_count(backend: Backend) -> None:
    user = await _user(backend)
    for left in (4, 3):
        assert (await _confirm(backend, Confirm(user, pin=WRONG))).attempts_left == left
    assert (await _confirm(backend, Confirm(user))).outcome is ConfirmOutcome.OK
    assert (await _confirm(backend, Confirm(user, pin=WRONG))).attempts_left == 4


async def test_a_wrong_pin_counts_once_per_record_and_user(backend: Backend) -> None:
    alice, bob = await _user(backend), await _user(backend)
    record = _uid("business.commands/3/17")
    first = await _confirm(backend, Confirm(alice, pin=WRONG, record=record))
    redelivered = await _confirm(backend, Confirm(alice, pin=WRONG, record=record))
    other = await _confirm(backend, Confirm(alice, pin=WRONG, record=_uid("rec")))
    assert [c.attempts_left for c in (first, redelivered, other)] == [4, 4, 3]
    # The same record coordinates for another user count for that user.
    bobs = await _confirm(backend, Confirm(bob, pin=WRONG, record=record))
    assert (bobs.outcome, bobs.attempts_left) == (ConfirmOutcome.INVALID_PIN, 4)
    # No record: every call counts.
    unkeyed = [await _confirm(backend, Confirm(bob, pin=WRONG, record=None)) for _ in range(2)]
    assert [c.attempts_left for c in unkeyed] == [3, 2]


async def test_unlock_ends_the_pin_lock_and_forgets_the_wrong_otps(backend: Backend) -> None:
    user = await _user(backend)
    for _ in range(5):
        await _confirm(backend, Confirm(user, pin=WRONG))
    for i in range(10):
        await backend.store.record_otp_failure(user.user_id, f"{user.user_id}:t{i}:a", T0)
    assert (await _confirm(backend, Confirm(user))).outcome is ConfirmOutcome.PIN_LOCKED
    assert await backend.unlock_user(user.user_id) is True
    assert await backend.store.otp_failures_since(user.user_id, T0 - timedelta(hours=1)) == 0
    big = await _confirm(backend, Confirm(user, amount=THRESHOLD + 1))
    assert big.outcome is ConfirmOutcome.OK  # PIN and OTP budgets whole again
    assert await backend.unlock_user("nobody") is False


# --- confirm_checks: the OTP budgets ----------------------------------------------------


async def test_otp_sends_are_rate_limited_in_a_rolling_window(backend: Backend) -> None:
    user = await _user(backend)
    budgets = GuessBudgets(otp_max_sends=2, otp_send_window_seconds=900)
    sent = [Confirm(user, amount=THRESHOLD + 1) for _ in range(3)]
    assert [(await _confirm(backend, c, budgets)).outcome for c in sent] == [
        ConfirmOutcome.OK, ConfirmOutcome.OK, ConfirmOutcome.RATE_LIMITED]
    assert await _reserved(backend, user) == 2 * (THRESHOLD + 1)  # the refused one: nothing
    # A transfer already counted is decided again without spending the budget again.
    again = Confirm(user, amount=THRESHOLD + 1, jti=sent[0].jti,
                    transfer_id=sent[0].transfer_id)
    assert (await _confirm(backend, again, budgets)).outcome is ConfirmOutcome.OK
    # At the threshold no OTP is needed: no budget asked.
    at = await _confirm(backend, Confirm(user, amount=THRESHOLD), budgets)
    assert at.outcome is ConfirmOutcome.OK
    rolled = await _confirm(backend, Confirm(user, amount=THRESHOLD + 1,
                                             now=T0 + timedelta(seconds=901)), budgets)
    assert rolled.outcome is ConfirmOutcome.OK


async def test_wrong_otps_lock_further_otps_in_a_rolling_window(backend: Backend) -> None:
    user = await _user(backend)
    budgets = GuessBudgets(otp_max_failures=3, otp_failure_window_seconds=86_400)
    for i in range(3):
        await backend.store.record_otp_failure(user.user_id, f"{user.user_id}:{i}", T0)
    locked = Confirm(user, amount=THRESHOLD + 1, now=T0 + timedelta(seconds=1))
    assert await _confirm(backend, locked, budgets) == ConfirmChecks(
        ConfirmOutcome.OTP_LOCKED, user)
    assert await backend.store.kept_outcome(user.user_id, locked.transfer_id) is None
    small = await _confirm(backend, Confirm(user, amount=THRESHOLD,
                                            now=T0 + timedelta(seconds=1)), budgets)
    assert small.outcome is ConfirmOutcome.OK  # no OTP needed: not locked out
    # The token of the refused confirm was not claimed:
    retry = Confirm(user, amount=THRESHOLD + 1, jti=locked.jti, transfer_id=locked.transfer_id,
                    now=T0 + timedelta(days=1, seconds=1))  # the failures rolled out
    assert (await _confirm(backend, retry, budgets)).outcome is ConfirmOutcome.OK


async def test_otp_failures_count_once_per_key_strictly_after_since(backend: Backend) -> None:
    alice, bob = await _user(backend), await _user(backend)
    store = backend.store
    for _ in range(2):
        await store.record_otp_failure(alice.user_id, f"{alice.user_id}:t1:a", T0)
    await store.record_otp_failure(alice.user_id, f"{alice.user_id}:t2:a",
                                   T0 + timedelta(minutes=5))
    await store.record_otp_failure(bob.user_id, f"{bob.user_id}:t1:a", T0)
    assert await store.otp_failures_since(alice.user_id, T0 - timedelta(seconds=1)) == 2
    assert await store.otp_failures_since(alice.user_id, T0) == 1  # strictly after
    assert await store.otp_failures_since(alice.user_id, T0 + timedelta(minutes=5)) == 0
    assert await store.otp_failures_since(bob.user_id, T0 - timedelta(seconds=1)) == 1
    assert await store.otp_failures_since("nobody", T0 - timedelta(days=1)) == 0
    # Asked at once (the PostgreSQL store answers them in one round trip): each its own.
    asked = [(alice.user_id, T0 - timedelta(seconds=1)), (alice.user_id, T0),
             (bob.user_id, T0 - timedelta(seconds=1)), ("nobody", T0 - timedelta(days=1)),
             (alice.user_id, T0 + timedelta(minutes=5))]
    assert await asyncio.gather(*(store.otp_failures_since(u, t) for u, t in asked)) == [
        2, 1, 1, 0, 0]


# --- confirm_checks: the daily limits, and release_daily_limit --------------------------


async def test_the_daily_limit_is_reserved_once_per_transfer(backend: Backend) -> None:
    user = await _user(backend)
    a = Confirm(user, amount=60_000, pin=PIN)
    assert (await _confirm(backend, a)).outcome is ConfirmOutcome.OK
    over = Confirm(user, amount=LIMIT - 60_000 + 1)
    assert await _confirm(backend, over) == ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)
    assert await backend.store.kept_outcome(user.user_id, over.transfer_id) is None
    exact = Confirm(user, amount=LIMIT - 60_000)
    assert (await _confirm(backend, exact)).outcome is ConfirmOutcome.OK
    assert await _reserved(backend, user) == LIMIT
    # The same transfer again passes with the limit full: it reserved already.
    again = Confirm(user, amount=60_000, jti=a.jti, transfer_id=a.transfer_id)
    assert (await _confirm(backend, again)).outcome is ConfirmOutcome.OK
    assert await _reserved(backend, user) == LIMIT
    # Another day, another limit.
    tomorrow = Confirm(user, amount=LIMIT, day=DAY + timedelta(days=1))
    assert (await _confirm(backend, tomorrow)).outcome is ConfirmOutcome.OK


async def test_a_confirm_refused_by_the_limit_leaves_its_token_and_key_free(
        backend: Backend) -> None:
    user = await _user(backend)
    big = Confirm(user, amount=LIMIT + 1)
    assert (await _confirm(backend, big)).outcome is ConfirmOutcome.LIMIT_EXCEEDED
    same_token = Confirm(user, jti=big.jti)  # another transfer with the refused one's token
    assert (await _confirm(backend, same_token)).outcome is ConfirmOutcome.OK
    same_key = Confirm(user, key=big.transfer_id, transfer_id=big.transfer_id)
    assert (await _confirm(backend, same_key)).outcome is ConfirmOutcome.OK


async def test_release_gives_the_reservation_back_once(backend: Backend) -> None:
    user = await _user(backend)
    a, b = Confirm(user, amount=10_000), Confirm(user, amount=20_000)
    for c in (a, b):
        assert (await _confirm(backend, c)).outcome is ConfirmOutcome.OK
    await backend.store.release_daily_limit(a.transfer_id)
    assert await _reserved(backend, user) == 20_000
    await backend.store.release_daily_limit(a.transfer_id)  # once
    await backend.store.release_daily_limit("t-never-reserved")  # a no-op
    assert await _reserved(backend, user) == 20_000
    full = Confirm(user, amount=LIMIT - 20_000)
    assert (await _confirm(backend, full)).outcome is ConfirmOutcome.OK


async def test_top_ups_have_their_own_limit_and_release(backend: Backend) -> None:
    user = await _user(backend)
    first = Confirm(user, amount=3_000, topup_limit=5_000)
    assert await _confirm(backend, first) == ConfirmChecks(ConfirmOutcome.OK, user,
                                                           attempt=first.attempt)
    over = await _confirm(backend, Confirm(user, amount=3_000, topup_limit=5_000))
    assert over.outcome is ConfirmOutcome.LIMIT_EXCEEDED
    wrong = await _confirm(backend, Confirm(user, amount=1_000, topup_limit=5_000, pin=WRONG))
    assert wrong.outcome is ConfirmOutcome.INVALID_PIN  # confirmed with the PIN too
    assert await _reserved(backend, user) == 0  # the transfers' limit is apart
    assert (await _confirm(backend, Confirm(user, amount=LIMIT))).outcome is ConfirmOutcome.OK
    await backend.store.release_daily_limit(first.transfer_id)
    again = await _confirm(backend, Confirm(user, amount=5_000, topup_limit=5_000))
    assert again.outcome is ConfirmOutcome.OK
    assert await _reserved(backend, user) == LIMIT  # the top-up's release left it alone


async def test_a_failing_confirm_leaves_nothing_behind(backend: Backend) -> None:
    """PostgreSQL runs the checks in one transaction: an exception after the token's claim
    (here the non-positive amount) rolls the claim back."""
    user = await _user(backend)
    broken = Confirm(user, amount=0)
    with pytest.raises(ValueError, match="positive"):
        await _confirm(backend, broken)
    assert await backend.store.kept_outcome(user.user_id, broken.transfer_id) is None
    other = Confirm(user, jti=broken.jti)  # another transfer with its token
    assert (await _confirm(backend, other)).outcome is ConfirmOutcome.OK


# --- confirm_checks and the idempotency records -----------------------------------------


async def test_another_payload_under_a_used_key_is_refused_before_the_pin(
        backend: Backend) -> None:
    user = await _user(backend)
    key = _uid("k")
    first = Confirm(user, key=key)
    assert (await _confirm(backend, first)).outcome is ConfirmOutcome.OK
    seen: list[str] = []
    other = Confirm(user, key=key, transfer_id=first.transfer_id, pin=WRONG, seen=seen)
    assert await _confirm(backend, other) == ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
    assert seen == []  # no PIN compared, none counted:
    assert (await _confirm(backend, Confirm(user, pin=WRONG))).attempts_left == 4
    # The key is scoped by the user: another user's same key is theirs.
    bob = await _user(backend)
    assert (await _confirm(backend, Confirm(bob, key=key))).outcome is ConfirmOutcome.OK


async def test_an_ended_operation_is_answered_with_its_kept_outcome(backend: Backend) -> None:
    user = await _user(backend)
    key = _uid("k")
    first = Confirm(user, key=key)
    assert (await _confirm(backend, first)).outcome is ConfirmOutcome.OK
    await backend.store.save_outcome(user.user_id, key, "FAILED", "INSUFFICIENT_FUNDS")
    kept = KeptOutcome(first.transfer_id, first.jti, first.attempt, "FAILED",
                       "INSUFFICIENT_FUNDS")
    assert await backend.store.kept_outcome(user.user_id, key) == kept
    # Found from the transfer too (a capture replayed after its top-up's saga was purged).
    assert await backend.store.outcome_of_transfer(first.transfer_id) == kept
    assert await backend.store.outcome_of_transfer(_uid("t")) is None
    seen: list[str] = []
    answered = Confirm(user, key=key, jti=first.jti, transfer_id=first.transfer_id,
                       pin=WRONG, seen=seen)
    assert await _confirm(backend, answered) == ConfirmChecks(
        ConfirmOutcome.ANSWERED, user, kept=kept)
    assert seen == []


async def test_save_outcome_keeps_the_last_end_of_a_used_key_only(backend: Backend) -> None:
    user = await _user(backend)
    key = _uid("k")
    first = Confirm(user, key=key)
    assert (await _confirm(backend, first)).outcome is ConfirmOutcome.OK
    store = backend.store
    await store.save_outcome(user.user_id, key, "COMPLETED", None)
    await store.save_outcome(user.user_id, key, "COMPLETED", None)  # idempotent
    assert await store.kept_outcome(user.user_id, key) == KeptOutcome(
        first.transfer_id, first.jti, first.attempt, "COMPLETED", None)
    await store.save_outcome(user.user_id, key, "FAILED", "TIMEOUT")
    assert await store.kept_outcome(user.user_id, key) == KeptOutcome(
        first.transfer_id, first.jti, first.attempt, "FAILED", "TIMEOUT")
    await store.save_outcome(user.user_id, "k-never-used", "COMPLETED", None)
    assert await store.kept_outcome(user.user_id, "k-never-used") is None
    assert await store.kept_outcome("someone-else", key) is None


async def test_a_key_of_a_transfer_from_before_the_records_stays_used(
        backend: Backend) -> None:
    user = await _user(backend)
    key = _uid("k")
    old = _uid("j-old")
    await backend.claim_token(old, "t-" + key)  # claimed, no idempotency record
    reuse = Confirm(user, key=key, transfer_id="t-" + key)  # another token
    assert await _confirm(backend, reuse) == ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
    same = Confirm(user, key=key, transfer_id="t-" + key, jti=old)
    assert (await _confirm(backend, same)).outcome is ConfirmOutcome.OK
