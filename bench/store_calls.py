"""Micro-benchmark of the business store's calls against the real PostgreSQL.

``python -m bench.store_calls [--calls 2000] [--only confirm_ok,init_facts] [--batch 16]``

Runs each call of ``PostgresBusinessStore`` that a transfer makes (``init_facts`` for a
transferInit, ``confirm_checks`` for a transferConfirm, ``save_outcome`` at the end, and
the rarer ones) ``--calls`` times, one at a time on one connection, in its own schema
(dropped at the end), and prints per call: the client's CPU in µs (this process:
SQLAlchemy/asyncpg and the store's own code), the wall time, and the round trips to
PostgreSQL (every write of a batch of protocol messages on the socket: BEGIN, a statement,
COMMIT, a PREPARE of a statement not cached yet are one each; counted in a separate pass so
that counting costs no CPU in the timed one). ``--batch N`` makes each step N calls at once
(distinct users), which the store coalesces into one batch (app/adapters/coalesce.py): the
figures are still per call, the wall time per step of N.

Another version of the store (an earlier commit) is measured from a worktree::

    git worktree add /tmp/wt-store HEAD
    cd /tmp && PYTHONPATH=/tmp/wt-store /work/main/.venv/bin/python /work/main/bench/store_calls.py

(the script prints which ``postgres_store.py`` it measured). The database is the one of
``make up`` (this tree's ``.local/env``) or ``DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

import app.adapters.postgres_store as store_module
from app.adapters.db import make_engine
from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_matches, pin_verifier
from app.domain.ports import ConfirmOutcome, ConfirmRequest, GuessBudgets, UserRecord, UserStatus
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PEPPER = b"bench-pepper"
PIN, WRONG = "123456", "000000"
DAY = date(2026, 1, 2)
THRESHOLD = 50_000
#: Budgets that a benchmark never exhausts (the refusals are measured as their own calls).
BUDGETS = GuessBudgets(pin_max_attempts=10**9, otp_max_failures=10**9, otp_max_sends=10**9)


@contextmanager
def _count_writes() -> Iterator[list[int]]:
    """Counts the socket writes of this process's transports (only PostgreSQL's here)."""
    from asyncio import selector_events

    cls: Any = getattr(selector_events, "_SelectorSocketTransport")  # noqa: B009
    original = cls.write
    box = [0]

    def write(self: Any, data: Any) -> None:
        box[0] += 1
        original(self, data)

    cls.write = write
    try:
        yield box
    finally:
        cls.write = original


async def _backends(store: PostgresBusinessStore) -> list[int]:
    """The PIDs of the store's server processes (its pool's connections)."""
    pids = []
    for _ in range(2):  # the pool's connection and its overflow, if it was opened
        async with store._connection() as raw:
            pids.append(int(await raw.fetchval("SELECT pg_backend_pid()")))
    return sorted(set(pids))


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of local processes (/proc; 0 where a PID cannot be read)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Fixture:
    store: PostgresBusinessStore
    payers: list[UserRecord]
    payee: UserRecord
    now: datetime
    confirmed: list[tuple[str, str]]  # (user, key) of OK confirms: for save_outcome
    reserved: list[str]  # transfer ids with a reservation: for release_daily_limit
    n: int = 0

    def payer(self) -> UserRecord:
        self.n += 1
        return self.payers[self.n % len(self.payers)]


def _request(f: Fixture, user: UserRecord, *, amount: int, pin: str = PIN) -> ConfirmRequest:
    transfer_id = uuid.uuid4().hex
    jti = uuid.uuid4().hex
    return ConfirmRequest(
        user_id=user.user_id, idempotency_key=transfer_id, fingerprint=jti,
        transfer_id=transfer_id, attempt=uuid.uuid4().hex[:16],
        matches=lambda verifier: pin_matches(PEPPER, user.user_id, pin, verifier),
        record=f"business.commands/0/{uuid.uuid4().hex}", day=DAY, now=f.now,
        amount_minor=amount, from_account_id=user.account_id, jti=jti)


async def _confirm_ok(f: Fixture) -> None:
    user = f.payer()
    r = _request(f, user, amount=1_000)
    checks = await f.store.confirm_checks(r, BUDGETS)
    assert checks.outcome is ConfirmOutcome.OK, checks
    f.confirmed.append((user.user_id, r.idempotency_key))
    f.reserved.append(r.transfer_id)


async def _confirm_otp(f: Fixture) -> None:
    r = _request(f, f.payer(), amount=THRESHOLD + 1)
    checks = await f.store.confirm_checks(r, BUDGETS)
    assert checks.outcome is ConfirmOutcome.OK, checks


async def _confirm_wrong_pin(f: Fixture) -> None:
    checks = await f.store.confirm_checks(_request(f, f.payer(), amount=1_000, pin=WRONG),
                                          BUDGETS)
    assert checks.outcome is ConfirmOutcome.INVALID_PIN, checks


async def _init_facts(f: Fixture) -> None:
    facts = await f.store.init_facts(f.payer().user_id, f.payee.account_id, DAY)
    assert facts.user is not None and facts.payee_exists


async def _save_outcome(f: Fixture) -> None:
    user_id, key = f.confirmed.pop()
    await f.store.save_outcome(user_id, key, "COMPLETED", None)


async def _kept_outcome(f: Fixture) -> None:
    user_id, key = f.confirmed[f.n % len(f.confirmed)]
    f.n += 1
    assert await f.store.kept_outcome(user_id, key) is not None


async def _get_user(f: Fixture) -> None:
    assert await f.store.get_user(f.payer().user_id) is not None


async def _release(f: Fixture) -> None:
    await f.store.release_daily_limit(f.reserved.pop())


async def _record_otp_failure(f: Fixture) -> None:
    await f.store.record_otp_failure(f.payer().user_id, uuid.uuid4().hex, f.now)


async def _otp_failures_since(f: Fixture) -> None:
    await f.store.otp_failures_since(f.payer().user_id, f.now - timedelta(days=1))


#: (name, call, how many OK confirms it consumes per call): in this order.
CALLS: list[tuple[str, Callable[[Fixture], Awaitable[None]]]] = [
    ("init_facts", _init_facts),
    ("confirm_checks ok", _confirm_ok),
    ("confirm_checks ok, OTP", _confirm_otp),
    ("confirm_checks wrong PIN", _confirm_wrong_pin),
    ("kept_outcome", _kept_outcome),
    ("save_outcome", _save_outcome),
    ("release_daily_limit", _release),
    ("get_user", _get_user),
    ("record_otp_failure", _record_otp_failure),
    ("otp_failures_since", _otp_failures_since),
]


async def run(args: argparse.Namespace) -> None:
    settings = Settings(_env_file=ROOT / ".local" / "env") if not os.environ.get(
        "DATABASE_URL") else Settings()
    schema = f"bench_store_{os.getpid()}"
    # One connection: the figures are per call, without any pool contention.
    store = PostgresBusinessStore(make_engine(settings.database_url, schema, pool_size=1),
                                  schema)
    rows: list[tuple[str, float, float, float, float]] = []
    try:
        await store.migrate()
        payers = []
        for i in range(args.users):
            user_id = f"bench-{i:04d}"
            payers.append(UserRecord(
                user_id, f"acc-{user_id}", "USD", "+15550001111",
                pin_verifier(PEPPER, user_id, PIN), THRESHOLD, 10**15, UserStatus.ACTIVE))
            await store.upsert_user(payers[-1])
        payee = payers.pop()
        f = Fixture(store, payers, payee, datetime.now(UTC), [], [])
        wanted = set(args.only.split(",")) if args.only else None
        for name, call in CALLS:
            if wanted is not None and not any(w in name for w in wanted):
                continue
            n = args.calls
            if call is _save_outcome or call is _release or call is _kept_outcome:
                need = (2 * n + 100) * args.batch
                while len(f.confirmed) < need or len(f.reserved) < need:
                    await asyncio.gather(*(_confirm_ok(f) for _ in range(args.batch)))

            async def step(call: Callable[[Fixture], Awaitable[None]] = call,
                           b: int = args.batch) -> None:
                if b == 1:
                    await call(f)
                else:
                    await asyncio.gather(*(call(f) for _ in range(b)))

            for _ in range(50):  # warm: statements prepared, plans cached
                await step()
            with _count_writes() as writes:
                for _ in range(args.count_calls):
                    await step()
            trips = writes[0] / args.count_calls
            backends = await _backends(store)
            server0 = _cpu_seconds(backends)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await step()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            server = _cpu_seconds(backends) - server0
            rows.append((name, trips, cpu / n / args.batch * 1e6,
                         server / n / args.batch * 1e6, wall / n * 1e6))
            print(f"{name}: {n} calls in {wall:.2f}s", file=sys.stderr)
    finally:
        await store.close()
        admin = make_engine(settings.database_url, "public", pool_size=1)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
    print(f"\nstore: {store_module.__file__}; {args.calls} steps of {args.batch} call(s) each,"
          " one connection\n")
    print("| call | round trips per step | client CPU µs/call | server CPU µs/call |"
          " wall µs/step |")
    print("|---|---:|---:|---:|---:|")
    for name, trips, cpu_us, server_us, wall_us in rows:
        print(f"| {name} | {trips:.1f} | {cpu_us:,.0f} | {server_us:,.0f} | {wall_us:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.store_calls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2_000)
    p.add_argument("--count-calls", type=int, default=100,
                   help="calls of the round-trip counting pass")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--only", default=None, help="comma-separated parts of call names")
    p.add_argument("--batch", type=int, default=1,
                   help="calls at once per step (distinct users; at most --users - 1)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
