"""Ports of the business center's core: what the service layer needs from the outside.

Standard library only. The PostgreSQL implementation lives in app/adapters/; unit tests use
an in-memory fake (tests/fakes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol


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


class PinOutcome(StrEnum):
    OK = "ok"
    INVALID = "invalid"
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class PinCheck:
    outcome: PinOutcome
    attempts_left: int


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


class TokenClaim(StrEnum):
    CLAIMED = "claimed"  # first use, or the same transfer asking again
    USED_ELSEWHERE = "used_elsewhere"  # already funds another transfer


class BusinessStore(Protocol):
    """Shared, strongly consistent state of the business center (PostgreSQL)."""

    async def get_user(self, user_id: str) -> UserRecord | None: ...

    async def account_exists(self, account_id: str) -> bool:
        """True when some user of the directory owns this account."""
        ...

    async def get_funding_source(self, funding_source_id: str) -> FundingSource | None: ...

    async def check_pin(
        self,
        user_id: str,
        record: str | None,
        matches: Callable[[str], bool],
        max_attempts: int,
        *,
        now: datetime | None = None,
        lock_seconds: float = 86_400.0,
    ) -> PinCheck:
        """Atomically (row lock): LOCKED while locked; else ``matches(verifier)``; a failure
        increments the user's failure counter once per ``record`` (the Kafka record's
        coordinates, which a redelivery keeps; None counts every time), a success resets
        it. Reaching ``max_attempts`` failures locks the PIN for ``lock_seconds``."""
        ...

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        """Record that token ``jti`` funds ``transfer_id`` (idempotent for the same pair)."""
        ...

    async def reserve_daily_limit(
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int,
        kind: str = "transfer",
    ) -> bool:
        """Reserve ``amount_minor`` of the user's ``day`` limit of ``kind`` (transfers or
        top-ups, two separate limits) for ``transfer_id``.

        Atomic under concurrency (two reservations of one user never both slip under the
        limit) and idempotent (the same transfer reserving again returns True, once)."""
        ...

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        """``get_user``, ``account_exists`` and ``reserved_today`` in one read."""
        ...

    async def confirm_checks(
        self, request: ConfirmRequest, budgets: GuessBudgets
    ) -> ConfirmChecks:
        """Every check of a new transfer's confirm (or a new top-up), in this order: the
        user (active, owner of ``from_account_id``); the idempotency record of the key
        (another payload: KEY_REUSED; an ended operation: ANSWERED with its kept outcome);
        the PIN (``check_pin``); when the amount is above the user's OTP threshold, the
        user's OTP budgets (wrong OTPs: OTP_LOCKED, sends: RATE_LIMITED); the token's
        single use (``claim_transfer_token``); the daily limit of its kind
        (``reserve_daily_limit``); then the OTP send and the idempotency record are
        written. The PostgreSQL store runs them in one transaction on the locked user row;
        each part stays idempotent on its own key."""
        ...

    async def kept_outcome(self, operator_id: str, idempotency_key: str) -> KeptOutcome | None:
        """The idempotency record of a scoped key, if the key was ever used."""
        ...

    async def save_outcome(self, operator_id: str, idempotency_key: str, state: str,
                           code: str | None) -> None:
        """Keep how the operation under this key ended (idempotent)."""
        ...

    async def otp_failures_since(self, user_id: str, since: datetime) -> int:
        """Wrong OTPs of the user recorded after ``since``."""
        ...

    async def record_otp_failure(self, user_id: str, key: str, at: datetime) -> None:
        """Count one wrong OTP, once per ``key`` (``transferId:attempt``)."""
        ...

    async def unlock_user(self, user_id: str) -> bool:
        """Operator: end the PIN lock and forget the wrong OTPs. False: no such user."""
        ...

    async def release_daily_limit(self, transfer_id: str) -> None:
        """Give a failed transfer's reservation back. Idempotent."""
        ...

    async def reserved_today(self, user_id: str, day: date) -> int: ...
