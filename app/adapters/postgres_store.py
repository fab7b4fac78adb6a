"""PostgreSQL implementation of the ``BusinessStore`` port.

Every method is one transaction on an engine whose search_path is the business center's
schema, so table names are unqualified. Concurrency relies on row locks (READ COMMITTED):
the user row for PIN checks, the (user, day) usage row for daily limits, and the primary key
of ``transfer_token_uses`` for token claims.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.adapters.db import ensure_schema, make_engine
from app.domain.ports import (
    ConfirmChecks,
    ConfirmOutcome,
    FundingSource,
    InitFacts,
    PinCheck,
    PinOutcome,
    TokenClaim,
    UserRecord,
    UserStatus,
)


def _user_of(row: Any) -> UserRecord:
    return UserRecord(
        user_id=row.user_id,
        account_id=row.account_id,
        currency=row.currency,
        phone=row.phone,
        pin_verifier=row.pin_verifier,
        otp_threshold_minor=row.otp_threshold_minor,
        daily_limit_minor=row.daily_limit_minor,
        status=UserStatus(row.status),
    )


class DbSettings(Protocol):
    """The part of ``app.settings.Settings`` that the store reads."""

    @property
    def database_url(self) -> str: ...

    @property
    def db_schema(self) -> str: ...

    @property
    def db_pool_size(self) -> int: ...


DDL = """
CREATE TABLE IF NOT EXISTS users (
    user_id text PRIMARY KEY,
    account_id text UNIQUE NOT NULL,
    currency char(3) NOT NULL,
    phone text NOT NULL,
    pin_verifier text NOT NULL,
    otp_threshold_minor bigint NOT NULL CHECK (otp_threshold_minor >= 0),
    daily_limit_minor bigint NOT NULL CHECK (daily_limit_minor >= 0),
    status text NOT NULL CHECK (status IN ('active', 'blocked')),
    pin_failed_attempts int NOT NULL DEFAULT 0,
    pin_last_failed_request text NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS transfer_token_uses (
    jti text PRIMARY KEY,
    transfer_id text NOT NULL,
    used_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS daily_usage (
    user_id text NOT NULL,
    day date NOT NULL,
    reserved_minor bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    PRIMARY KEY (user_id, day)
);
CREATE TABLE IF NOT EXISTS limit_reservations (
    transfer_id text PRIMARY KEY,
    user_id text NOT NULL,
    day date NOT NULL,
    amount_minor bigint NOT NULL CHECK (amount_minor > 0)
);
CREATE TABLE IF NOT EXISTS funding_sources (
    funding_source_id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (user_id),
    kind text NOT NULL CHECK (kind IN ('bank_account', 'card')),
    label text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'blocked'))
)
"""

_USER_COLUMNS = (
    "user_id, account_id, currency, phone, pin_verifier, "
    "otp_threshold_minor, daily_limit_minor, status"
)

# One statement: the payer (or a row of NULLs), the payee's existence, today's reservations.
_INIT_FACTS = text(
    "SELECT EXISTS (SELECT 1 FROM users WHERE account_id = :a) AS payee_exists,"  # noqa: S608 (a constant)
    " COALESCE((SELECT reserved_minor FROM daily_usage"
    " WHERE user_id = :u AND day = :d), 0) AS reserved,"
    " u.* FROM (SELECT 1) AS one LEFT JOIN (SELECT " + _USER_COLUMNS + " FROM users"
    " WHERE user_id = :u) AS u ON true"
)


class PostgresBusinessStore:
    """The business center's shared state in PostgreSQL (implements ``BusinessStore``)."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self._engine = engine
        self._schema = schema

    @classmethod
    def from_settings(cls, settings: DbSettings) -> PostgresBusinessStore:
        engine = make_engine(settings.database_url, settings.db_schema, settings.db_pool_size)
        return cls(engine, settings.db_schema)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def migrate(self) -> None:
        await ensure_schema(self._engine, self._schema, DDL)

    async def close(self) -> None:
        await self._engine.dispose()

    # --- user directory ----------------------------------------------------------------

    async def get_user(self, user_id: str) -> UserRecord | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    text(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = :u"),  # noqa: S608
                    {"u": user_id},
                )
            ).one_or_none()
        return None if row is None else _user_of(row)

    async def get_funding_source(self, funding_source_id: str) -> FundingSource | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT funding_source_id, user_id, kind, label, status FROM funding_sources"
                " WHERE funding_source_id = :f"), {"f": funding_source_id})).one_or_none()
        if row is None:
            return None
        return FundingSource(row.funding_source_id, row.user_id, row.kind, row.label,
                             UserStatus(row.status))

    async def upsert_funding_source(self, source: FundingSource) -> None:
        """Admin/seed: link a bank account or card to a user."""
        async with self._engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO funding_sources (funding_source_id, user_id, kind, label, status)"
                " VALUES (:f, :u, :k, :l, :s) ON CONFLICT (funding_source_id) DO UPDATE SET"
                " user_id = EXCLUDED.user_id, kind = EXCLUDED.kind, label = EXCLUDED.label,"
                " status = EXCLUDED.status"),
                {"f": source.funding_source_id, "u": source.user_id, "k": source.kind,
                 "l": source.label, "s": str(source.status)})

    async def account_exists(self, account_id: str) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT EXISTS (SELECT 1 FROM users WHERE account_id = :a)"),
                {"a": account_id},
            )
        return bool(found)

    async def upsert_user(self, user: UserRecord) -> None:
        """Insert or replace a user (admin/seed); clears the PIN failure counter."""
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (user_id, account_id, currency, phone, pin_verifier,"
                    " otp_threshold_minor, daily_limit_minor, status)"
                    " VALUES (:user_id, :account_id, :currency, :phone, :pin_verifier,"
                    " :otp_threshold_minor, :daily_limit_minor, :status)"
                    " ON CONFLICT (user_id) DO UPDATE SET"
                    " account_id = EXCLUDED.account_id, currency = EXCLUDED.currency,"
                    " phone = EXCLUDED.phone, pin_verifier = EXCLUDED.pin_verifier,"
                    " otp_threshold_minor = EXCLUDED.otp_threshold_minor,"
                    " daily_limit_minor = EXCLUDED.daily_limit_minor,"
                    " status = EXCLUDED.status,"
                    " pin_failed_attempts = 0, pin_last_failed_request = NULL"
                ),
                {
                    "user_id": user.user_id,
                    "account_id": user.account_id,
                    "currency": user.currency,
                    "phone": user.phone,
                    "pin_verifier": user.pin_verifier,
                    "otp_threshold_minor": user.otp_threshold_minor,
                    "daily_limit_minor": user.daily_limit_minor,
                    "status": str(user.status),
                },
            )

    async def unlock_pin(self, user_id: str) -> None:
        """Admin: clear the consecutive-failure counter (unlocks a locked PIN)."""
        async with self._engine.begin() as conn:
            await conn.execute(
                text("UPDATE users SET pin_failed_attempts = 0 WHERE user_id = :u"),
                {"u": user_id},
            )

    # --- PIN ---------------------------------------------------------------------------

    async def check_pin(
        self,
        user_id: str,
        request_id: str,
        matches: Callable[[str], bool],
        max_attempts: int,
    ) -> PinCheck:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT pin_verifier, pin_failed_attempts, pin_last_failed_request"
                        " FROM users WHERE user_id = :u FOR UPDATE"
                    ),
                    {"u": user_id},
                )
            ).one_or_none()
            if row is None:
                return PinCheck(PinOutcome.INVALID, 0)
            return await self._check_pin(conn, row, user_id, request_id, matches,
                                         max_attempts)

    async def _check_pin(
        self, conn: AsyncConnection, row: Any, user_id: str, request_id: str,
        matches: Callable[[str], bool], max_attempts: int,
    ) -> PinCheck:
        """On the user's locked ``row``: the PIN decision and its counter update."""
        failed: int = row.pin_failed_attempts
        if failed >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)
        if matches(row.pin_verifier):
            if failed:
                await conn.execute(
                    text("UPDATE users SET pin_failed_attempts = 0 WHERE user_id = :u"),
                    {"u": user_id},
                )
            return PinCheck(PinOutcome.OK, max_attempts)
        if row.pin_last_failed_request != request_id:
            failed += 1
            await conn.execute(
                text(
                    "UPDATE users SET pin_failed_attempts = :f,"
                    " pin_last_failed_request = :r WHERE user_id = :u"
                ),
                {"f": failed, "r": request_id, "u": user_id},
            )
        if failed >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)
        return PinCheck(PinOutcome.INVALID, max_attempts - failed)

    # --- transfer tokens ---------------------------------------------------------------

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        async with self._engine.begin() as conn:
            return await self._claim(conn, jti, transfer_id)

    async def _claim(self, conn: AsyncConnection, jti: str, transfer_id: str) -> TokenClaim:
        # DO UPDATE (not DO NOTHING) so that RETURNING yields the row in every case: a
        # concurrent inserter is waited for and its committed transfer_id is returned.
        owner = await conn.scalar(
            text(
                "INSERT INTO transfer_token_uses (jti, transfer_id) VALUES (:j, :t)"
                " ON CONFLICT (jti) DO UPDATE SET jti = EXCLUDED.jti"
                " RETURNING transfer_id"
            ),
            {"j": jti, "t": transfer_id},
        )
        return TokenClaim.CLAIMED if owner == transfer_id else TokenClaim.USED_ELSEWHERE

    # --- daily limits ------------------------------------------------------------------

    async def reserve_daily_limit(
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int
    ) -> bool:
        async with self._engine.begin() as conn:
            return await self._reserve(conn, user_id, transfer_id, day, amount_minor,
                                       limit_minor)

    async def _reserve(
        self, conn: AsyncConnection, user_id: str, transfer_id: str, day: date,
        amount_minor: int, limit_minor: int,
    ) -> bool:
        if amount_minor <= 0:
            raise ValueError(f"amount_minor must be positive, got {amount_minor}")
        key = {"u": user_id, "d": day}
        await conn.execute(
            text(
                "INSERT INTO daily_usage (user_id, day) VALUES (:u, :d)"
                " ON CONFLICT (user_id, day) DO NOTHING"
            ),
            key,
        )
        # The usage row lock serialises this user's reservations for the day; the
        # statements below see everything committed before the lock was granted.
        reserved: int = await conn.scalar(
            text(
                "SELECT reserved_minor FROM daily_usage"
                " WHERE user_id = :u AND day = :d FOR UPDATE"
            ),
            key,
        )
        already = await conn.scalar(
            text("SELECT 1 FROM limit_reservations WHERE transfer_id = :t"),
            {"t": transfer_id},
        )
        if already is not None:
            return True
        if reserved + amount_minor > limit_minor:
            return False
        await conn.execute(
            text(
                "INSERT INTO limit_reservations (transfer_id, user_id, day, amount_minor)"
                " VALUES (:t, :u, :d, :a)"
            ),
            {**key, "t": transfer_id, "a": amount_minor},
        )
        await conn.execute(
            text(
                "UPDATE daily_usage SET reserved_minor = reserved_minor + :a"
                " WHERE user_id = :u AND day = :d"
            ),
            {**key, "a": amount_minor},
        )
        return True

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        async with self._engine.connect() as conn:
            row = (await conn.execute(_INIT_FACTS, {"u": user_id, "a": to_account_id,
                                                    "d": day})).one()
        user = None if row.user_id is None else _user_of(row)
        return InitFacts(user, bool(row.payee_exists), int(row.reserved))

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
        # One checkout, one transaction. Lock order: the user row, then the token row, then
        # the day's usage row (the single methods take them in the same order).
        async with self._engine.begin() as conn:
            row = (await conn.execute(
                text(f"SELECT {_USER_COLUMNS}, pin_failed_attempts, pin_last_failed_request"  # noqa: S608
                     " FROM users WHERE user_id = :u FOR UPDATE"),
                {"u": user_id},
            )).one_or_none()
            if row is None or row.status != UserStatus.ACTIVE.value:
                return ConfirmChecks(ConfirmOutcome.FORBIDDEN)
            user = _user_of(row)
            if user.account_id != from_account_id:
                return ConfirmChecks(ConfirmOutcome.FORBIDDEN, user)
            pin = await self._check_pin(conn, row, user_id, request_id, matches, max_attempts)
            if pin.outcome is PinOutcome.LOCKED:
                return ConfirmChecks(ConfirmOutcome.PIN_LOCKED, user)
            if pin.outcome is PinOutcome.INVALID:
                return ConfirmChecks(ConfirmOutcome.INVALID_PIN, user, pin.attempts_left)
            if await self._claim(conn, jti, transfer_id) is not TokenClaim.CLAIMED:
                return ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
            if not await self._reserve(conn, user_id, transfer_id, day, amount_minor,
                                       user.daily_limit_minor):
                return ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)
            return ConfirmChecks(ConfirmOutcome.OK, user)

    async def release_daily_limit(self, transfer_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "WITH r AS (DELETE FROM limit_reservations WHERE transfer_id = :t"
                    " RETURNING user_id, day, amount_minor)"
                    " UPDATE daily_usage AS u"
                    " SET reserved_minor = u.reserved_minor - r.amount_minor"
                    " FROM r WHERE u.user_id = r.user_id AND u.day = r.day"
                ),
                {"t": transfer_id},
            )

    async def reserved_today(self, user_id: str, day: date) -> int:
        async with self._engine.connect() as conn:
            reserved = await conn.scalar(
                text("SELECT reserved_minor FROM daily_usage WHERE user_id = :u AND day = :d"),
                {"u": user_id, "d": day},
            )
        return int(reserved or 0)
