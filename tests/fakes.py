"""In-memory fakes of the business center's ports, and a harness that runs the whole transfer
loop (business worker + reference account center) without Kafka or PostgreSQL.

* :class:`InMemoryBusinessStore` has the semantics of ``PostgresBusinessStore``
  (app/adapters/postgres_store.py): PIN failures counted once per Kafka record, a lock
  at ``max_attempts`` that expires, per-user OTP budgets, idempotency records,
  first-claim-wins transfer tokens, idempotent daily-limit reservations
  and releases. asyncio runs one coroutine at a time and no method awaits inside, so every
  method is atomic, as the PostgreSQL transactions are.
* :class:`DictSagas` keeps each saga as the JSON of ``saga_to_dict`` (what the Faust table
  stores) and decodes it on every ``get``: each test exercises the storage round trip.
* :class:`AccountCenterSim` behaves like the reference account center
  (reference/account_center/ledger.py): a command id applies once and its event is returned
  again unchanged; a debit never makes a balance negative.
* :class:`Harness` wires a ``TransferService`` to the fakes and moves the outbound
  messages between the service and the simulator, so a test can deliver, drop, duplicate
  or replay any message.

Over 400 lines: a fake per port, the account center simulator and the harness wiring them:
what every service-level test imports, in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from app.adapters.postgres_store import PinCheck, PinOutcome, TokenClaim
from app.domain import transfer_saga as saga_core
from app.domain.pin import pin_verifier
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
from app.record_failures import Outbound
from app.settings import Settings
from app.transfers.ids import transfer_id_for
from app.transfers.service import TransferService
from reference.user_center import issue_access_token
from schemas.wire import AccountCommand, AccountCommandType, AccountEvent, AccountEventType

#: 2030-01-02T00:00:00Z: early in a UTC day, so a test never crosses a daily-limit day.
START = datetime(2030, 1, 2, tzinfo=UTC).timestamp()
PIN = "73910482"  # the default PIN of seeded users: distinctive, so a leak is recognisable
ACCESS_SECRET = "tests-access-token-secret-" + "a" * 40
TRANSFER_SECRET = "tests-transfer-token-secret-" + "t" * 40
PIN_PEPPER = "tests-pin-pepper-" + "p" * 40
OTP_PEPPER = "tests-otp-pepper-" + "o" * 40


# --------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _UserRow:
    record: UserRecord
    pin_failed_attempts: int = 0
    pin_locked_until: datetime | None = None


class InMemoryBusinessStore:
    """``BusinessStore`` over dicts, with the PostgreSQL store's semantics (proven by
    tests/integration/test_store_contract.py).

    Beside the port, what tests use: seeding (``put_user``, ``funding_sources``), the
    operator's ``unlock_user``, ``pin_failures``, the state as attributes, ``calls`` (the
    names of the methods called, in order), and the steps of ``confirm_checks``
    (``check_pin``, ``claim_transfer_token``, ``reserve_daily_limit``) as methods that a test
    can count or break.
    """

    def __init__(self, users: Iterable[UserRecord] = ()) -> None:
        self.users: dict[str, _UserRow] = {}
        self.token_uses: dict[str, str] = {}  # jti -> transfer_id
        self.daily_usage: dict[tuple[str, date], int] = {}
        self.topup_usage: dict[tuple[str, date], int] = {}
        self.reservations: dict[str, tuple[str, date, int, str]] = {}  # transfer_id -> row
        self.calls: list[str] = []  # names of the methods called, in order
        self.funding_sources: dict[str, FundingSource] = {}
        self.pin_failure_records: set[tuple[str, str]] = set()  # (user_id, record)
        self.otp_failures: dict[str, tuple[str, datetime]] = {}  # key -> (user, at)
        self.otp_sends: dict[str, tuple[str, datetime]] = {}  # transfer_id -> (user, at)
        self.kept: dict[tuple[str, str], KeptOutcome] = {}  # (operator, key) -> record
        for user in users:
            self.put_user(user)

    # --- UserDirectory ---------------------------------------------------------------

    async def get_user(self, user_id: str) -> UserRecord | None:
        self.calls.append("get_user")
        return self._user(user_id)

    async def get_funding_source(self, funding_source_id: str) -> FundingSource | None:
        self.calls.append("get_funding_source")
        return self.funding_sources.get(funding_source_id)

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        self.calls.append("init_facts")
        payee = next((row.record for row in self.users.values()
                      if row.record.account_id == to_account_id), None)
        return InitFacts(self._user(user_id), payee is not None,
                         self.daily_usage.get((user_id, day), 0),
                         None if payee is None else payee.currency)

    def _user(self, user_id: str) -> UserRecord | None:
        row = self.users.get(user_id)
        return None if row is None else row.record

    # --- TransferChecks --------------------------------------------------------------

    async def confirm_checks(self, request: ConfirmRequest, budgets: GuessBudgets
                             ) -> ConfirmChecks:
        """The steps in the PostgreSQL store's order; as its one transaction, an exception
        leaves nothing behind."""
        self.calls.append("confirm_checks")
        saved = self._state()
        try:
            return await self._confirm_checks(request, budgets)
        except BaseException:
            self._restore(saved)
            raise

    async def _confirm_checks(self, r: ConfirmRequest, budgets: GuessBudgets
                              ) -> ConfirmChecks:
        user = self._user(r.user_id)
        if user is None or user.status is not UserStatus.ACTIVE:
            return ConfirmChecks(ConfirmOutcome.FORBIDDEN)
        if r.from_account_id is not None and user.account_id != r.from_account_id:
            return ConfirmChecks(ConfirmOutcome.FORBIDDEN, user)
        kept = self.kept.get((r.user_id, r.idempotency_key))
        if kept is not None and kept.fingerprint != r.fingerprint:
            return ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
        if kept is not None and kept.state is not None:
            return ConfirmChecks(ConfirmOutcome.ANSWERED, user, kept=kept)
        if kept is None and r.jti is not None and any(
                t == r.transfer_id and j != r.jti for j, t in self.token_uses.items()):
            return ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
        pin = await self.check_pin(r.user_id, r.record, r.matches, budgets.pin_max_attempts,
                                   now=r.now, lock_seconds=budgets.pin_lock_seconds)
        if pin.outcome is PinOutcome.LOCKED:
            return ConfirmChecks(ConfirmOutcome.PIN_LOCKED, user)
        if pin.outcome is PinOutcome.INVALID:
            return ConfirmChecks(ConfirmOutcome.INVALID_PIN, user, pin.attempts_left)
        needs_otp = r.amount_minor > user.otp_threshold_minor
        if needs_otp and r.transfer_id not in self.otp_sends:
            failures_since = r.now - timedelta(seconds=budgets.otp_failure_window_seconds)
            sends_since = r.now - timedelta(seconds=budgets.otp_send_window_seconds)
            if sum(1 for u, at in self.otp_failures.values()
                   if u == r.user_id and at > failures_since) >= budgets.otp_max_failures:
                return ConfirmChecks(ConfirmOutcome.OTP_LOCKED, user)
            if sum(1 for u, at in self.otp_sends.values()
                   if u == r.user_id and at > sends_since) >= budgets.otp_max_sends:
                return ConfirmChecks(ConfirmOutcome.RATE_LIMITED, user)
        claimed_before = r.jti in self.token_uses
        if r.jti is not None and await self.claim_transfer_token(r.jti, r.transfer_id) \
                is not TokenClaim.CLAIMED:
            return ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
        limit = user.daily_limit_minor if r.limit_minor is None else r.limit_minor
        if not await self.reserve_daily_limit(r.user_id, r.transfer_id, r.day, r.amount_minor,
                                              limit, r.kind):
            if r.jti is not None and not claimed_before:  # the savepoint rolled back
                del self.token_uses[r.jti]
            return ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)
        if needs_otp:
            self.otp_sends.setdefault(r.transfer_id, (r.user_id, r.now))
        kept = self.kept.setdefault((r.user_id, r.idempotency_key), KeptOutcome(
            r.transfer_id, r.fingerprint, r.attempt))
        return ConfirmChecks(ConfirmOutcome.OK, user, attempt=kept.attempt)

    async def release_daily_limit(self, transfer_id: str) -> None:
        self.calls.append("release_daily_limit")
        row = self.reservations.pop(transfer_id, None)
        if row is not None:
            user_id, day, amount, kind = row
            usage = self.daily_usage if kind == "transfer" else self.topup_usage
            usage[(user_id, day)] -= amount

    # --- IdempotencyRecords ----------------------------------------------------------

    async def kept_outcome(self, operator_id: str, idempotency_key: str) -> KeptOutcome | None:
        self.calls.append("kept_outcome")
        return self.kept.get((operator_id, idempotency_key))

    async def outcome_of_transfer(self, transfer_id: str) -> KeptOutcome | None:
        self.calls.append("outcome_of_transfer")
        return next((k for k in self.kept.values() if k.transfer_id == transfer_id), None)

    async def save_outcome(self, operator_id: str, idempotency_key: str, state: str,
                           code: str | None) -> None:
        self.calls.append("save_outcome")
        kept = self.kept.get((operator_id, idempotency_key))
        if kept is not None:
            self.kept[(operator_id, idempotency_key)] = replace(kept, state=state, code=code)

    # --- OtpFailures -----------------------------------------------------------------

    async def otp_failures_since(self, user_id: str, since: datetime) -> int:
        self.calls.append("otp_failures_since")
        return sum(1 for u, at in self.otp_failures.values() if u == user_id and at > since)

    async def record_otp_failure(self, user_id: str, key: str, at: datetime) -> None:
        self.calls.append("record_otp_failure")
        self.otp_failures.setdefault(key, (user_id, at))

    # --- the steps of confirm_checks (a test counts them in ``calls`` or breaks them) --

    async def check_pin(
        self,
        user_id: str,
        record: str | None,
        matches: Callable[[str], bool],
        max_attempts: int,
        *,
        now: datetime,
        lock_seconds: float,
    ) -> PinCheck:
        self.calls.append("check_pin")
        row = self.users.get(user_id)
        if row is None:
            return PinCheck(PinOutcome.INVALID, 0)
        if row.pin_locked_until is not None and row.pin_locked_until > now:
            return PinCheck(PinOutcome.LOCKED, 0)
        if row.pin_locked_until is None and row.pin_failed_attempts >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)
        if row.pin_locked_until is not None:  # the lock has ended
            row.pin_failed_attempts, row.pin_locked_until = 0, None
        failed = row.pin_failed_attempts
        if matches(row.record.pin_verifier):
            row.pin_failed_attempts = 0
            return PinCheck(PinOutcome.OK, max_attempts)
        if record is None or (user_id, record) not in self.pin_failure_records:
            if record is not None:
                self.pin_failure_records.add((user_id, record))
            failed += 1
            row.pin_failed_attempts = failed
            if failed >= max_attempts:
                row.pin_locked_until = now + timedelta(seconds=lock_seconds)
        if failed >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)
        return PinCheck(PinOutcome.INVALID, max_attempts - failed)

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        self.calls.append("claim_transfer_token")
        owner = self.token_uses.setdefault(jti, transfer_id)
        return TokenClaim.CLAIMED if owner == transfer_id else TokenClaim.USED_ELSEWHERE

    async def reserve_daily_limit(
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int,
        kind: str,
    ) -> bool:
        self.calls.append("reserve_daily_limit")
        if amount_minor <= 0:
            raise ValueError(f"amount_minor must be positive, got {amount_minor}")
        usage = self.daily_usage if kind == "transfer" else self.topup_usage
        reserved = usage.setdefault((user_id, day), 0)
        if transfer_id in self.reservations:
            return True
        if reserved + amount_minor > limit_minor:
            return False
        self.reservations[transfer_id] = (user_id, day, amount_minor, kind)
        usage[(user_id, day)] = reserved + amount_minor
        return True

    # --- the one transaction ---------------------------------------------------------

    _STATE = ("users", "token_uses", "daily_usage", "topup_usage", "reservations",
              "pin_failure_records", "otp_failures", "otp_sends", "kept")

    def _state(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self._STATE}

    def _restore(self, saved: dict[str, Any]) -> None:
        """Put the state back in place (a test may hold a reference to a dict)."""
        for name, value in saved.items():
            current = getattr(self, name)
            current.clear()
            current.update(value)

    # --- administration, as the PostgreSQL store's plain methods ---------------------

    def put_user(self, user: UserRecord) -> None:
        """Insert or replace a user; clears the PIN failure counter (as ``upsert_user``)."""
        self.users[user.user_id] = _UserRow(user)

    async def unlock_user(self, user_id: str) -> bool:
        """The operator's unlock: ends the PIN lock, forgets the wrong OTPs. False: no
        such user."""
        row = self.users.get(user_id)
        if row is None:
            return False
        row.pin_failed_attempts, row.pin_locked_until = 0, None
        self.otp_failures = {k: v for k, v in self.otp_failures.items() if v[0] != user_id}
        return True

    def pin_failures(self, user_id: str) -> int:
        return self.users[user_id].pin_failed_attempts


def _asdict_form(saga: saga_core.Saga) -> dict[str, Any]:
    """The storage form as ``dataclasses.asdict`` gives it (the reference)."""
    data = dataclasses.asdict(saga)
    data["state"] = saga.state.value
    data["last_outputs"] = [{"t": type(o).__name__, **dataclasses.asdict(o)}
                            for o in saga.last_outputs]
    return data


class DictSagas:
    """``SagaRepository`` over a dict of the JSON storage form (as PostgreSQL keeps it)."""

    def __init__(self, *, check_storage_form: bool = True) -> None:
        self.rows: dict[str, bytes] = {}
        self.puts = 0
        #: Every put compared with the generic ``dataclasses.asdict`` form (tests); off for
        #: a benchmark (bench/service_cpu.py), where the comparison cost more than the
        #: application it measures.
        self.check_storage_form = check_storage_form

    async def get(self, transfer_id: str) -> saga_core.Saga | None:
        return self.get_now(transfer_id)

    def get_now(self, transfer_id: str) -> saga_core.Saga | None:
        """``get`` for a test's own assertions (no event loop needed)."""
        raw = self.rows.get(transfer_id)
        return None if raw is None else saga_core.saga_from_dict(orjson.loads(raw))

    def put(self, saga: saga_core.Saga) -> None:
        stored = orjson.dumps(saga_core.saga_to_dict(saga))
        # saga_to_dict is hand-written for speed: every saga a unit test writes must store
        # exactly what the generic dataclasses.asdict form stores.
        if self.check_storage_form:
            assert stored == orjson.dumps(_asdict_form(saga)), "saga_to_dict differs from asdict"
        self.rows[saga.transfer.transfer_id] = stored
        self.puts += 1

    def scan(self) -> Iterator[saga_core.Saga]:
        for raw in list(self.rows.values()):
            yield saga_core.saga_from_dict(orjson.loads(raw))

    async def due(self, partition: int, now: float, limit: int) -> list[str]:
        found = sorted((deadline, saga.transfer.transfer_id) for saga in self.scan()
                       if saga.transfer.home_partition == partition
                       and (deadline := saga.deadline()) is not None and deadline <= now)
        return [transfer_id for _deadline, transfer_id in found[:limit]]

    async def purge(self, partition: int, older_than: float) -> int:
        old = [saga.transfer.transfer_id for saga in self.scan()
               if saga.transfer.home_partition == partition
               and saga.state in (saga_core.State.COMPLETED, saga_core.State.FAILED)
               and saga.updated_at < older_than]
        for transfer_id in old:
            del self.rows[transfer_id]
        return len(old)


