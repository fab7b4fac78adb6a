"""Running an isolated copy of the system on the shared broker and database, for the
integration tests (``tests/system.py``) and the benchmark (``bench/``): what both need and
the product never does.

- the broker and the database that ``make up`` wrote down (``.local/env``);
- child processes started exactly as an operator starts them, each logging to its file,
  and stopped with SIGTERM (SIGKILL past a deadline);
- users seeded as the user center and the account center's operators would create them;
- the money check that every account moved exactly once;
- the tear-down of a run's topics (its prefix and Faust app id) and schemas.

The children's environment comes from ``app.child_env``, the consumer groups' state and
lag from ``events.consumer_groups``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import text

from app.adapters.postgres_store import PostgresBusinessStore
from app.domain.pin import pin_verifier
from app.domain.ports import UserRecord, UserStatus
from app.settings import Settings
from reference.account_center.ledger import Ledger

# ---------------------------------------------------------------- the local services


def local_env_file(root: Path) -> Path:
    """The env file of ``make up`` in the checkout ``root``, or ``BIZ_ENV_FILE``."""
    return Path(os.environ.get("BIZ_ENV_FILE") or root / ".local" / "env")


def env_file_values(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and other lines skipped); empty when
    there is no such file."""
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def free_port() -> int:
    """A TCP port nobody listens on right now (for a worker's web server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- child processes


def start_child(argv: list[str], *, env: Mapping[str, str], log: Path, cwd: Path,
                new_session: bool = False) -> subprocess.Popen[bytes]:
    """Run ``argv`` with exactly ``env``, its output appended to ``log``. With
    ``new_session``, a terminal's Ctrl-C does not reach it (it is stopped by its parent)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=dict(env), cwd=cwd,  # noqa: S603
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=new_session)


async def stop_children(processes: Mapping[str, subprocess.Popen[bytes]], *,
                        timeout: float, kill: bool = False) -> list[str]:
    """SIGTERM (SIGKILL with ``kill``) to every process still running, then wait for all
    of them; those still running after ``timeout`` seconds are killed. Returns their
    names."""
    running = {name: p for name, p in processes.items() if p.poll() is None}
    for proc in running.values():
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    killed: list[str] = []
    while any(p.poll() is None for p in running.values()):
        if loop.time() > deadline:
            for name, proc in running.items():
                if proc.poll() is None:
                    proc.kill()
                    killed.append(name)
            deadline = float("inf")
        await asyncio.sleep(0.05)
    return killed


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- data


async def seed_user(store: PostgresBusinessStore, ledger: Ledger, pin_pepper: bytes, *,
                    user_id: str, pin: str, phone: str, currency: str, balance_minor: int,
                    otp_threshold_minor: int, daily_limit_minor: int,
                    open_account: bool = True) -> UserRecord:
    """A user of the directory with its PIN, and (with ``open_account``) its account
    ``acc-<user>`` opened with ``balance_minor`` in the ledger."""
    user = UserRecord(
        user_id=user_id, account_id=f"acc-{user_id}", currency=currency, phone=phone,
        pin_verifier=pin_verifier(pin_pepper, user_id, pin),
        otp_threshold_minor=otp_threshold_minor, daily_limit_minor=daily_limit_minor,
        status=UserStatus.ACTIVE,
    )
    await store.upsert_user(user)
    if open_account:
        await ledger.open_account(user.account_id, currency, balance_minor)
    return user


async def balances_off(ledger: Ledger, opening: Mapping[str, int],
                       completed: Iterable[tuple[str, str, int]]
                       ) -> dict[str, tuple[int, int | None]]:
    """Accounts whose balance is not their ``opening`` balance minus what they sent plus
    what they received over the ``completed`` (payer, payee, amount) transfers:
    {account: (expected, actual)}; empty when every account moved exactly once."""
    expected = dict(opening)
    for payer, payee, amount in completed:
        expected[payer] -= amount
        expected[payee] += amount
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT account_id, balance_minor FROM accounts"))).all()
    actual = {str(r[0]): int(r[1]) for r in rows}
    return {a: (want, actual.get(a)) for a, want in expected.items() if actual.get(a) != want}


# ---------------------------------------------------------------- tear-down


async def drop_run(settings: Settings, ledger: Ledger) -> None:
    """Drop the run's PostgreSQL schemas (the business center's and the account center's)
    and every topic of its prefix or Faust app id (its tables' changelogs)."""
    async with ledger.engine.begin() as conn:
        for schema in (settings.db_schema, settings.account_center_db_schema):
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics()
                if t.startswith(settings.topic_prefix) or t.startswith(settings.app_id)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
