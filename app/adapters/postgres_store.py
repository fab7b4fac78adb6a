"""PostgreSQL implementation of the ``BusinessStore`` port (app/domain/ports.py).

Why one module: it answers one question, what the business center keeps in PostgreSQL and
how each change is made atomic: the schema (DDL) and the one class that uses it, whose
``confirm_checks`` runs every check on one connection and one transaction; split, the
connection would travel across modules and the lock order (user row, token row,
reservation, usage row) could no longer be checked in one place.

Besides the port, plain methods that the application does not call: seeding
(``upsert_user``, ``upsert_funding_source``: reference/demo_seed.py, tests), the operator's
``unlock_user`` (``bizcenter users unlock``, cli/main.py), and the single steps that
``confirm_checks`` runs in its transaction (``check_pin``, ``claim_transfer_token``,
``reserve_daily_limit``), with ``account_exists`` and ``reserved_today``, which the tests of
this store and ``bench/traced_worker.py`` call by name.

The port's methods run on the asyncpg connection under SQLAlchemy's pool (the reference
ledger's pattern), with asyncpg's prepared statements (cached per connection) and as few
round trips as the semantics allow (each costs ~0.1 ms of client CPU): a read or a single
write is one statement that commits on its own; ``confirm_checks`` is BEGIN, the user's
lock, the facts read under it, one statement for all the writes, COMMIT. The confirms, the
inits' reads and the saved outcomes that wait together are one batch
(app/adapters/coalesce.py): the confirms of a batch's users share those five round trips,
each step one pipelined statement (``python -m bench.store_calls [--batch N]`` measures
each call). Seeding and the operator's methods
stay on SQLAlchemy. Every method is one transaction on connections whose search_path is
the business center's schema, so table names are unqualified. Concurrency relies on row
locks (READ COMMITTED): the user row for PIN checks and the key's record, the primary keys
of ``transfer_token_uses`` and ``limit_reservations`` for token claims and reservations,
the (user, day) usage row for daily limits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.adapters.coalesce import Coalescer
from app.adapters.db import bare_connection, ensure_schema, make_engine
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


@dataclass(frozen=True, slots=True)
class _PinStep:
    """The PIN decision on a locked user row, before its write (:func:`_pin_step`)."""

    outcome: PinCheck  # when ``wrong`` is None (a reset, if any, does not change it)
    reset: bool = False  # a right PIN after failures, or a lock that ended: _PIN_RESET
    #: A wrong PIN to count: ``_PIN_FAILURE``'s $4..$6 (the count if counted, the lock,
    #: whether a lock has ended).
    wrong: tuple[int, datetime | None, bool] | None = None
    failed: int = 0  # the failures standing when the wrong PIN is not counted


def _pin_step(row: Any, matches: Callable[[str], bool], max_attempts: int, now: datetime,
              lock_seconds: float) -> _PinStep:
    """LOCKED while locked; else ``matches(verifier)``: a success resets the failure
    counter, a failure increments it once per Kafka record (``pin_failures``: a
    redelivery of the same record counts once, whatever its requestId, key or partition;
    every other record counts). Reaching ``max_attempts`` failures locks the PIN for
    ``lock_seconds``; once a lock has ended the budget is whole again."""
    failed: int = row["pin_failed_attempts"]
    locked_until: datetime | None = row["pin_locked_until"]
    if locked_until is not None and locked_until > now:
        return _PinStep(PinCheck(PinOutcome.LOCKED, 0))
    if locked_until is None and failed >= max_attempts:
        return _PinStep(PinCheck(PinOutcome.LOCKED, 0))  # locked before locks expired
    lock_ended = locked_until is not None
    if lock_ended:  # the lock has ended: a fresh budget
        failed = 0
    if matches(row["pin_verifier"]):
        return _PinStep(PinCheck(PinOutcome.OK, max_attempts), reset=bool(failed) or lock_ended)
    counted_failed = failed + 1
    lock = (now + timedelta(seconds=lock_seconds) if counted_failed >= max_attempts
            else None)
    return _PinStep(PinCheck(PinOutcome.INVALID, 0), wrong=(counted_failed, lock, lock_ended),
                    failed=failed)


def _pin_counted(step: _PinStep, counted: bool, max_attempts: int) -> PinCheck:
    """A wrong PIN's outcome once ``_PIN_FAILURE`` said whether it was counted."""
    failed = step.wrong[0] if counted and step.wrong is not None else step.failed
    if failed >= max_attempts:
        return PinCheck(PinOutcome.LOCKED, 0)
    return PinCheck(PinOutcome.INVALID, max_attempts - failed)


async def _each(raw: Any, statement: str, args: Sequence[Sequence[Any]]) -> list[Any]:
    """``statement``, which yields exactly one row per execution, for each of ``args``:
    asyncpg's ``fetchmany`` (one round trip). Its rows, in the order of ``args``."""
    if not args:
        return []
    rows: list[Any] = await raw.fetchmany(statement, args)
    if len(rows) != len(args):
        raise RuntimeError(f"{len(args)} executions gave {len(rows)} rows")
    return rows