class DictReplies:
    """``ReplyCache`` over a dict."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.saved: dict[str, tuple[int, float]] = {}  # key -> (partition, at)

    async def get(self, key: str) -> bytes | None:
        return self.rows.get(key)

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None:
        self.rows[key] = reply
        self.saved[key] = (partition, at)

    async def purge(self, partition: int, older_than: float) -> int:
        old = [k for k, (p, at) in self.saved.items() if p == partition and at < older_than]
        for key in old:
            del self.rows[key]
            del self.saved[key]
        return len(old)


@dataclass(slots=True)
class FakeClock:
    """A clock a test moves by hand: ``clock()`` is ``clock.now`` (POSIX seconds)."""

    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)


class OtpSequence:
    """A deterministic OTP generator: given codes first, then a seeded random sequence."""

    def __init__(self, seed: int = 7, codes: Iterable[str] = ()) -> None:
        self._given = deque(codes)
        self._rng = random.Random(seed)
        self.issued: list[str] = []

    def __call__(self) -> str:
        code = self._given.popleft() if self._given else f"{self._rng.randrange(10**6):06d}"
        self.issued.append(code)
        return code


# --------------------------------------------------------------------------------------
# the account center
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class SimAccount:
    balance: int
    currency: str


class AccountCenterSim:
    """The reference account center in memory: account.commands in, account.events out."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.accounts: dict[str, SimAccount] = {}
        self.clearing: dict[str, int] = {}  # currency -> money between debit and credit
        self.processed: dict[str, bytes] = {}  # command id -> the event emitted, as sent
        self.contents: dict[str, tuple[str, AccountCommandType, str, int]] = {}
        self.applied: list[AccountCommand] = []  # commands decided (first delivery only)
        self.deliveries = 0

    def open(self, account_id: str, balance: int, currency: str = "EUR") -> None:
        self.accounts[account_id] = SimAccount(balance, currency)

    def close(self, account_id: str) -> None:
        del self.accounts[account_id]

    def balance(self, account_id: str) -> int:
        return self.accounts[account_id].balance

    def balances(self) -> dict[str, int]:
        return {a: acct.balance for a, acct in self.accounts.items()}

    def total(self) -> int:
        """Every minor unit held: the accounts plus clearing (conserved by every command)."""
        return sum(a.balance for a in self.accounts.values()) + sum(self.clearing.values())

    def applied_of(self, transfer_id: str, type_: str | None = None) -> list[AccountCommand]:
        return [c for c in self.applied
                if c.transfer_id == transfer_id and (type_ is None or c.type.value == type_)]

    def apply(self, raw: bytes) -> bytes:
        """Apply one account command (JSON) and return its account event (JSON)."""
        self.deliveries += 1
        cmd = AccountCommand.model_validate_json(raw)
        stored = self.processed.get(cmd.command_id)
        if stored is not None:
            first = self.contents[cmd.command_id]
            if first != (cmd.transfer_id, cmd.type, cmd.account_id, cmd.amount_minor):
                return orjson.dumps(AccountEvent(
                    command_id=cmd.command_id, type=AccountEventType.REJECTED,
                    account_id=cmd.account_id, amount_minor=cmd.amount_minor,
                    reason="COMMAND_ID_CONFLICT",
                    occurred_at=datetime.fromtimestamp(self.clock(), UTC)).to_wire())
            return stored
        self.contents[cmd.command_id] = (cmd.transfer_id, cmd.type, cmd.account_id,
                                         cmd.amount_minor)
        self.applied.append(cmd)
        acct = self.accounts.get(cmd.account_id)
        event_type: AccountEventType
        reason: str | None = None
        if acct is None:
            event_type, reason = AccountEventType.REJECTED, "ACCOUNT_NOT_FOUND"
        elif acct.currency != cmd.currency:
            event_type, reason = AccountEventType.REJECTED, "CURRENCY_MISMATCH"
        elif cmd.type is AccountCommandType.DEBIT:
            if acct.balance < cmd.amount_minor:
                event_type, reason = AccountEventType.REJECTED, "INSUFFICIENT_FUNDS"
            else:
                acct.balance -= cmd.amount_minor
                self.clearing[cmd.currency] = self.clearing.get(cmd.currency, 0) + cmd.amount_minor
                event_type = AccountEventType.DEBITED
        else:
            acct.balance += cmd.amount_minor
            self.clearing[cmd.currency] = self.clearing.get(cmd.currency, 0) - cmd.amount_minor
            event_type = (AccountEventType.CREDITED if cmd.type is AccountCommandType.CREDIT
                          else AccountEventType.REFUNDED)
        event = AccountEvent(
            command_id=cmd.command_id, type=event_type, account_id=cmd.account_id,
            amount_minor=cmd.amount_minor,
            balance_after_minor=None if acct is None else acct.balance,
            reason=reason, occurred_at=datetime.fromtimestamp(self.clock(), UTC),
        )
        value = orjson.dumps(event.to_wire())
        self.processed[cmd.command_id] = value
        return value


