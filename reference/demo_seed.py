"""Demo users of the user directory (local runs, demos and end-to-end tests).

The account center funds the accounts itself from ``initial_balance_minor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_verifier
from app.domain.ports import FundingSource, UserRecord, UserStatus


@dataclass(frozen=True, slots=True)
class DemoUser:
    user_id: str
    account_id: str
    currency: str
    phone: str
    pin: str
    otp_threshold_minor: int
    daily_limit_minor: int
    initial_balance_minor: int


def _demo(name: str, phone: str) -> DemoUser:
    return DemoUser(
        user_id=name,
        account_id=f"acc-{name}",
        currency="USD",
        phone=phone,
        pin="123456",
        otp_threshold_minor=50_000,  # 500.00: amounts strictly above need an OTP
        daily_limit_minor=1_000_000,  # 10,000.00
        initial_balance_minor=1_000_000,
    )


DEMO_USERS: tuple[DemoUser, ...] = (
    _demo("alice", "+15550000001"),
    _demo("bob", "+15550000002"),
    _demo("carol", "+15550000003"),
    _demo("dave", "+15550000004"),
)


def user_record(user: DemoUser, pin_pepper: bytes) -> UserRecord:
    return UserRecord(
        user_id=user.user_id,
        account_id=user.account_id,
        currency=user.currency,
        phone=user.phone,
        pin_verifier=pin_verifier(pin_pepper, user.user_id, user.pin),
        otp_threshold_minor=user.otp_threshold_minor,
        daily_limit_minor=user.daily_limit_minor,
        status=UserStatus.ACTIVE,
    )


async def seed_directory(
    store: PostgresBusinessStore,
    pin_pepper: bytes,
    users: Iterable[DemoUser] = DEMO_USERS,
) -> None:
    """Upsert the demo users (idempotent; also clears their PIN failure counters), each
    with a linked card ``card-<user>``."""
    for user in users:
        await store.upsert_user(user_record(user, pin_pepper))
        await store.upsert_funding_source(FundingSource(
            f"card-{user.user_id}", user.user_id, "card", f"demo card of {user.user_id}",
            UserStatus.ACTIVE))