class TokenClaim(StrEnum):
    """The token step of ``confirm_checks`` (``claim_transfer_token``)."""

    CLAIMED = "claimed"  # first use, or the same transfer asking again
    USED_ELSEWHERE = "used_elsewhere"  # already funds another transfer


class DbSettings(Protocol):
    """The part of ``app.settings.Settings`` that the store reads."""

    @property
    def database_url(self) -> str: ...

    @property
    def db_schema(self) -> str: ...

    @property
    def db_pool_size(self) -> int: ...


#: The schema. ``query_transfers`` (a transfer's details row, updated ~2 times a transfer)
#: and ``idempotency_records`` (updated once, when the operation ends) leave 30 per cent of
#: each page free (``fillfactor = 70``): an update then keeps the new version in its page
#: with no new index entry (a HOT update). At the default fillfactor of 100 only 15 and 42
#: per cent of their updates were HOT under load (docs/performance.md, session 23). It
#: applies to the pages written from then on. The sagas' updates change indexed columns
#: (state, deadline) and are never HOT whatever the fillfactor.
#:
#: Every text column that an index orders or a foreign key compares (keys, ids, states) is
#: ``COLLATE "C"``: byte order, whatever the database's locale (docs/architecture.md, "Keys
#: compare byte by byte"). ``ensure_schema`` moves a table made by an earlier version.
DDL = """
CREATE TABLE IF NOT EXISTS users (
    user_id text COLLATE "C" PRIMARY KEY,
    account_id text COLLATE "C" UNIQUE NOT NULL,
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
    jti text COLLATE "C" PRIMARY KEY,
    transfer_id text COLLATE "C" NOT NULL,
    used_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS daily_usage (
    user_id text COLLATE "C" NOT NULL,
    day date NOT NULL,
    reserved_minor bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    PRIMARY KEY (user_id, day)
);
CREATE TABLE IF NOT EXISTS limit_reservations (
    transfer_id text COLLATE "C" PRIMARY KEY,
    user_id text NOT NULL,
    day date NOT NULL,
    amount_minor bigint NOT NULL CHECK (amount_minor > 0)
);
CREATE TABLE IF NOT EXISTS funding_sources (
    funding_source_id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL REFERENCES users (user_id),
    kind text NOT NULL CHECK (kind IN ('bank_account', 'card')),
    label text NOT NULL,
    status text NOT NULL CHECK (status IN ('active', 'blocked'))
);
CREATE INDEX IF NOT EXISTS transfer_token_uses_transfer_idx
    ON transfer_token_uses (transfer_id);
ALTER TABLE users ADD COLUMN IF NOT EXISTS pin_locked_until timestamptz NULL;
CREATE TABLE IF NOT EXISTS pin_failures (
    user_id text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    failed_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, record)
);
CREATE TABLE IF NOT EXISTS otp_failures (
    key text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    failed_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS otp_failures_user_idx ON otp_failures (user_id, failed_at);
CREATE TABLE IF NOT EXISTS otp_sends (
    transfer_id text COLLATE "C" PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    sent_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS otp_sends_user_idx ON otp_sends (user_id, sent_at);
CREATE TABLE IF NOT EXISTS topup_usage (
    user_id text COLLATE "C" NOT NULL,
    day date NOT NULL,
    reserved_minor bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    PRIMARY KEY (user_id, day)
);
ALTER TABLE limit_reservations ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'transfer';
CREATE TABLE IF NOT EXISTS idempotency_records (
    operator_id text COLLATE "C" NOT NULL,
    idempotency_key text COLLATE "C" NOT NULL,
    fingerprint text NOT NULL,
    transfer_id text COLLATE "C" NOT NULL,
    attempt text NOT NULL,
    state text NULL,
    code text NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz NULL,
    PRIMARY KEY (operator_id, idempotency_key)
);
-- A top-up's outcome found from its charge (a capture replayed after the saga's purge).
CREATE INDEX IF NOT EXISTS idempotency_records_transfer_idx
    ON idempotency_records (transfer_id);
CREATE TABLE IF NOT EXISTS sagas (
    transfer_id text COLLATE "C" PRIMARY KEY,
    home_partition int NOT NULL,
    operator_id text NOT NULL,
    state text COLLATE "C" NOT NULL,
    deadline double precision NULL,  -- Saga.deadline(), POSIX seconds (NULL: none)
    updated_at double precision NOT NULL,  -- Saga.updated_at
    saga bytea NOT NULL  -- orjson of saga_to_dict (app/adapters/saga_state.py)
);
CREATE INDEX IF NOT EXISTS sagas_due_idx ON sagas (home_partition, deadline)
    WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS sagas_finished_idx ON sagas (home_partition, updated_at)
    WHERE state IN ('COMPLETED', 'FAILED');
CREATE INDEX IF NOT EXISTS sagas_state_idx ON sagas (state, updated_at);
CREATE TABLE IF NOT EXISTS saved_replies (
    key text COLLATE "C" PRIMARY KEY,
    home_partition int NOT NULL,
    saved_at double precision NOT NULL,  -- POSIX seconds
    reply bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS saved_replies_age_idx ON saved_replies (home_partition, saved_at);
-- The account query tables (app/query_service.py, AccountProjection), written by the saga
-- engine in its cycle's transaction (app/adapters/saga_state.py): one row per key, value
-- the same orjson document as the projection's, key escaped as saga_state.db_key.
CREATE TABLE IF NOT EXISTS query_balances (
    key text COLLATE "C" PRIMARY KEY, -- accountId
    home_partition int NOT NULL,   -- the account's partition of account.events
    value bytea NOT NULL
);
-- The live balance check reads a worker's partitions (app/adapters/query_tables.py).
CREATE INDEX IF NOT EXISTS query_balances_partition_idx ON query_balances (home_partition);
CREATE TABLE IF NOT EXISTS query_history (
    key text COLLATE "C" PRIMARY KEY, -- accountId US seq (16 digits)
    home_partition int NOT NULL,
    value bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS query_events_seen (
    key text COLLATE "C" PRIMARY KEY, -- accountId US commandId
    home_partition int NOT NULL,
    value bytea NOT NULL
);
-- The transfers' details (TransferProjection), written with their sagas.
CREATE TABLE IF NOT EXISTS query_transfers (
    key text COLLATE "C" PRIMARY KEY, -- transferId
    home_partition int NOT NULL,   -- the saga's home partition
    value bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_leases (
    home_partition int PRIMARY KEY,
    owner text NOT NULL,         -- the saga engine that took it (host:pid:random)
    generation bigint NOT NULL   -- one more at every take: a flush checks its own
);
-- Rows updated in place at the steps of their transfer: room left in their pages for
-- HOT updates (see the comment above DDL).
ALTER TABLE query_transfers SET (fillfactor = 70);
ALTER TABLE idempotency_records SET (fillfactor = 70)
"""