# --------------------------------------------------------------------------------------
# the harness
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeedUser:
    user_id: str
    account_id: str
    balance: int | None = 100_000  # None: the account does not exist at the account center
    pin: str = PIN
    otp_threshold_minor: int = 10_000
    daily_limit_minor: int = 1_000_000
    phone: str = "+15550100"
    currency: str = "EUR"
    status: UserStatus = UserStatus.ACTIVE


DEFAULT_USERS = (
    SeedUser("alice", "acc-alice", 100_000, phone="+15550101"),
    SeedUser("bob", "acc-bob", 50_000, phone="+15550102"),
    SeedUser("carol", "acc-carol", 0, phone="+15550103"),
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message consumed by the business worker or the account center."""

    topic: str
    value: bytes | None
    key: bytes | None
    partition: int
    offset: int = -1  # business.commands: the record's offset (a redelivery keeps it)
    #: The wire model the producer kept (``Outbound.model``): handed over with a saga input
    #: when the harness decides them as the saga engine does in-process (``hand_over``).
    model: Any = None


_AUTO_KEY: Any = object()


class Harness:
    """A TransferService on fakes, plus the account center simulator and a message pump.

    Every message the service or the simulator emits is kept in ``emitted``; the ones that
    another component consumes (account commands, account events, saga inputs) also wait
    in ``outbox`` until :meth:`step` or :meth:`run_until_quiet` delivers them. Every
    consumed message is appended to ``history`` so that a test can replay it.
    """

    def __init__(
        self,
        users: Iterable[SeedUser] = DEFAULT_USERS,
        *,
        otp_seed: int = 7,
        otps: Iterable[str] = (),
        start: float = START,
        hand_over: bool = False,
        **settings: Any,
    ) -> None:
        #: Saga inputs decided from the model their relay built (the saga engine's
        #: in-process hand-over), not parsed back from their bytes.
        self.hand_over = hand_over
        values: dict[str, Any] = {
            "access_token_key": ACCESS_SECRET,
            "transfer_token_secret": TRANSFER_SECRET,
            "pin_pepper": PIN_PEPPER,
            "otp_pepper": OTP_PEPPER,
            "topic_prefix": "",
            "jwt_leeway_seconds": 10,
            "otp_ttl_seconds": 300,
            "otp_max_attempts": 5,
            "pin_max_attempts": 5,
            "transfer_token_ttl_seconds": 300,
            "account_command_timeout_seconds": 5.0,
            "account_command_max_backoff_seconds": 60.0,
        }
        values.update(settings)
        self.settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        self.clock = FakeClock(start)
        self.users = {u.user_id: u for u in users}
        pepper = self.settings.pin_pepper.get_secret_value().encode()
        self.store = InMemoryBusinessStore(
            UserRecord(
                user_id=u.user_id, account_id=u.account_id, currency=u.currency, phone=u.phone,
                pin_verifier=pin_verifier(pepper, u.user_id, u.pin),
                otp_threshold_minor=u.otp_threshold_minor,
                daily_limit_minor=u.daily_limit_minor, status=u.status,
            )
            for u in self.users.values()
        )
        self.sim = AccountCenterSim(self.clock)
        for u in self.users.values():
            if u.balance is not None:
                self.sim.open(u.account_id, u.balance, u.currency)
        self.sagas = DictSagas()
        self.reply_cache = DictReplies()
        self.new_otp = OtpSequence(otp_seed, otps)
        #: The back-offs the guard waited out (an outage), instead of sleeping.
        self.pauses: list[float] = []
        self.service = self._service(self.store)
        self.topics = self.service.topics
        self._pumped = {self.topics.account_commands, self.topics.account_events,
                        self.topics.saga_inputs}
        self.outbox: deque[Outbound] = deque()
        self.emitted: list[Outbound] = []
        self.history: list[Delivery] = []
        self._request_ids = itertools.count(1)
        self._offsets: dict[int, int] = {}  # business.commands partition -> last offset

    def _service(self, store: BusinessStore) -> TransferService:
        return TransferService(
            self.settings, store, self.sagas, self.reply_cache,
            clock=self.clock, new_otp=self.new_otp, pause=self._pause,
        )

    def use_store(self, store: BusinessStore) -> None:
        """Run the service on another store (e.g. the PostgreSQL one), the rest unchanged:
        the collaborators receive the store when they are built, so the service is built
        again."""
        self.service = self._service(store)

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)

    # --- building commands -----------------------------------------------------------

    def next_request_id(self) -> str:
        return f"req-{next(self._request_ids):05d}"

    def access_token(self, user_id: str, *, ttl_seconds: int = 900) -> str:
        return issue_access_token(self.settings, user_id, ttl_seconds=ttl_seconds,
                                  now=self.clock.datetime())

    def command(
        self,
        type: str,
        operator: str,
        payload: dict[str, Any],
        idem: str | None = None,
        request_id: str | None = None,
        token: str | None = None,
    ) -> bytes:
        """A business.commands message as the gateway publishes it."""
        envelope: dict[str, Any] = {
            "type": type,
            "requestId": request_id or self.next_request_id(),
            "operatorId": operator,
            "accessToken": token if token is not None else self.access_token(operator),
            "sentAt": self.clock.datetime().isoformat(),
            "payload": payload,
        }
        if idem is not None:
            envelope["idempotencyKey"] = idem
        return orjson.dumps(envelope)

    # --- moving messages -------------------------------------------------------------

    async def send(
        self, raw: bytes | None, key: bytes | None = _AUTO_KEY, partition: int = 0, *,
        deliver: bool = True,
    ) -> list[Outbound]:
        """Consume ``raw`` from business.commands. ``key`` defaults to what the gateway
        uses: the idempotencyKey, else the requestId. ``deliver=False`` drops the outputs
        (a crash after the state was written, before the sends)."""
        if key is _AUTO_KEY:
            key = _gateway_key(raw)
        offset = self._offsets[partition] = self._offsets.get(partition, -1) + 1
        return await self.process(Delivery(self.topics.commands, raw, key, partition, offset),
                                  deliver=deliver)

    async def process(self, item: Delivery, *, deliver: bool = True) -> list[Outbound]:
        """Consume one message on its topic; emit (or drop) what the consumer produces."""
        self.history.append(item)
        t = self.topics
        outs: list[Outbound]
        if item.topic == t.commands:
            outs = await self.service.handle_command(item.value, item.key, item.partition,
                                                     item.offset)
        elif item.topic == t.account_commands:
            assert item.value is not None
            event = self.sim.apply(item.value)
            outs = [Outbound(t.account_events, orjson.loads(event)["accountId"].encode(), event)]
        elif item.topic == t.account_events:
            outs = self.service.route_account_event(item.value, item.key, item.partition)
        elif item.topic == t.saga_inputs:
            outs = await self.service.handle_saga_input(
                item.value, item.key, item.partition,
                parsed=item.model if self.hand_over else None)
        else:
            raise AssertionError(f"nothing consumes {item.topic}")
        if deliver:
            self.emit(outs)
        return outs

    def emit(self, outs: Iterable[Outbound]) -> None:
        for out in outs:
            self.emitted.append(out)
            if out.topic in self._pumped:
                self.outbox.append(out)

    async def step(self, index: int = 0, *, deliver: bool = True,
                   keep: bool = False) -> list[Outbound]:
        """Deliver the ``index``-th waiting message. ``keep`` leaves a copy queued (it will
        be delivered again: a redelivery); ``deliver=False`` drops what it produces."""
        out = self.outbox[index]
        del self.outbox[index]
        if keep:
            self.outbox.append(out)
        return await self.process(
            Delivery(out.topic, out.value, out.key, out.partition or 0, model=out.model),
            deliver=deliver)

    async def tick(self, partition: int = 0, *, deliver: bool = True) -> list[Outbound]:
        out = self.service.tick(partition)
        return await self.process(Delivery(out.topic, out.value, out.key, partition),
                                  deliver=deliver)

    async def run_until_quiet(self, max_steps: int = 100_000) -> int:
        """Deliver waiting messages until none is left; returns how many were delivered."""
        steps = 0
        while self.outbox:
            if steps >= max_steps:
                raise AssertionError(f"not quiet after {max_steps} deliveries")
            await self.step()
            steps += 1
        return steps

    # --- reading what was emitted ----------------------------------------------------

    def emitted_on(
        self, topic: str, outs: Iterable[Outbound] | None = None
    ) -> list[dict[str, Any]]:
        source = self.emitted if outs is None else outs
        return [orjson.loads(o.value) for o in source if o.topic == topic]

    @property
    def replies(self) -> list[dict[str, Any]]:
        return self.emitted_on(self.topics.replies)

    def replies_for(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.replies if r["requestId"] == request_id]

    def reply(self, request_id: str) -> dict[str, Any] | None:
        """The last reply sent to ``request_id``."""
        found = self.replies_for(request_id)
        return found[-1] if found else None

    @property
    def otp_messages(self) -> list[dict[str, Any]]:
        return self.emitted_on(self.topics.otp)

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return self.emitted_on(self.topics.dlq)

    @property
    def transfer_events(self) -> list[dict[str, Any]]:
        return self.emitted_on(self.topics.transfer_events)

    @property
    def account_commands(self) -> list[dict[str, Any]]:
        return self.emitted_on(self.topics.account_commands)

    def otp_for(self, transfer_id: str) -> str:
        codes = [m["otp"] for m in self.otp_messages if m["transferId"] == transfer_id]
        assert codes, f"no OTP was sent for {transfer_id}"
        return str(codes[-1])

    def saga(self, operator: str, idem: str) -> saga_core.Saga | None:
        return self.sagas.get_now(transfer_id_for(operator, idem))

    def balance(self, user_id: str) -> int:
        return self.sim.balance(self.users[user_id].account_id)

    def reserved_today(self, user_id: str) -> int:
        return self.store.daily_usage.get((user_id, self.clock.datetime().date()), 0)

    # --- flows -----------------------------------------------------------------------

    async def init(
        self, operator: str, to_account_id: str, amount_minor: int, *, currency: str = "EUR",
        note: str | None = None, request_id: str | None = None, token: str | None = None,
    ) -> dict[str, Any]:
        rid = request_id or self.next_request_id()
        payload: dict[str, Any] = {"toAccountId": to_account_id, "amountMinor": amount_minor,
                                   "currency": currency}
        if note is not None:
            payload["note"] = note
        await self.send(self.command("transferInit", operator, payload, request_id=rid,
                                     token=token))
        reply = self.reply(rid)
        assert reply is not None
        return reply

    async def transfer_token(self, operator: str, to_account_id: str, amount_minor: int) -> str:
        reply = await self.init(operator, to_account_id, amount_minor)
        assert reply["status"] == "ok", reply
        return str(reply["data"]["transferToken"])

    async def confirm(
        self, operator: str, transfer_token: str, idem: str, *, pin: str | None = None,
        request_id: str | None = None, run: bool = True, deliver: bool = True,
    ) -> dict[str, Any] | None:
        """Send a transferConfirm; with ``run`` pump until quiet. The last reply to it."""
        rid = request_id or self.next_request_id()
        raw = self.command("transferConfirm", operator,
                           {"transferToken": transfer_token,
                            "pin": pin if pin is not None else self.users[operator].pin},
                           idem=idem, request_id=rid)
        await self.send(raw, deliver=deliver)
        if run:
            await self.run_until_quiet()
        return self.reply(rid)

    async def verify_otp(
        self, operator: str, otp: str, idem: str, *, request_id: str | None = None,
        run: bool = True, deliver: bool = True,
    ) -> dict[str, Any] | None:
        rid = request_id or self.next_request_id()
        await self.send(self.command("verifyOtp", operator, {"otp": otp}, idem=idem,
                                     request_id=rid), deliver=deliver)
        if run:
            await self.run_until_quiet()
        return self.reply(rid)

    async def transfer(
        self, payer: str, to_account_id: str, amount_minor: int, *, idem: str | None = None,
    ) -> dict[str, Any]:
        """init → confirm → (OTP) → the final reply."""
        token = await self.transfer_token(payer, to_account_id, amount_minor)
        idem = idem or f"idem-{self.next_request_id()}"
        reply = await self.confirm(payer, token, idem)
        assert reply is not None, "no reply to the confirm"
        if reply["status"] == "pending" and reply.get("code") == "OTP_REQUIRED":
            otp = self.otp_for(reply["data"]["transferId"])
            reply = await self.verify_otp(payer, otp, idem)
            assert reply is not None, "no reply to verifyOtp"
        return reply

    def with_user(self, user: SeedUser) -> None:
        """Replace a seeded user (its directory record; the account keeps its balance)."""
        pepper = self.settings.pin_pepper.get_secret_value().encode()
        self.users[user.user_id] = user
        old = self.store.users[user.user_id].record
        self.store.put_user(replace(
            old, pin_verifier=pin_verifier(pepper, user.user_id, user.pin),
            otp_threshold_minor=user.otp_threshold_minor,
            daily_limit_minor=user.daily_limit_minor, status=user.status,
        ))


def _gateway_key(raw: bytes | None) -> bytes | None:
    try:
        doc = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    key = doc.get("idempotencyKey") or doc.get("requestId")
    return key.encode() if isinstance(key, str) else None
