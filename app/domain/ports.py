"""Ports of the business center's core: what the service layer needs from the outside.

The standard library and the domain only. The store's ports (``BusinessStore`` and the
questions it is made of) have their PostgreSQL implementation in app/adapters/ and an
in-memory fake in tests/fakes.py; so do the command side's sagas and saved replies
(``SagaRepository``, ``ReplyCache``: app/adapters/saga_state.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol

from app.domain import transfer_saga as saga_core


class UserStatus(StrEnum):
    ACTIVE = "active"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class UserRecord:
    """The user center's data that the business center needs."""

    user_id: str
    account_id: str
    currency: str
    phone: str
    pin_verifier: str  # hex HMAC-SHA256(pin_pepper, userId ␟ pin), see app/domain/pin.py
    otp_threshold_minor: int  # amounts strictly above need an OTP
    daily_limit_minor: int
    status: UserStatus


@dataclass(frozen=True, slots=True)
class FundingSource:
    """A bank account or card linked to a user, from which top-ups are pulled."""

    funding_source_id: str
    user_id: str
    kind: str  # bank_account | card
    label: str  # what the user sees, e.g. "Visa •••• 4242"
    status: UserStatus


class ConfirmOutcome(StrEnum):
    OK = "ok"
    FORBIDDEN = "forbidden"  # unknown or blocked user, or the token's payer account is not theirs
    INVALID_PIN = "invalid_pin"
    PIN_LOCKED = "pin_locked"
    TOKEN_USED = "token_used"  # the transfer token already funds another transfer  # noqa: S105
    LIMIT_EXCEEDED = "limit_exceeded"
    OTP_LOCKED = "otp_locked"  # the user's wrong-OTP budget is spent (rolling window)
    RATE_LIMITED = "rate_limited"  # the user's OTP sends budget is spent (rolling window)
    KEY_REUSED = "key_reused"  # the idempotency key names another payload
    ANSWERED = "answered"  # the key's operation ended long ago: its kept outcome


@dataclass(frozen=True, slots=True)
class KeptOutcome:
    """The idempotency record of one scoped key: what it was used for and how it ended."""

    transfer_id: str
    fingerprint: str
    attempt: str
    state: str | None = None  # final state once the operation ended
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ConfirmChecks:
    outcome: ConfirmOutcome
    user: UserRecord | None = None
    attempts_left: int = 0
    attempt: str = ""  # the attempt id of the operation under this key (command ids)
    kept: KeptOutcome | None = None  # ANSWERED: the kept outcome


@dataclass(frozen=True, slots=True)
class GuessBudgets:
    """Per-user budgets of PIN and OTP guesses and OTP sends (issue 11, points 2 and 3)."""

    pin_max_attempts: int = 5
    pin_lock_seconds: float = 86_400.0
    otp_max_failures: int = 10
    otp_failure_window_seconds: float = 86_400.0
    otp_max_sends: int = 5
    otp_send_window_seconds: float = 900.0


@dataclass(frozen=True, slots=True)
class ConfirmRequest:
    """Everything the checks of a new transfer or top-up need, read in one transaction."""

    user_id: str
    idempotency_key: str
    fingerprint: str
    transfer_id: str
    attempt: str  # proposed attempt id, kept only when the key is new
    matches: Callable[[str], bool]
    record: str | None  # the Kafka record (topic/partition/offset): a redelivery counts once
    day: date
    now: datetime
    amount_minor: int
    from_account_id: str | None = None  # transfers: the token's payer (must be the user's)
    jti: str | None = None  # transfers: the token, claimed once
    kind: str = "transfer"  # or "topup": which daily limit it counts against
    limit_minor: int | None = None  # top-ups: the daily top-up limit (transfers: the user's)


@dataclass(frozen=True, slots=True)
class InitFacts:
    """What a transferInit needs to know, read together."""

    user: UserRecord | None
    payee_exists: bool
    reserved_today_minor: int
    payee_currency: str | None = None  # the payee account's currency, when it exists



# --------------------------------------------------------------------------------------
# The store's ports: one per question the application asks. ``BusinessStore`` is all of
# them (what ``TransferService`` is given); a handler that needs one question may take one.
# Only the methods the application calls are here: the operator's unlock, seeding and the
# single steps of ``confirm_checks`` are plain methods of the PostgreSQL store
# (app/adapters/postgres_store.py). tests/integration/test_store_contract.py runs one suite over the
# PostgreSQL store and the in-memory fake (tests/fakes.py).
# --------------------------------------------------------------------------------------