#: The columns of a ``UserRecord``, in its order.
_USER_COLUMNS = (
    "user_id, account_id, currency, phone, pin_verifier, "
    "otp_threshold_minor, daily_limit_minor, status"
)

#: The usage table of each kind of daily limit (constants: never built from input).
_USAGE_TABLES = {"transfer": "daily_usage", "topup": "topup_usage"}

# --- the statements, asyncpg style ($n parameters; asyncpg prepares each once per connection)

_GET_USER = f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1"  # noqa: S608 (constants)
_GET_FUNDING_SOURCE = (
    "SELECT funding_source_id, user_id, kind, label, status FROM funding_sources"
    " WHERE funding_source_id = $1"
)
#: One statement: the payer (or a row of NULLs), the payee's currency (NULL: no such
#: account), today's reservations of the payer's transfers.
_INIT_FACTS = (
    "SELECT (SELECT currency FROM users WHERE account_id = $2) AS payee_currency,"  # noqa: S608
    " COALESCE((SELECT reserved_minor FROM daily_usage"
    " WHERE user_id = $1 AND day = $3), 0) AS reserved,"
    " u.* FROM (SELECT 1) AS one LEFT JOIN (SELECT " + _USER_COLUMNS + " FROM users"
    " WHERE user_id = $1) AS u ON true"
)
_KEPT = (
    "SELECT transfer_id, fingerprint, attempt, state, code FROM idempotency_records"
    " WHERE operator_id = $1 AND idempotency_key = $2"
)
_OUTCOME_OF_TRANSFER = (
    "SELECT transfer_id, fingerprint, attempt, state, code FROM idempotency_records"
    " WHERE transfer_id = $1 LIMIT 1"
)
_SAVE_OUTCOME = (
    "UPDATE idempotency_records SET state = $3::text, code = $4::text, ended_at = now()"
    " WHERE operator_id = $1 AND idempotency_key = $2"
    " AND (state IS DISTINCT FROM $3::text OR code IS DISTINCT FROM $4::text)"
)
_OTP_FAILURES_SINCE = (
    "SELECT count(*) FROM otp_failures WHERE user_id = $1 AND failed_at > $2"
)
_RECORD_OTP_FAILURE = (
    "INSERT INTO otp_failures (key, user_id, failed_at) VALUES ($1, $2, $3)"
    " ON CONFLICT (key) DO NOTHING"
)
#: Gives a reservation back to the usage row of its kind, once (the DELETE decides).
_RELEASE = (
    "WITH r AS (DELETE FROM limit_reservations WHERE transfer_id = $1"
    " RETURNING user_id, day, amount_minor, kind),"
    " t AS (UPDATE topup_usage AS u"
    " SET reserved_minor = u.reserved_minor - r.amount_minor"
    " FROM r WHERE r.kind = 'topup' AND u.user_id = r.user_id"
    " AND u.day = r.day)"
    " UPDATE daily_usage AS u"
    " SET reserved_minor = u.reserved_minor - r.amount_minor"
    " FROM r WHERE r.kind = 'transfer' AND u.user_id = r.user_id"
    " AND u.day = r.day"
)

