"""PostgreSQL implementation of the ``BusinessStore`` port (app/domain/ports.py).

Why one module: it answers one question, what the business center keeps in PostgreSQL and
how each change is made atomic: the schema (DDL) and the one class that uses it, whose
transaction-sharing steps (``_check_pin``, ``_claim``, ``_reserve``, ``_otp_budget``)
``confirm_checks`` composes on one connection and one transaction; split, the connection
would travel across modules and the lock order (user row, then usage row) could no longer be
checked in one place.

Besides the port, plain methods that the application does not call: seeding
(``upsert_user``, ``upsert_funding_source``: reference/demo_seed.py, tests), the operator's
``unlock_user`` (``bizcenter users unlock``, cli/main.py), and the single steps that
``confirm_checks`` runs in its transaction (``check_pin``, ``claim_transfer_token``,
``reserve_daily_limit``), with ``account_exists`` and ``reserved_today``, which the tests of
this store and ``bench/traced_worker.py`` call by name.

Every method is one transaction on an engine whose search_path is the business center's
schema, so table names are unqualified. Concurrency relies on row locks (READ COMMITTED):
the user row for PIN checks, the (user, day) usage row for daily limits, and the primary key
of ``transfer_token_uses`` for token claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.adapters.db import ensure_schema, make_engine
from app.domain.ports import (
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


class PinOutcome(StrEnum):
    OK = "ok"
    INVALID = "invalid"
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class PinCheck:
    """The PIN step of ``confirm_checks`` (``check_pin``)."""

    outcome: PinOutcome
    attempts_left: int


class TokenClaim(StrEnum):
    """The token step of ``confirm_checks`` (``claim_transfer_token``)."""

    CLAIMED = "claimed"  # first use, or the same transfer asking again
    USED_ELSEWHERE = "used_elsewhere"  # already funds another transfer


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
);
CREATE INDEX IF NOT EXISTS transfer_token_uses_transfer_idx
    ON transfer_token_uses (transfer_id);
ALTER TABLE users ADD COLUMN IF NOT EXISTS pin_locked_until timestamptz NULL;
CREATE TABLE IF NOT EXISTS pin_failures (
    user_id text NOT NULL,
    record text NOT NULL,
    failed_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, record)
);
CREATE TABLE IF NOT EXISTS otp_failures (
    key text PRIMARY KEY,
    user_id text NOT NULL,
    failed_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS otp_failures_user_idx ON otp_failures (user_id, failed_at);
CREATE TABLE IF NOT EXISTS otp_sends (
    transfer_id text PRIMARY KEY,
    user_id text NOT NULL,
    sent_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS otp_sends_user_idx ON otp_sends (user_id, sent_at);
CREATE TABLE IF NOT EXISTS topup_usage (
    user_id text NOT NULL,
    day date NOT NULL,
    reserved_minor bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    PRIMARY KEY (user_id, day)
);
ALTER TABLE limit_reservations ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'transfer';
CREATE TABLE IF NOT EXISTS idempotency_records (
    operator_id text NOT NULL,
    idempotency_key text NOT NULL,
    fingerprint text NOT NULL,
    transfer_id text NOT NULL,
    attempt text NOT NULL,
    state text NULL,
    code text NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz NULL,
    PRIMARY KEY (operator_id, idempotency_key)
)
"""

#: The key's idempotency record (a row of NULLs when none), and whether a transfer from
#: before the records used this transferId with another token (its key stays used).
_KEY_FACTS = text(
    "SELECT r.transfer_id, r.fingerprint, r.attempt, r.state, r.code,"
    " EXISTS (SELECT 1 FROM transfer_token_uses WHERE transfer_id = :t AND jti <> :j)"
    " AS used_before_records"
    " FROM (SELECT 1) AS one LEFT JOIN idempotency_records AS r"
    " ON r.operator_id = :o AND r.idempotency_key = :k"
)

#: The usage table of each kind of daily limit (constants: never built from input).
_USAGE_TABLES = {"transfer": "daily_usage", "topup": "topup_usage"}

_USER_COLUMNS = (
    "user_id, account_id, currency, phone, pin_verifier, "
    "otp_threshold_minor, daily_limit_minor, status"
)

# One statement: the payer (or a row of NULLs), the payee's existence, today's reservations.
_INIT_FACTS = text(
    "SELECT (SELECT currency FROM users WHERE account_id = :a) AS payee_currency,"  # noqa: S608 (a constant)
    " COALESCE((SELECT reserved_minor FROM daily_usage"
    " WHERE user_id = :u AND day = :d), 0) AS reserved,"
    " u.* FROM (SELECT 1) AS one LEFT JOIN (SELECT " + _USER_COLUMNS + " FROM users"
    " WHERE user_id = :u) AS u ON true"
)