class UserDirectory(Protocol):
    """The user center's data: users, their funding sources, and an init's facts."""

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user, whatever their status; None: no such user."""
        ...

    async def get_funding_source(self, funding_source_id: str) -> FundingSource | None: ...

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        """In one read: the payer (``get_user``), whether a user owns ``to_account_id`` and
        its currency, and what the payer's transfers reserved of their ``day`` limit (the
        transfers' limit only, not the top-ups')."""
        ...


class TransferChecks(Protocol):
    """The checks of a confirm (or a top-up) and what they hold: the PIN's budget, the
    transfer token's single use, the daily limits."""

    async def confirm_checks(
        self, request: ConfirmRequest, budgets: GuessBudgets
    ) -> ConfirmChecks:
        """Every check of a new transfer's confirm (or a new top-up), atomically (the
        PostgreSQL store: one transaction on the locked user row; an exception leaves
        nothing behind), in this order:

        1. the user: unknown or blocked is FORBIDDEN (no user); a token whose payer
           account (``from_account_id``) is not the user's is FORBIDDEN (with the user).
        2. the idempotency record of ``(user_id, idempotency_key)``: another
           ``fingerprint`` is KEY_REUSED; an ended operation (``save_outcome``) is
           ANSWERED with its kept outcome. A key without a record whose ``transfer_id``
           another token already funds (a transfer from before the records) is KEY_REUSED.
        3. the PIN, compared by ``matches(verifier)`` only when not locked: locked is
           PIN_LOCKED; wrong is INVALID_PIN with the attempts left. A wrong PIN counts once
           per (user, ``record``): a redelivery of the Kafka record counts once (None
           counts every time). The ``pin_max_attempts``-th failure locks the PIN for
           ``pin_lock_seconds``; once the lock ends the budget is whole again. A right PIN
           resets the count.
        4. only when ``amount_minor`` is strictly above the user's OTP threshold and this
           ``transfer_id`` was not counted yet: the user's wrong OTPs in the failure
           window (``record_otp_failure``) reaching the budget is OTP_LOCKED; the OTPs
           sent in the send window reaching the budget is RATE_LIMITED.
        5. the transfer token ``jti`` (transfers only) funds one ``transfer_id``: claimed
           by another transfer is TOKEN_USED; the same transfer asking again passes.
        6. the daily limit of ``kind`` (the user's limit for transfers, ``limit_minor``
           for top-ups; two separate limits): the day's reservations plus ``amount_minor``
           above it is LIMIT_EXCEEDED, and then the token stays unclaimed. A transfer
           reserves once: asking again passes without reserving again.
        7. OK: the OTP send is counted (when one is needed) and the idempotency record
           is written, keeping the first ``attempt`` of the key, which is returned.

        A non-positive ``amount_minor`` raises ``ValueError``."""
        ...

    async def release_daily_limit(self, transfer_id: str) -> None:
        """Give a failed transfer's (or top-up's) reservation back to its limit, once.
        Idempotent; an unknown transfer is a no-op."""
        ...


class IdempotencyRecords(Protocol):
    """What a scoped idempotency key was used for and how its operation ended."""

    async def kept_outcome(self, operator_id: str, idempotency_key: str) -> KeptOutcome | None:
        """The idempotency record of a scoped key (written by ``confirm_checks``), if the
        key was ever used."""
        ...

    async def save_outcome(self, operator_id: str, idempotency_key: str, state: str,
                           code: str | None) -> None:
        """Keep how the operation under this key ended (idempotent; the last call wins).
        A key without a record is left without one."""
        ...

    async def outcome_of_transfer(self, transfer_id: str) -> KeptOutcome | None:
        """The idempotency record of the transfer or top-up ``transfer_id`` (kept beyond
        the saga's purge), if any."""
        ...


class OtpFailures(Protocol):
    """The user's wrong OTPs, the budget that ``confirm_checks`` and verifyOtp spend."""

    async def otp_failures_since(self, user_id: str, since: datetime) -> int:
        """Wrong OTPs of the user recorded strictly after ``since``."""
        ...

    async def record_otp_failure(self, user_id: str, key: str, at: datetime) -> None:
        """Count one wrong OTP, once per ``key`` (``transferId:attempt``)."""
        ...


class BusinessStore(UserDirectory, TransferChecks, IdempotencyRecords, OtpFailures, Protocol):
    """Shared, strongly consistent state of the business center (PostgreSQL): every
    question the application asks of it."""


# --------------------------------------------------------------------------------------
# The command side's state: sagas and saved replies (PostgreSQL, app/adapters/saga_state.py;
# dicts in unit tests, tests/fakes.py).
# --------------------------------------------------------------------------------------


class SagaRepository(Protocol):
    """Where sagas live, keyed by transfer id. A ``put`` is seen by the next ``get`` at
    once; the PostgreSQL adapter makes it durable when the saga engine flushes the batch
    (agents/saga_engine.py): one transaction for every saga and reply of the batch, before
    any of the batch's outputs is sent and its offsets committed."""

    async def get(self, transfer_id: str) -> saga_core.Saga | None: ...

    def put(self, saga: saga_core.Saga) -> None: ...

    async def due(self, partition: int, now: float, limit: int) -> list[str]:
        """Transfer ids of the sagas of home ``partition`` whose deadline
        (``Saga.deadline()``) is at or before ``now``, earliest first, at most ``limit``."""
        ...

    async def purge(self, partition: int, older_than: float) -> int:
        """Forget the COMPLETED and FAILED sagas of home ``partition`` last updated before
        ``older_than``; how many."""
        ...


class ReplyCache(Protocol):
    """Replies already sent, by ``operatorId ␟ requestId``, each saved with the partition
    of the record it answered (which purges it)."""

    async def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None: ...

    async def purge(self, partition: int, older_than: float) -> int:
        """Forget the replies saved from ``partition`` before ``older_than``; how many."""
        ...


# --------------------------------------------------------------------------------------
# The query side's tables: written through ``KeyValue`` (the projections), read through
# ``AsyncKeyValue`` (the answers). All are PostgreSQL's (written by the saga engine, read
# with app/adapters/query_tables.py); dicts in unit tests.
# --------------------------------------------------------------------------------------


class KeyValue(Protocol):
    """A table as the projections write it: the saga engine's buffered view of a
    PostgreSQL table, a dict wrapper in unit tests."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class AsyncKeyValue(Protocol):
    """A table as the queries read it (``QueryService``)."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of those of ``keys`` that are present (an absent key is left out),
        in one read."""
        ...