#: ``check_pin``'s first statement: the user row, locked (every later statement of the
#: transaction sees what committed before the lock was granted).
_LOCK_USER = (
    f"SELECT {_USER_COLUMNS}, pin_failed_attempts, pin_locked_until"  # noqa: S608
    " FROM users WHERE user_id = $1 FOR UPDATE"
)
#: The confirms' first statement: the rows of a batch's users, locked in one order (the
#: sort runs below the row locks), so batches of different workers never deadlock.
_LOCK_USERS = (
    f"SELECT {_USER_COLUMNS}, pin_failed_attempts, pin_locked_until"  # noqa: S608
    " FROM users WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE"
)
#: The confirm's second statement, under the user's lock: the key's idempotency record (a
#: row of NULLs when none), and whether a transfer from before the records used this
#: transferId with another token (its key stays used).
_KEY_FACTS = (
    "SELECT r.transfer_id, r.fingerprint, r.attempt, r.state, r.code,"
    " EXISTS (SELECT 1 FROM transfer_token_uses WHERE transfer_id = $3 AND jti <> $4)"
    " AS used_before_records"
)
_KEY_FACTS_FROM = (
    " FROM (SELECT 1) AS one LEFT JOIN idempotency_records AS r"
    " ON r.operator_id = $1 AND r.idempotency_key = $2"
)
#: The confirm's facts of its key (one statement per confirm, pipelined for the batch).
#: Nothing in it depends on the amount: PostgreSQL keeps its generic plan after five
#: executions. (With the OTP budgets below folded in under ``CASE WHEN $7`` it planned
#: every execution again, its custom plan, the unneeded subqueries folded away, looking
#: cheaper: 4,125 plans for 4,769 executions at K=512, 0.12-0.15 ms of planning against
#: 0.04 of execution each, docs/performance.md, session 23.)
_CONFIRM_FACTS = _KEY_FACTS + _KEY_FACTS_FROM
#: ... and, only for a confirm whose amount needs an OTP, the OTP budgets: whether this
#: transfer's OTP send was counted already ($2), the user's wrong OTPs and OTP sends in
#: their windows ($3, $4).
_CONFIRM_OTP_FACTS = (
    "SELECT EXISTS (SELECT 1 FROM otp_sends WHERE transfer_id = $2) AS otp_counted,"
    " (SELECT count(*) FROM otp_failures"
    " WHERE user_id = $1 AND failed_at > $3::timestamptz) AS otp_failures,"
    " (SELECT count(*) FROM otp_sends"
    " WHERE user_id = $1 AND sent_at > $4::timestamptz) AS otp_sends"
)
#: A right PIN after failures, or a lock that has ended: a whole budget again.
_PIN_RESET = (
    "UPDATE users SET pin_failed_attempts = 0, pin_locked_until = NULL WHERE user_id = $1"
)
#: A wrong PIN, on the locked user row: counted once per (user, record) (``pin_failures``;
#: no record counts every time). Counted: the counter becomes $4 and the lock $5; not
#: counted: the counter is reset when the lock has ended ($6), else left alone.
_PIN_FAILURE = """
WITH counted_once AS (
    INSERT INTO pin_failures (record, user_id, failed_at)
    SELECT $2, $1, $3 WHERE $2::text IS NOT NULL
    ON CONFLICT (user_id, record) DO NOTHING RETURNING true
), counts AS (
    SELECT $2::text IS NULL OR EXISTS (SELECT 1 FROM counted_once) AS counted
), updated AS (
    UPDATE users
    SET pin_failed_attempts = CASE WHEN counts.counted THEN $4::int ELSE 0 END,
        pin_locked_until = CASE WHEN counts.counted THEN $5::timestamptz END
    FROM counts WHERE users.user_id = $1 AND (counts.counted OR $6::bool)
)
SELECT counted FROM counts
"""
#: The token's claim: DO UPDATE (not DO NOTHING) so that RETURNING yields the row in every
#: case (a concurrent inserter is waited for and its committed transfer_id returned);
#: ``xmax = 0`` tells a row this statement inserted from one that was there.
_CLAIM = (
    "INSERT INTO transfer_token_uses (jti, transfer_id) VALUES ($1, $2)"
    " ON CONFLICT (jti) DO UPDATE SET jti = EXCLUDED.jti"
    " RETURNING transfer_id, xmax = 0 AS inserted"
)
#: A reservation of the day's limit, atomic under concurrency: the reservation row first
#: (ON CONFLICT sees, or waits for, any other writer of this transfer's row: a transfer
#: reserves once), then the usage row's conditional increment (ON CONFLICT DO UPDATE
#: locks the row and checks its latest version; numeric: no bigint overflow). A
#: reservation inserted whose increment did not pass (over the limit) is deleted by the
#: caller (:data:`_UNDO_RESERVATION`). $1 user, $2 transfer, $4 day, $5 amount, $6 limit,
#: $7 kind; ``{usage}`` is a constant of :data:`_USAGE_TABLES`.
_RESERVATION_CTES = """
reservation AS (
    INSERT INTO limit_reservations (transfer_id, user_id, day, amount_minor, kind)
    SELECT $2, $1, $4, $5::bigint, $7 FROM {source}
    ON CONFLICT (transfer_id) DO NOTHING RETURNING amount_minor
), within_limit AS (
    INSERT INTO {usage} AS u (user_id, day, reserved_minor)
    SELECT $1, $4, amount_minor FROM reservation WHERE amount_minor <= $6::bigint
    ON CONFLICT (user_id, day) DO UPDATE
    SET reserved_minor = u.reserved_minor + EXCLUDED.reserved_minor
    WHERE u.reserved_minor::numeric + EXCLUDED.reserved_minor <= $6::bigint
    RETURNING true
)"""
#: ``reserve_daily_limit`` on its own. ($3: unused, keeps the numbering of the confirm's.)
_RESERVE = {
    kind: "WITH one AS (SELECT $3::text AS unused), " + _RESERVATION_CTES.format(  # noqa: S608
        source="one", usage=usage) + """
SELECT EXISTS (SELECT 1 FROM reservation) AS reserved_now,
       EXISTS (SELECT 1 FROM within_limit) AS within_limit
"""
    for kind, usage in _USAGE_TABLES.items()
}
#: The confirm's writes once its checks passed, one statement (the claim, the reservation,
#: the OTP send, the idempotency record), in the lock order of the checks: the token row,
#: the reservation, the usage row, then the rows only this user's confirms write. Each
#: step runs only when the one before passed: a token that funds another transfer claims
#: nothing (TOKEN_USED), a reservation over the limit writes neither the OTP send nor the
#: record (LIMIT_EXCEEDED: the caller then deletes the reservation and the claim this
#: statement inserted, :data:`_UNDO_RESERVATION`). The target list reads the CTEs in
#: that order, which is the order PostgreSQL runs them in.
#: $1 user, $2 transfer, $3 jti (NULL: a top-up), $4 day, $5 amount, $6 limit, $7 kind,
#: $8 an OTP is sent, $9 now, $10 idempotency key, $11 fingerprint, $12 attempt.
_CONFIRM_WRITE = {  # the table names are constants of _USAGE_TABLES
    kind: """
WITH claim AS (
    INSERT INTO transfer_token_uses (jti, transfer_id) SELECT $3, $2 WHERE $3::text IS NOT NULL
    ON CONFLICT (jti) DO UPDATE SET jti = EXCLUDED.jti
    RETURNING transfer_id, xmax = 0 AS inserted
), claimed AS (
    SELECT 1 AS one
    WHERE $3::text IS NULL OR EXISTS (SELECT 1 FROM claim WHERE claim.transfer_id = $2)
), """ + _RESERVATION_CTES.format(source="claimed", usage=usage) + """, passed AS (
    SELECT 1 AS one FROM claimed
    WHERE NOT EXISTS (SELECT 1 FROM reservation) OR EXISTS (SELECT 1 FROM within_limit)
), otp_send AS (
    INSERT INTO otp_sends (transfer_id, user_id, sent_at)
    SELECT $2, $1, $9 FROM passed WHERE $8::bool
    ON CONFLICT (transfer_id) DO NOTHING RETURNING true
), record AS (
    INSERT INTO idempotency_records (operator_id, idempotency_key, fingerprint,
                                     transfer_id, attempt)
    SELECT $1, $10, $11, $2, $12 FROM passed
    ON CONFLICT (operator_id, idempotency_key)
    DO UPDATE SET attempt = idempotency_records.attempt RETURNING attempt
)
SELECT EXISTS (SELECT 1 FROM claimed) AS claimed,
       (SELECT inserted FROM claim) AS claim_inserted,
       EXISTS (SELECT 1 FROM reservation) AS reserved_now,
       EXISTS (SELECT 1 FROM otp_send) AS otp_sent,
       (SELECT attempt FROM record) AS attempt
"""  # noqa: S608
    for kind, usage in _USAGE_TABLES.items()
}
#: A reservation over the limit: as if it had never been tried (with the claim that this
#: transaction inserted for it, $3): the token and the key stay free for another try.
_UNDO_RESERVATION = (
    "WITH undone AS (DELETE FROM limit_reservations WHERE transfer_id = $1)"
    " DELETE FROM transfer_token_uses WHERE $3::bool AND jti = $2"
)