class PostgresBusinessStore:
    """The business center's shared state in PostgreSQL: implements ``BusinessStore``,
    plus the plain methods of the module's docstring."""

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
        """True when some user of the directory owns this account (see ``init_facts``)."""
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
                    " pin_failed_attempts = 0, pin_last_failed_request = NULL,"
                    " pin_locked_until = NULL"
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

    async def unlock_user(self, user_id: str) -> bool:
        """Operator (``bizcenter users unlock``): end the PIN lock, reset the PIN failure
        counter and forget the user's wrong OTPs (the OTP lock). False: no such user."""
        async with self._engine.begin() as conn:
            found = await conn.scalar(text(
                "UPDATE users SET pin_failed_attempts = 0, pin_locked_until = NULL"
                " WHERE user_id = :u RETURNING user_id"), {"u": user_id})
            await conn.execute(text("DELETE FROM otp_failures WHERE user_id = :u"),
                               {"u": user_id})
        return found is not None

    # --- OTP budgets -------------------------------------------------------------------

    async def otp_failures_since(self, user_id: str, since: datetime) -> int:
        async with self._engine.connect() as conn:
            count = await conn.scalar(text(
                "SELECT count(*) FROM otp_failures WHERE user_id = :u AND failed_at > :s"),
                {"u": user_id, "s": since})
        return int(count or 0)

    async def record_otp_failure(self, user_id: str, key: str, at: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO otp_failures (key, user_id, failed_at) VALUES (:k, :u, :a)"
                " ON CONFLICT (key) DO NOTHING"), {"k": key, "u": user_id, "a": at})

    # --- idempotency records -----------------------------------------------------------

    async def kept_outcome(self, operator_id: str, idempotency_key: str) -> KeptOutcome | None:
        async with self._engine.connect() as conn:
            return await self._kept(conn, operator_id, idempotency_key)

    @staticmethod
    async def _kept(conn: AsyncConnection, operator_id: str, idempotency_key: str
                    ) -> KeptOutcome | None:
        # Written only under the user's row lock (confirm_checks), so a reader holding that
        # lock sees every record of the user's keys.
        row = (await conn.execute(text(
            "SELECT transfer_id, fingerprint, attempt, state, code FROM idempotency_records"
            " WHERE operator_id = :o AND idempotency_key = :k"),
            {"o": operator_id, "k": idempotency_key})).one_or_none()
        if row is None:
            return None
        return KeptOutcome(row.transfer_id, row.fingerprint, row.attempt, row.state, row.code)

    async def save_outcome(self, operator_id: str, idempotency_key: str, state: str,
                           code: str | None) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(text(
                "UPDATE idempotency_records SET state = :s, code = :c, ended_at = now()"
                " WHERE operator_id = :o AND idempotency_key = :k"
                " AND (state IS DISTINCT FROM :s OR code IS DISTINCT FROM :c)"),
                {"o": operator_id, "k": idempotency_key, "s": state, "c": code})

    # --- PIN ---------------------------------------------------------------------------

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
        """The PIN step of ``confirm_checks`` on its own, atomically (row lock): LOCKED
        while locked; else ``matches(verifier)``; a failure increments the user's failure
        counter once per ``record`` (the Kafka record's coordinates, which a redelivery
        keeps; None counts every time), a success resets it. Reaching ``max_attempts``
        failures locks the PIN for ``lock_seconds``. An unknown user is INVALID."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT pin_verifier, pin_failed_attempts, pin_locked_until"
                        " FROM users WHERE user_id = :u FOR UPDATE"
                    ),
                    {"u": user_id},
                )
            ).one_or_none()
            if row is None:
                return PinCheck(PinOutcome.INVALID, 0)
            return await self._check_pin(conn, row, user_id, record, matches, max_attempts,
                                         now or datetime.now(UTC), lock_seconds)

    async def _check_pin(
        self, conn: AsyncConnection, row: Any, user_id: str, record: str | None,
        matches: Callable[[str], bool], max_attempts: int, now: datetime,
        lock_seconds: float,
    ) -> PinCheck:
        """On the user's locked ``row``: the PIN decision and its counter update. A wrong
        PIN counts once per Kafka record (``pin_failures``, in this transaction): a
        redelivery of the same record counts once, whatever its requestId, key or
        partition; every other record counts."""
        failed: int = row.pin_failed_attempts
        locked_until: datetime | None = row.pin_locked_until
        if locked_until is not None and locked_until > now:
            return PinCheck(PinOutcome.LOCKED, 0)
        if locked_until is None and failed >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)  # locked before locks expired: operators
        if locked_until is not None:  # the lock has ended: a fresh budget
            failed = 0
            await conn.execute(text(
                "UPDATE users SET pin_failed_attempts = 0, pin_locked_until = NULL"
                " WHERE user_id = :u"), {"u": user_id})
        if matches(row.pin_verifier):
            if failed:
                await conn.execute(
                    text("UPDATE users SET pin_failed_attempts = 0 WHERE user_id = :u"),
                    {"u": user_id},
                )
            return PinCheck(PinOutcome.OK, max_attempts)
        counted = True
        if record is not None:
            counted = await conn.scalar(text(
                "INSERT INTO pin_failures (record, user_id, failed_at) VALUES (:r, :u, :a)"
                " ON CONFLICT (user_id, record) DO NOTHING RETURNING true"),
                {"r": record, "u": user_id, "a": now}) is not None
        if counted:
            failed += 1
            lock = now + timedelta(seconds=lock_seconds) if failed >= max_attempts else None
            await conn.execute(
                text("UPDATE users SET pin_failed_attempts = :f, pin_locked_until = :l"
                     " WHERE user_id = :u"),
                {"f": failed, "l": lock, "u": user_id},
            )
        if failed >= max_attempts:
            return PinCheck(PinOutcome.LOCKED, 0)
        return PinCheck(PinOutcome.INVALID, max_attempts - failed)

    # --- transfer tokens ---------------------------------------------------------------

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        """The token step of ``confirm_checks`` on its own: record that token ``jti`` funds
        ``transfer_id`` (idempotent for the same pair)."""
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
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int,
        kind: str = "transfer",
    ) -> bool:
        """The limit step of ``confirm_checks`` on its own: reserve ``amount_minor`` of the
        user's ``day`` limit of ``kind`` for ``transfer_id``. Atomic under concurrency (two
        reservations of one user never both slip under the limit) and idempotent (the same
        transfer reserving again returns True, once)."""
        async with self._engine.begin() as conn:
            return await self._reserve(conn, user_id, transfer_id, day, amount_minor,
                                       limit_minor, kind)

    async def _reserve(
        self, conn: AsyncConnection, user_id: str, transfer_id: str, day: date,
        amount_minor: int, limit_minor: int, kind: str = "transfer",
    ) -> bool:
        if amount_minor <= 0:
            raise ValueError(f"amount_minor must be positive, got {amount_minor}")
        usage = _USAGE_TABLES[kind]
        key = {"u": user_id, "d": day}
        await conn.execute(
            text(
                f"INSERT INTO {usage} (user_id, day) VALUES (:u, :d)"  # noqa: S608 (a constant)
                " ON CONFLICT (user_id, day) DO NOTHING"
            ),
            key,
        )
        # The usage row lock serialises this user's reservations for the day; the
        # statements below see everything committed before the lock was granted.
        reserved: int = await conn.scalar(
            text(
                f"SELECT reserved_minor FROM {usage}"  # noqa: S608 (a constant)
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
                "INSERT INTO limit_reservations (transfer_id, user_id, day, amount_minor, kind)"
                " VALUES (:t, :u, :d, :a, :k)"
            ),
            {**key, "t": transfer_id, "a": amount_minor, "k": kind},
        )
        await conn.execute(
            text(
                f"UPDATE {usage} SET reserved_minor = reserved_minor + :a"  # noqa: S608
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
        return InitFacts(user, row.payee_currency is not None, int(row.reserved),
                         row.payee_currency)

    async def confirm_checks(
        self, request: ConfirmRequest, budgets: GuessBudgets
    ) -> ConfirmChecks:
        r = request
        # One checkout, one transaction. Lock order: the user row, then the idempotency
        # record, the token row, the day's usage row (the single methods keep this order).
        async with self._engine.begin() as conn:
            row = (await conn.execute(
                text(f"SELECT {_USER_COLUMNS}, pin_failed_attempts, pin_locked_until"  # noqa: S608
                     " FROM users WHERE user_id = :u FOR UPDATE"),
                {"u": r.user_id},
            )).one_or_none()
            if row is None or row.status != UserStatus.ACTIVE.value:
                return ConfirmChecks(ConfirmOutcome.FORBIDDEN)
            user = _user_of(row)
            if r.from_account_id is not None and user.account_id != r.from_account_id:
                return ConfirmChecks(ConfirmOutcome.FORBIDDEN, user)
            # The key's record, and whether a transfer from before the records used it
            # (a token use under this transferId with another token): one round trip.
            key_row = (await conn.execute(_KEY_FACTS, {
                "o": r.user_id, "k": r.idempotency_key, "t": r.transfer_id,
                "j": r.jti or ""})).one()
            kept = None if key_row.fingerprint is None else KeptOutcome(
                key_row.transfer_id, key_row.fingerprint, key_row.attempt, key_row.state,
                key_row.code)
            if kept is not None and kept.fingerprint != r.fingerprint:
                return ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
            if kept is not None and kept.state is not None:
                return ConfirmChecks(ConfirmOutcome.ANSWERED, user, kept=kept)
            if kept is None and r.jti is not None and key_row.used_before_records:
                return ConfirmChecks(ConfirmOutcome.KEY_REUSED, user)
            pin = await self._check_pin(conn, row, r.user_id, r.record, r.matches,
                                        budgets.pin_max_attempts, r.now,
                                        budgets.pin_lock_seconds)
            if pin.outcome is PinOutcome.LOCKED:
                return ConfirmChecks(ConfirmOutcome.PIN_LOCKED, user)
            if pin.outcome is PinOutcome.INVALID:
                return ConfirmChecks(ConfirmOutcome.INVALID_PIN, user, pin.attempts_left)
            needs_otp = r.amount_minor > user.otp_threshold_minor
            if needs_otp:
                refusal = await self._otp_budget(conn, r, budgets)
                if refusal is not None:
                    return ConfirmChecks(refusal, user)
            # The claim and the reservation stand or fall together (a savepoint): a confirm
            # refused by the limit leaves its token and key free for another try.
            claim_and_reserve = await conn.begin_nested()
            if r.jti is not None and await self._claim(conn, r.jti, r.transfer_id) \
                    is not TokenClaim.CLAIMED:
                await claim_and_reserve.rollback()
                return ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
            limit = user.daily_limit_minor if r.limit_minor is None else r.limit_minor
            if not await self._reserve(conn, r.user_id, r.transfer_id, r.day, r.amount_minor,
                                       limit, r.kind):
                await claim_and_reserve.rollback()
                return ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)
            await claim_and_reserve.commit()
            if needs_otp:
                await conn.execute(text(
                    "INSERT INTO otp_sends (transfer_id, user_id, sent_at) VALUES (:t, :u, :a)"
                    " ON CONFLICT (transfer_id) DO NOTHING"),
                    {"t": r.transfer_id, "u": r.user_id, "a": r.now})
            attempt = await conn.scalar(text(
                "INSERT INTO idempotency_records (operator_id, idempotency_key, fingerprint,"
                " transfer_id, attempt) VALUES (:o, :k, :f, :t, :a)"
                " ON CONFLICT (operator_id, idempotency_key)"
                " DO UPDATE SET attempt = idempotency_records.attempt RETURNING attempt"),
                {"o": r.user_id, "k": r.idempotency_key, "f": r.fingerprint,
                 "t": r.transfer_id, "a": r.attempt})
            return ConfirmChecks(ConfirmOutcome.OK, user, attempt=str(attempt))

    @staticmethod
    async def _otp_budget(conn: AsyncConnection, r: ConfirmRequest,
                          budgets: GuessBudgets) -> ConfirmOutcome | None:
        """OTP_LOCKED when the user's wrong OTPs in the window reached the budget,
        RATE_LIMITED when the OTP sends did; None when a new OTP may be sent (or this
        transfer's was already counted: a re-decision of the same transfer)."""
        row = (await conn.execute(text(
            "SELECT EXISTS (SELECT 1 FROM otp_sends WHERE transfer_id = :t) AS counted,"
            " (SELECT count(*) FROM otp_failures WHERE user_id = :u"
            " AND failed_at > :f) AS failures,"
            " (SELECT count(*) FROM otp_sends WHERE user_id = :u AND sent_at > :s) AS sends"),
            {"u": r.user_id, "t": r.transfer_id,
             "f": r.now - timedelta(seconds=budgets.otp_failure_window_seconds),
             "s": r.now - timedelta(seconds=budgets.otp_send_window_seconds)})).one()
        if row.counted:
            return None
        if row.failures >= budgets.otp_max_failures:
            return ConfirmOutcome.OTP_LOCKED
        if row.sends >= budgets.otp_max_sends:
            return ConfirmOutcome.RATE_LIMITED
        return None

    async def release_daily_limit(self, transfer_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "WITH r AS (DELETE FROM limit_reservations WHERE transfer_id = :t"
                    " RETURNING user_id, day, amount_minor, kind),"
                    " t AS (UPDATE topup_usage AS u"
                    " SET reserved_minor = u.reserved_minor - r.amount_minor"
                    " FROM r WHERE r.kind = 'topup' AND u.user_id = r.user_id"
                    " AND u.day = r.day)"
                    " UPDATE daily_usage AS u"
                    " SET reserved_minor = u.reserved_minor - r.amount_minor"
                    " FROM r WHERE r.kind = 'transfer' AND u.user_id = r.user_id"
                    " AND u.day = r.day"
                ),
                {"t": transfer_id},
            )

    async def reserved_today(self, user_id: str, day: date) -> int:
        """What the user's transfers reserved of their ``day`` limit (see ``init_facts``)."""
        async with self._engine.connect() as conn:
            reserved = await conn.scalar(
                text("SELECT reserved_minor FROM daily_usage WHERE user_id = :u AND day = :d"),
                {"u": user_id, "d": day},
            )
        return int(reserved or 0)
