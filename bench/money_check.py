"""After the load: wait until the system is quiet (with a deadline), then check that money
was conserved and moved exactly once, and that every transfer reached a final state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from agents.saga_engine import saga_group
from app.reconciliation import reconcile
from app.settings import Settings
from bench.config import CURRENCY, INITIAL_BALANCE_MINOR
from bench.gateway import FINAL_STATES, BenchGateway
from bench.isolated_system import SeededUser
from bench.virtual_users import COMPLETED, TransferSample
from events.consumer_groups import GroupProgress, group_progress
from reference.account_center.ledger import Ledger
from reference.system_harness import balances_off


@dataclass
class Checks:
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})

    @property
    def passed(self) -> bool:
        return all(item["ok"] for item in self.items)

    def as_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "items": self.items}


def open_sagas(gateway: BenchGateway) -> list[str]:
    return [tid for tid, (_seq, state) in gateway.transfer_states.items()
            if state not in FINAL_STATES]


async def wait_quiet(settings: Settings, ledger: Ledger, gateway: BenchGateway,
                     timeout: float, poll_seconds: float = 0.5) -> dict[str, Any]:
    """Until every saga is final, the clearing account is empty and both consumer groups
    have committed everything written up to the previous look; or until ``timeout``.
    Returns what was last seen.

    "Committed everything" cannot mean "no record uncommitted at this instant": each worker
    writes a tick to every ``business.saga-inputs`` partition it owns once a second
    (``BIZ_TICK_INTERVAL_SECONDS``) for ever, and commits it up to
    ``broker_commit_interval`` (0.5 s) later, so an idle, healthy group has up to one
    uncommitted tick per partition for part of every second. A look every ~1 s then falls
    at the same phase of the ticks look after look: it saw 6 (one tick per partition,
    committed offsets moving on every second) for the whole 90 s deadline. So a group is
    caught up when every record on the broker at the previous look (its end offsets, read
    before the commits of this look) is committed now: a record never acknowledged, a
    partition never committed or committed behind a record keeps counting at every look,
    as before."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    t, bootstrap, partitions = (settings.topic, settings.kafka_bootstrap_servers,
                                settings.topic_partitions)
    saga_topics = [t("business.commands"), t("business.saga-inputs"), t("account.events"),
                   t("funding.events")]
    faust_topics = [t("business.queries")]  # the Faust group's only input
    ac_topics = [t("account.commands")]
    sagas_before: GroupProgress | None = None
    faust_before: GroupProgress | None = None
    ac_before: GroupProgress | None = None
    while True:
        # The worker reads with two groups: the saga engine's and the Faust app's.
        sagas = await group_progress(bootstrap, saga_group(settings), saga_topics, partitions)
        faust = await group_progress(bootstrap, settings.app_id, faust_topics, partitions)
        ac = await group_progress(bootstrap, settings.account_center_group, ac_topics,
                                  partitions)
        worker_lag = (sagas.behind(None if sagas_before is None else sagas_before.ends)
                      + faust.behind(None if faust_before is None else faust_before.ends))
        ac_lag = ac.behind(None if ac_before is None else ac_before.ends)
        sagas_before, faust_before, ac_before = sagas, faust, ac
        clearing = await ledger.clearing_balance(CURRENCY)
        # Read after the groups' lag, so what the worker wrote before is in what was read.
        events_read = await gateway.events_caught_up()
        still_open = open_sagas(gateway)
        seen = {"workerLag": worker_lag, "accountCenterLag": ac_lag,
                "workerUncommittedNow": sagas.behind() + faust.behind(),
                "clearingMinor": clearing,
                "openSagas": len(still_open), "transferEventsRead": events_read,
                "waitedSeconds": round(loop.time() - start, 1)}
        if events_read and not (worker_lag or ac_lag or clearing or still_open):
            seen["quiet"] = True
            return seen
        if loop.time() - start > timeout:
            seen["quiet"] = False
            return seen
        await asyncio.sleep(poll_seconds)


async def check_money(ledger: Ledger, gateway: BenchGateway, users: list[SeededUser],
                      samples: list[TransferSample], quiet: dict[str, Any],
                      dead_processes: list[str], errors: dict[str, int]) -> Checks:
    checks = Checks()
    checks.add("processes alive", not dead_processes,
               "all ran to the end" if not dead_processes
               else f"died during the run: {', '.join(dead_processes)}")
    checks.add("quiescence", quiet.get("quiet", False),
               f"quiet after {quiet['waitedSeconds']} s" if quiet.get("quiet") else
               f"not quiet at the deadline: {quiet}")

    seeded_expected = INITIAL_BALANCE_MINOR * len(users)
    total = await ledger.total_balances(CURRENCY)
    seeded = await ledger.seeded_total(CURRENCY)
    checks.add("sum of balances = seeded", total == seeded == seeded_expected,
               f"balances {total}, seeded (journal) {seeded}, seeded (bench) {seeded_expected}")
    # The ledger's own checks, as `bizcenter reconcile` runs them (app/reconciliation.py):
    # money conserved, clearing account zero, journal balanced per command, balances =
    # journal.
    report = await reconcile(ledger.engine)
    for check in report.checks:
        checks.add(check.name, check.ok, check.detail)

    unanswered = [s for s in samples if s.finished_at is None]
    checks.add("every request answered", not unanswered,
               f"{len(samples)} transfers, all ended with a final reply" if not unanswered else
               f"{len(unanswered)} of {len(samples)} without a final reply "
               f"({', '.join(sorted({f'{s.step}:{s.outcome}' for s in unanswered}))})")
    still_open = open_sagas(gateway)
    checks.add("every saga final", not still_open,
               f"{len(gateway.transfer_states)} sagas, all final" if not still_open else
               f"{len(still_open)} not final, e.g. {still_open[:3]}")
    completed = [s for s in samples if s.outcome == COMPLETED]
    disagree = [s.transfer_id for s in completed
                if gateway.transfer_states.get(s.transfer_id, (0, ""))[1] != COMPLETED]
    checks.add("completed replies = COMPLETED sagas", not disagree,
               f"{len(completed)} completed" if not disagree else
               f"{len(disagree)} completed replies whose saga is not COMPLETED")

    if unanswered:
        checks.add("every account moved exactly once", False,
                   "cannot be checked: some outcomes are unknown")
    else:
        wrong = list(await balances_off(
            ledger, {u.account_id: INITIAL_BALANCE_MINOR for u in users},
            [(users[s.payer].account_id, users[s.payee].account_id, s.amount_minor)
             for s in completed]))
        checks.add("every account moved exactly once", not wrong,
                   f"{len(users)} balances = opening - sent + received" if not wrong else
                   f"{len(wrong)} accounts differ from the completed transfers, e.g. "
                   f"{wrong[:3]}")
    checks.add("no error replies", not errors,
               "none" if not errors else ", ".join(f"{k}: {v}" for k, v in errors.items()))
    return checks