INT64_MAX = 2**63 - 1


def _user_of(row: Any) -> UserRecord:
    return UserRecord(
        user_id=row["user_id"],
        account_id=row["account_id"],
        currency=row["currency"],
        phone=row["phone"],
        pin_verifier=row["pin_verifier"],
        otp_threshold_minor=row["otp_threshold_minor"],
        daily_limit_minor=row["daily_limit_minor"],
        status=UserStatus(row["status"]),
    )


def _kept_of(row: Any) -> KeptOutcome:
    return KeptOutcome(row["transfer_id"], row["fingerprint"], row["attempt"], row["state"],
                       row["code"])


class PostgresBusinessStore:
    """The business center's shared state in PostgreSQL: implements ``BusinessStore``,
    plus the plain methods of the module's docstring."""

    def __init__(self, engine: AsyncEngine, schema: str) -> None:
        self._engine = engine
        self._schema = schema
        self._confirms: Coalescer[tuple[ConfirmRequest, GuessBudgets], ConfirmChecks] = (
            Coalescer(self._confirm_batch, key=lambda call: call[0].user_id,
                      name="confirm_checks"))
        self._init_reads: Coalescer[tuple[str, str, date], Any] = Coalescer(
            functools.partial(self._read_each, _INIT_FACTS), name="init_facts")
        self._outcome_writes: Coalescer[tuple[str, str, str, str | None], None] = Coalescer(
            functools.partial(self._write_each, _SAVE_OUTCOME), name="save_outcome")
        self._otp_failure_reads: Coalescer[tuple[str, datetime], Any] = Coalescer(
            functools.partial(self._read_each, _OTP_FAILURES_SINCE), name="otp_failures_since")

    @classmethod
    def from_settings(cls, settings: DbSettings) -> PostgresBusinessStore:
        # The business center's store, saga state and query tables read by index: keys,
        # a partition's or a state's rows (app/adapters/db.py ``key_lookups``).
        engine = make_engine(settings.database_url, settings.db_schema, settings.db_pool_size,
                             key_lookups=True)
        return cls(engine, settings.db_schema)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def migrate(self) -> None:
        await ensure_schema(self._engine, self._schema, DDL)

    async def close(self) -> None:
        await self._engine.dispose()

    # --- connections -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A bare connection of the pool (app/adapters/db.py ``bare_connection``)."""
        async with bare_connection(self._engine) as raw:
            yield raw

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """:meth:`_connection` inside one transaction (READ COMMITTED): committed when the
        block ends, rolled back whole on any exception."""
        async with self._connection() as raw, raw.transaction():
            yield raw

    async def _read_each(self, statement: str, args: Sequence[Sequence[Any]]) -> list[Any]:
        """``statement`` (one row per execution) for each of ``args``, in one round trip."""
        async with self._connection() as raw:
            return await _each(raw, statement, args)

    # --- user directory ----------------------------------------------------------------

    async def get_user(self, user_id: str) -> UserRecord | None:
        async with self._connection() as raw:
            row = await raw.fetchrow(_GET_USER, user_id)
        return None if row is None else _user_of(row)

    async def get_funding_source(self, funding_source_id: str) -> FundingSource | None:
        async with self._connection() as raw:
            row = await raw.fetchrow(_GET_FUNDING_SOURCE, funding_source_id)
        if row is None:
            return None
        return FundingSource(row["funding_source_id"], row["user_id"], row["kind"],
                             row["label"], UserStatus(row["status"]))

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
        # The counts asked together: one round trip (each user's own calls come one after
        # the other: a user's records are decided in order).
        row = await self._otp_failure_reads.submit((user_id, since))
        return int(row[0] or 0)

    async def record_otp_failure(self, user_id: str, key: str, at: datetime) -> None:
        async with self._connection() as raw:
            await raw.execute(_RECORD_OTP_FAILURE, key, user_id, at)

    # --- idempotency records -----------------------------------------------------------

    async def kept_outcome(self, operator_id: str, idempotency_key: str) -> KeptOutcome | None:
        # Written only under the user's row lock (confirm_checks), so a reader holding that
        # lock sees every record of the user's keys.
        async with self._connection() as raw:
            row = await raw.fetchrow(_KEPT, operator_id, idempotency_key)
        return None if row is None else _kept_of(row)

    async def save_outcome(self, operator_id: str, idempotency_key: str, state: str,
                           code: str | None) -> None:
        # The outcomes saved together: one pipelined round trip, in the calls' order.
        await self._outcome_writes.submit((operator_id, idempotency_key, state, code))

    async def _write_each(self, statement: str, args: Sequence[Sequence[Any]]) -> list[None]:
        """``statement`` (no rows) for each of ``args``, in one round trip and one implicit
        transaction (asyncpg's ``executemany``: all or nothing)."""
        async with self._connection() as raw:
            await raw.executemany(statement, args)
        return [None] * len(args)

    async def outcome_of_transfer(self, transfer_id: str) -> KeptOutcome | None:
        async with self._connection() as raw:
            row = await raw.fetchrow(_OUTCOME_OF_TRANSFER, transfer_id)
        return None if row is None else _kept_of(row)

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
        async with self._transaction() as raw:
            row = await raw.fetchrow(_LOCK_USER, user_id)
            if row is None:
                return PinCheck(PinOutcome.INVALID, 0)
            return await self._check_pin(raw, row, user_id, record, matches, max_attempts,
                                         now or datetime.now(UTC), lock_seconds)

    @staticmethod
    async def _check_pin(
        raw: Any, row: Any, user_id: str, record: str | None,
        matches: Callable[[str], bool], max_attempts: int, now: datetime,
        lock_seconds: float,
    ) -> PinCheck:
        """On the user's locked ``row``: the PIN decision and its counter update, at most
        one statement (see :func:`_pin_step`)."""
        step = _pin_step(row, matches, max_attempts, now, lock_seconds)
        if step.reset:
            await raw.execute(_PIN_RESET, user_id)
        if step.wrong is None:
            return step.outcome
        counted = await raw.fetchval(_PIN_FAILURE, user_id, record, now, *step.wrong)
        return _pin_counted(step, bool(counted), max_attempts)

    # --- transfer tokens ---------------------------------------------------------------

    async def claim_transfer_token(self, jti: str, transfer_id: str) -> TokenClaim:
        """The token step of ``confirm_checks`` on its own: record that token ``jti`` funds
        ``transfer_id`` (idempotent for the same pair)."""
        async with self._connection() as raw:
            row = await raw.fetchrow(_CLAIM, jti, transfer_id)
        return TokenClaim.CLAIMED if row["transfer_id"] == transfer_id \
            else TokenClaim.USED_ELSEWHERE

    # --- daily limits ------------------------------------------------------------------

    async def reserve_daily_limit(
        self, user_id: str, transfer_id: str, day: date, amount_minor: int, limit_minor: int,
        kind: str = "transfer",
    ) -> bool:
        """The limit step of ``confirm_checks`` on its own: reserve ``amount_minor`` of the
        user's ``day`` limit of ``kind`` for ``transfer_id``. Atomic under concurrency (two
        reservations of one user never both slip under the limit) and idempotent (the same
        transfer reserving again returns True, once)."""
        if amount_minor <= 0:
            raise ValueError(f"amount_minor must be positive, got {amount_minor}")
        if amount_minor > INT64_MAX:
            return False  # over any limit that a bigint usage row can hold
        async with self._transaction() as raw:
            row = await raw.fetchrow(_RESERVE[kind], user_id, transfer_id, None, day,
                                     amount_minor, min(limit_minor, INT64_MAX), kind)
            if row["reserved_now"] and not row["within_limit"]:
                await raw.execute(_UNDO_RESERVATION, transfer_id, None, False)
                return False
            return True

    async def init_facts(self, user_id: str, to_account_id: str, day: date) -> InitFacts:
        # The reads waiting together: one pipelined round trip (app/adapters/coalesce.py).
        row = await self._init_reads.submit((user_id, to_account_id, day))
        user = None if row["user_id"] is None else _user_of(row)
        return InitFacts(user, row["payee_currency"] is not None, int(row["reserved"]),
                         row["payee_currency"])

    async def confirm_checks(
        self, request: ConfirmRequest, budgets: GuessBudgets
    ) -> ConfirmChecks:
        # The confirms waiting together share one transaction (app/adapters/coalesce.py),
        # one user at most once per batch.
        return await self._confirms.submit((request, budgets))

    async def _confirm_batch(
        self, calls: Sequence[tuple[ConfirmRequest, GuessBudgets]]
    ) -> list[ConfirmChecks]:
        """The checks of ``calls`` (distinct users), each exactly as ``confirm_checks``
        documents it, in one transaction and one checkout, each step one statement for
        the whole batch (asyncpg's ``fetchmany`` pipelines a statement's executions in one
        round trip): BEGIN, the users' locks, the keys' facts, the OTP budgets (only
        when some amount needs an OTP), the PIN counters (only when a PIN was wrong, or
        right after failures), the writes (one statement per kind of limit), COMMIT.
        Lock order: the users' rows (by user_id), then each user's idempotency record,
        token row, reservation and day's usage row, in the batch's order. A call that
        raises (a non-positive amount) rolls the batch back whole."""
        out: list[ConfirmChecks | None] = [None] * len(calls)
        async with self._transaction() as raw:
            locked = {row["user_id"]: row for row in await raw.fetch(
                _LOCK_USERS, sorted({r.user_id for r, _ in calls}))}
            users: dict[int, UserRecord] = {}
            for i, (r, _) in enumerate(calls):
                row = locked.get(r.user_id)
                if row is None or row["status"] != UserStatus.ACTIVE.value:
                    out[i] = ConfirmChecks(ConfirmOutcome.FORBIDDEN)
                    continue
                user = users[i] = _user_of(row)
                if r.from_account_id is not None and user.account_id != r.from_account_id:
                    out[i] = ConfirmChecks(ConfirmOutcome.FORBIDDEN, user)
            # Read after the locks were granted (a statement of its own: its snapshot sees
            # every confirm of these users that committed before).
            live = [i for i in range(len(calls)) if out[i] is None]
            facts = dict(zip(live, await _each(raw, _CONFIRM_FACTS, [
                (r.user_id, r.idempotency_key, r.transfer_id, r.jti or "")
                for i in live for r, _b in (calls[i],)]), strict=True))
            # The OTP budgets only where the amount needs an OTP (a statement of its own,
            # also read after the locks were granted).
            needing = [i for i in live
                       if calls[i][0].amount_minor > users[i].otp_threshold_minor]
            otp = dict(zip(needing, await _each(raw, _CONFIRM_OTP_FACTS, [
                (r.user_id, r.transfer_id,
                 r.now - timedelta(seconds=b.otp_failure_window_seconds),
                 r.now - timedelta(seconds=b.otp_send_window_seconds))
                for i in needing for r, b in (calls[i],)]), strict=True)) if needing else {}
            steps: dict[int, _PinStep] = {}
            for i in live:
                r, b = calls[i]
                kept = None if facts[i]["fingerprint"] is None else _kept_of(facts[i])
                if kept is not None and kept.fingerprint != r.fingerprint:
                    out[i] = ConfirmChecks(ConfirmOutcome.KEY_REUSED, users[i])
                elif kept is not None and kept.state is not None:
                    out[i] = ConfirmChecks(ConfirmOutcome.ANSWERED, users[i], kept=kept)
                elif kept is None and r.jti is not None and facts[i]["used_before_records"]:
                    out[i] = ConfirmChecks(ConfirmOutcome.KEY_REUSED, users[i])
                else:
                    steps[i] = _pin_step(locked[r.user_id], r.matches, b.pin_max_attempts,
                                         r.now, b.pin_lock_seconds)
            resets = [(calls[i][0].user_id,) for i, step in steps.items() if step.reset]
            if resets:
                await raw.executemany(_PIN_RESET, resets)
            wrong = [i for i, step in steps.items() if step.wrong is not None]
            counted = dict(zip(wrong, await _each(raw, _PIN_FAILURE, [
                (r.user_id, r.record, r.now, *(steps[i].wrong or ()))
                for i in wrong for r, _ in (calls[i],)]), strict=True))
            passed: list[int] = []
            for i, step in steps.items():
                r, b = calls[i]
                pin = (step.outcome if i not in counted
                       else _pin_counted(step, bool(counted[i]["counted"]), b.pin_max_attempts))
                if pin.outcome is PinOutcome.LOCKED:
                    out[i] = ConfirmChecks(ConfirmOutcome.PIN_LOCKED, users[i])
                elif pin.outcome is PinOutcome.INVALID:
                    out[i] = ConfirmChecks(ConfirmOutcome.INVALID_PIN, users[i],
                                           pin.attempts_left)
                elif (i in otp and not otp[i]["otp_counted"]
                      and otp[i]["otp_failures"] >= b.otp_max_failures):
                    out[i] = ConfirmChecks(ConfirmOutcome.OTP_LOCKED, users[i])
                elif (i in otp and not otp[i]["otp_counted"]
                      and otp[i]["otp_sends"] >= b.otp_max_sends):
                    out[i] = ConfirmChecks(ConfirmOutcome.RATE_LIMITED, users[i])
                elif not 0 < r.amount_minor <= INT64_MAX:
                    out[i] = await self._unreservable(raw, r, users[i])
                else:
                    passed.append(i)
            for kind, statement in _CONFIRM_WRITE.items():
                group = [i for i in passed if calls[i][0].kind == kind]
                if group:
                    await self._confirm_writes(raw, statement, group, calls, users, out)
        return [checks for checks in out if checks is not None]

    @staticmethod
    async def _confirm_writes(
        raw: Any, statement: str, group: list[int],
        calls: Sequence[tuple[ConfirmRequest, GuessBudgets]], users: dict[int, UserRecord],
        out: list[ConfirmChecks | None],
    ) -> None:
        """The writes of the ``group`` of calls whose checks passed (one kind of limit):
        one execution of ``_CONFIRM_WRITE`` each, pipelined; then the reservations over
        the limit undone (with the claims inserted for them)."""
        rows = []
        for i in group:
            r = calls[i][0]
            limit = users[i].daily_limit_minor if r.limit_minor is None else r.limit_minor
            rows.append((r.user_id, r.transfer_id, r.jti, r.day, r.amount_minor,
                         min(limit, INT64_MAX),  # usage rows are bigint: no sum passes above
                         r.kind, r.amount_minor > users[i].otp_threshold_minor, r.now,
                         r.idempotency_key, r.fingerprint, r.attempt))
        undo = []
        for i, written in zip(group, await _each(raw, statement, rows), strict=True):
            r, user = calls[i][0], users[i]
            if not written["claimed"]:
                out[i] = ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
            elif written["attempt"] is None:  # the reservation was over the limit
                undo.append((r.transfer_id, r.jti, bool(written["claim_inserted"])))
                out[i] = ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)
            else:
                out[i] = ConfirmChecks(ConfirmOutcome.OK, user, attempt=str(written["attempt"]))
        if undo:
            await raw.executemany(_UNDO_RESERVATION, undo)

    @staticmethod
    async def _unreservable(raw: Any, r: ConfirmRequest, user: UserRecord) -> ConfirmChecks:
        """The token and limit steps of an amount that no limit can hold: not positive
        (``ValueError``: the transaction rolls back whole) or above PostgreSQL's bigint
        (LIMIT_EXCEEDED, the claim undone). The token's claim still comes first."""
        inserted = False
        if r.jti is not None:
            claim = await raw.fetchrow(_CLAIM, r.jti, r.transfer_id)
            if claim["transfer_id"] != r.transfer_id:
                return ConfirmChecks(ConfirmOutcome.TOKEN_USED, user)
            inserted = bool(claim["inserted"])
        if r.amount_minor <= 0:
            raise ValueError(f"amount_minor must be positive, got {r.amount_minor}")
        await raw.execute(_UNDO_RESERVATION, r.transfer_id, r.jti, inserted)
        return ConfirmChecks(ConfirmOutcome.LIMIT_EXCEEDED, user)

    async def release_daily_limit(self, transfer_id: str) -> None:
        async with self._connection() as raw:
            await raw.execute(_RELEASE, transfer_id)

    async def reserved_today(self, user_id: str, day: date) -> int:
        """What the user's transfers reserved of their ``day`` limit (see ``init_facts``)."""
        async with self._engine.connect() as conn:
            reserved = await conn.scalar(
                text("SELECT reserved_minor FROM daily_usage WHERE user_id = :u AND day = :d"),
                {"u": user_id, "d": day},
            )
        return int(reserved or 0)
