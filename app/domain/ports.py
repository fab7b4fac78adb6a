"""Ports of the business center's core: what the service layer needs from the outside.

Standard library only. The PostgreSQL implementation lives in app/adapters/; unit tests use
an in-memory fake (tests/fakes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
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


@dataclass(frozen=True, slots=True)
class ConfirmChecks:
    outcome: ConfirmOutcome
    user: UserRecord | None = None
    attempts_left: int = 0


@dataclass(frozen=True, slots=True)
class InitFacts:
    """What a transferInit needs to know, read together."""

    user: UserRecord | None
    payee_exists: bool
    reserved_today_minor: int


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
        request_id: str,
        matches: Callable[[str], bool],
        max_attempts: int,
    ) -> PinCheck:
        """Atomically (row lock): LOCKED when already locked; else ``matches(verifier)``;
        a failure increments the consecutive-failure counter once per request_id, a success
        resets it. Reaching ``max_attempts`` failures locks the PIN."""
        ...

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        """Record that token ``jti`` funds ``transfer_id`` (idempotent for the same pair)."""
        ...

    async def reserve_daily_limit(
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int
    ) -> bool:
        """Reserve ``amount_minor`` of the user's ``day`` limit for ``transfer_id``.

        Atomic under concurrency (two reservations of one user never both slip under the
        limit) and idempotent (the same transfer reserving again returns True, once)."""
        ...

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        """``get_user``, ``account_exists`` and ``reserved_today`` in one read."""
        ...

    async def confirm_checks(
        self,
        *,
        user_id: str,
        from_account_id: str,
        request_id: str,
        matches: Callable[[str], bool],
        max_attempts: int,
        jti: str,
        transfer_id: str,
        day: date,
        amount_minor: int,
    ) -> ConfirmChecks:
        """Every check of a new transfer's confirm, in this order and with the semantics of
        the single methods above: the user (active, owner of ``from_account_id``), the PIN
        (``check_pin``), the token's single use (``claim_transfer_token``), the daily limit
        (``reserve_daily_limit``). The PostgreSQL store runs them in one transaction on the
        locked user row; each part stays idempotent on its own key."""
        ...

    async def release_daily_limit(self, transfer_id: str) -> None:
        """Give a failed transfer's reservation back. Idempotent."""
        ...

    async def reserved_today(self, user_id: str, day: date) -> int: ...
