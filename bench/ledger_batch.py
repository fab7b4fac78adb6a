"""Micro-benchmark of the reference ledger's ``apply_batch`` against the real PostgreSQL.

``python -m bench.ledger_batch [--commands 20000] [--batches 1,10,100,500]``

Applies ``--commands`` account commands (transfers: a debit of the payer and a credit of the
payee, in the same batch when the batch holds both) in sequential batches of each size, one
connection, in its own schema (dropped at the end), and prints per batch size: commands/s,
the client's CPU per command (this process: SQLAlchemy/asyncpg, decisions, encoding) and
the PostgreSQL backend's CPU per command (``/proc/<pg_backend_pid>/stat``, when readable).

``--ledger-file /tmp/old/ledger.py`` measures another version of ledger.py (say, the one
of an earlier commit copied out of git) with everything else from this tree.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

from app.adapters.db import make_engine
from app.settings import Settings
from bench.isolated_system import base_settings
from schemas.wire import AccountCommand, AccountCommandType, AccountEventType

CURRENCY = "USD"
OPENING_BALANCE = 10**12


def _load_ledger_module(path: str | None) -> Any:
    if path is None:
        from reference.account_center import ledger

        return ledger
    spec = importlib.util.spec_from_file_location("bench_ledger_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _backend_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a local PostgreSQL backend (None when not readable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _transfers(accounts: list[str], commands: int, rng: random.Random) -> list[AccountCommand]:
    out: list[AccountCommand] = []
    while len(out) < commands:
        payer, payee = rng.sample(accounts, 2)
        transfer = uuid.uuid4().hex
        amount = rng.randint(1, 10_000)
        for kind, account in ((AccountCommandType.DEBIT, payer),
                              (AccountCommandType.CREDIT, payee)):
            out.append(AccountCommand(
                command_id=f"{transfer}:{kind.value}", type=kind, account_id=account,
                amount_minor=amount, currency=CURRENCY, transfer_id=transfer))
    return out[:commands]


async def _backend_pid(ledger: Any) -> int | None:
    async with ledger.engine.connect() as conn:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return int(pid) if _backend_cpu(int(pid)) is not None else None


async def run(args: argparse.Namespace) -> None:
    module = _load_ledger_module(args.ledger_file)
    settings: Settings = base_settings()
    schema = f"bench_ledger_{os.getpid()}"
    # One connection: the account center's loop applies one batch at a time.
    ledger = module.Ledger(make_engine(settings.database_url, schema, pool_size=1), schema)
    rng = random.Random(args.seed)
    rows: list[tuple[int, int, float, float, float | None]] = []
    try:
        await ledger.migrate()
        accounts = [f"bench-{i:05d}" for i in range(args.accounts)]
        for a in accounts:
            await ledger.open_account(a, CURRENCY, OPENING_BALANCE)
        pid = await _backend_pid(ledger)
        for size in args.batches:
            count = args.commands if size > 1 else min(args.commands, args.single_commands)
            warm = _transfers(accounts, min(count, 4 * size + 200), rng)
            for i in range(0, len(warm), size):
                await ledger.apply_batch(warm[i:i + size])
            commands = _transfers(accounts, count, rng)
            batches = [commands[i:i + size] for i in range(0, len(commands), size)]
            server0 = _backend_cpu(pid)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            rejected = 0
            for batch in batches:
                events = await ledger.apply_batch(batch)
                rejected += sum(e.type is AccountEventType.REJECTED for e in events)
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            server1 = _backend_cpu(pid)
            if rejected:
                raise SystemExit(f"{rejected} commands rejected: the benchmark is wrong")
            server = None if server0 is None or server1 is None else server1 - server0
            rows.append((size, count, count / wall, cpu / count * 1e6,
                         None if server is None else server / count * 1e6))
            print(f"batch {size}: {count} commands in {wall:.2f}s", file=sys.stderr)
        if await ledger.unbalanced_commands() or await ledger.mismatched_accounts():
            raise SystemExit("the books do not balance")
    finally:
        await ledger.close()
        admin = make_engine(settings.database_url, "public", pool_size=1)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
    label = args.ledger_file or "reference/account_center/ledger.py"
    print(f"\nledger: {label}; {args.accounts} accounts; one connection\n")
    print("| batch | commands | commands/s | client CPU µs/command | PG backend CPU µs/command |")
    print("|---:|---:|---:|---:|---:|")
    for size, count, rate, client, server in rows:
        server_s = "n/a" if server is None else f"{server:,.1f}"
        print(f"| {size} | {count:,} | {rate:,.0f} | {client:,.1f} | {server_s} |")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ledger_batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", type=int, default=20_000)
    p.add_argument("--single-commands", type=int, default=5_000,
                   help="commands of the batch-size-1 run (slow: one transaction each)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 10, 100, 500])
    p.add_argument("--accounts", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--ledger-file", default=None,
                   help="path of another ledger.py to measure (default: this tree's)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
