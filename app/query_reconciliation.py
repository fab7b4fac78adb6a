"""Do the balances the worker's query tables serve match the ledger? (live, in the worker)

Every ``BIZ_RECONCILE_INTERVAL_SECONDS`` each worker compares the ``query_balances`` rows
(PostgreSQL, written by the saga engine; agents/query_agents.py) of the accounts whose
partitions of ``account.events`` its saga engine consumes with the reference account
center's ledger (``BIZ_ACCOUNT_CENTER_DB_SCHEMA``, read-only):

- an entry whose balance is not the ``balanceAfterMinor`` the ledger recorded for the very
  command it was applied from is wrong at once (the table was written badly);
- an entry whose balance differs from the ledger's current balance is normal for a moment
  (a movement's event is on its way on ``account.events``); it is a mismatch when it is
  still the same difference, for the same last command, one interval later (a drift, or a
  saga engine that stopped following ``account.events``).

Mismatches set ``bizcenter_query_balance_mismatches`` and log an ERROR naming the accounts
(again when the set changes); an INFO line when they are gone. Where the ledger is not
readable (the account center is another team's, its database elsewhere), the check says so
once and stays off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from sqlalchemy import text

log = logging.getLogger(__name__)

MISMATCHES = Gauge("bizcenter_query_balance_mismatches", "Accounts whose query-table "
                   "balance differs from the ledger's (this worker's partitions)")
CHECKS = Counter("bizcenter_query_balance_checks", "Query-table balance checks by result "
                 "(matched, mismatch, error)", ["result"])

#: (the table's balance, the command it was applied from) per account.
Entries = Mapping[str, tuple[int, str]]
#: accounts, command ids → (ledger balance per account, balanceAfterMinor per command id)
LedgerReader = Callable[[list[str], list[str]],
                        Awaitable[tuple[dict[str, int], dict[str, int]]]]


@dataclass(frozen=True, slots=True)
class Mismatch:
    account_id: str
    table_balance: int
    ledger_balance: int | None
    why: str


def balance_entries(stored: Mapping[str, bytes]) -> dict[str, tuple[int, str]]:
    """The entries of ``query_balances`` values (accountId → the projection's document).
    An account id holding NUL is left out: no ledger holds one (PostgreSQL's text cannot),
    and asking for it would fail the whole read."""
    entries: dict[str, tuple[int, str]] = {}
    for account, raw in stored.items():
        doc = orjson.loads(raw)
        if ("\x00" not in account and isinstance(doc, dict)
                and isinstance(doc.get("balanceMinor"), int)):
            entries[account] = (doc["balanceMinor"], str(doc.get("commandId", "")))
    return entries


class QueryBalanceCheck:
    def __init__(self, read_ledger: LedgerReader) -> None:
        self.read_ledger = read_ledger
        self._suspects: dict[str, tuple[int, str, int]] = {}
        self._reported: frozenset[Mismatch] = frozenset()
        self._off = False

    async def run_stored(self, read_balances: Callable[[], Awaitable[Mapping[str, bytes]]]
                         ) -> list[Mismatch] | None:
        """:meth:`run` over the ``query_balances`` rows ``read_balances`` returns; None
        when they or the ledger could not be read."""
        if self._off:
            return None
        try:
            entries = balance_entries(await read_balances())
        except Exception as exc:
            CHECKS.labels("error").inc()
            log.warning("query balance check: query_balances could not be read (%s)",
                        type(exc).__name__)
            return None
        return await self.run(entries) if entries else []

    async def run(self, entries: Entries) -> list[Mismatch] | None:
        """One comparison; None when the ledger could not be read."""
        if self._off:
            return None
        accounts = sorted(entries)
        commands = sorted({cid for _balance, cid in entries.values()})
        try:
            ledger, applied = await self.read_ledger(accounts, commands)
        except Exception as exc:
            CHECKS.labels("error").inc()
            if _missing_table(exc):
                self._off = True
                log.info("query balance check off: the ledger's tables are not readable "
                         "here (%s)", type(exc).__name__)
            else:
                log.warning("query balance check: the ledger could not be read (%s)",
                            type(exc).__name__)
            return None
        found: list[Mismatch] = []
        suspects: dict[str, tuple[int, str, int]] = {}
        for account in accounts:
            balance, command_id = entries[account]
            after = applied.get(command_id)
            if after is not None and after != balance:
                found.append(Mismatch(account, balance, ledger.get(account),
                                      f"the table holds {balance}, its command {command_id} "
                                      f"left {after}"))
                continue
            current = ledger.get(account)
            if current is None or current == balance:
                continue
            key = (balance, command_id, current)
            if self._suspects.get(account) == key:
                found.append(Mismatch(account, balance, current,
                                      f"the table holds {balance}, the ledger {current} "
                                      f"({current - balance:+d}) since the last check"))
            suspects[account] = key
        self._suspects = suspects
        self._report(found)
        return found

    def _report(self, found: list[Mismatch]) -> None:
        MISMATCHES.set(len(found))
        CHECKS.labels("mismatch" if found else "matched").inc()
        current = frozenset(found)
        if found and current != self._reported:
            log.error("QUERY BALANCE MISMATCH: %s (docs/operations.md, Reconcile)",
                      "; ".join(f"{m.account_id}: {m.why}" for m in found[:20]))
        elif not found and self._reported:
            log.info("query balance check: the query tables match the ledger again")
        self._reported = current


def _missing_table(exc: BaseException) -> bool:
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
        exc, "sqlstate", None)
    return state in ("42P01", "3F000")  # undefined table, undefined schema


def ledger_reader(engine: Any) -> LedgerReader:
    """Reads the reference ledger (``engine``'s search_path: the account center's schema)."""

    async def read(accounts: list[str], commands: list[str]
                   ) -> tuple[dict[str, int], dict[str, int]]:
        async with engine.connect() as conn:
            balances = (await conn.execute(text(
                "SELECT account_id, balance_minor FROM accounts "
                "WHERE account_id = ANY(:ids)"), {"ids": accounts})).all()
            after = (await conn.execute(text(
                "SELECT command_id, (result->>'balanceAfterMinor')::bigint "
                "FROM processed_commands WHERE command_id = ANY(:ids) "
                "AND result->>'balanceAfterMinor' IS NOT NULL"), {"ids": commands})).all()
            await conn.rollback()
        return ({str(a): int(b) for a, b in balances},
                {str(c): int(v) for c, v in after})

    return read
