"""Reconciliation of the reference account center's ledger: does the money add up?

Run once by ``bizcenter reconcile`` (exit 0 balanced, 1 drift) and by the benchmark after
its load (bench/money_check.py). Read-only: four checks, per currency where it applies,
straight from the ledger's tables (``accounts``, ``journal``; reference/account_center/ledger.py):

``money conserved``
    the sum of the user balances equals the money that entered, minus what is held in
    clearing: ``seeded + funded - clearing``, where ``seeded`` is what the opening
    balances brought in (``external:seed:<CUR>``), ``funded`` the captured top-ups net of
    their reversals (``external:funding:<CUR>``, and any other ``external:`` account),
    ``clearing`` the money between a transfer's debit and its credit or refund;
``clearing account zero``
    ``clearing:<CUR>`` holds nothing: true whenever no transfer is in flight (a run while
    transfers are moving may see it non-zero: run again once the system is quiet);
``journal balanced per command``
    every command's journal lines sum to zero;
``balances = journal``
    every account's ``balance_minor`` equals the sum of its journal lines.

Each difference is a :class:`Drift` row: what was expected, what was found, by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

CLEARING_PREFIX = "clearing:"
EXTERNAL_PREFIX = "external:"
SEED_PREFIX = "external:seed:"
FUNDING_PREFIX = "external:funding:"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Drift:
    """One thing that does not add up: ``actual`` where ``expected`` was due."""

    check: str
    subject: str  # a currency, an account id or a command id
    expected: int
    actual: int

    @property
    def difference(self) -> int:
        return self.actual - self.expected


@dataclass(slots=True)
class Report:
    checks: list[Check] = field(default_factory=list)
    drifts: list[Drift] = field(default_factory=list)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "balanced": self.balanced,
            "checks": [asdict(c) for c in self.checks],
            "drifts": [{**asdict(d), "difference": d.difference} for d in self.drifts],
            "totals": self.totals,
        }

    def as_table(self) -> str:
        """The checks, then (when something differs) a table of the differences."""
        lines = [f"{'check':<32} {'ok':<5} detail"]
        lines += [f"{c.name:<32} {'yes' if c.ok else 'NO':<5} {c.detail}" for c in self.checks]
        if self.drifts:
            lines += ["", f"{'check':<32} {'subject':<40} {'expected':>16} {'actual':>16} "
                      f"{'difference':>12}"]
            lines += [f"{d.check:<32} {d.subject:<40} {d.expected:>16} {d.actual:>16} "
                      f"{d.difference:>+12}" for d in self.drifts]
        lines.append("")
        lines.append("balanced" if self.balanced else
                     f"DRIFT: {sum(not c.ok for c in self.checks)} check(s) failed")
        return "\n".join(lines)


#: Per currency: user balances, and the journal sums of clearing and external accounts.
_TOTALS = """
SELECT c.currency,
       COALESCE((SELECT SUM(balance_minor) FROM accounts a WHERE a.currency = c.currency), 0),
       COALESCE((SELECT SUM(amount_minor) FROM journal j
                 WHERE j.account_id = :clearing || c.currency), 0),
       COALESCE((SELECT SUM(amount_minor) FROM journal j
                 WHERE j.account_id = :seed || c.currency), 0),
       COALESCE((SELECT SUM(amount_minor) FROM journal j
                 WHERE j.account_id = :funding || c.currency), 0),
       COALESCE((SELECT SUM(amount_minor) FROM journal j WHERE j.currency = c.currency
                 AND j.account_id LIKE :external_like), 0)
FROM (SELECT currency FROM accounts UNION SELECT currency FROM journal) c
ORDER BY c.currency
"""
_UNBALANCED = """
SELECT command_id, SUM(amount_minor) FROM journal GROUP BY command_id
HAVING SUM(amount_minor) <> 0 ORDER BY command_id
"""
_MISMATCHED = """
SELECT a.account_id, a.balance_minor, COALESCE(j.s, 0) FROM accounts a LEFT JOIN (
    SELECT account_id, SUM(amount_minor) AS s FROM journal GROUP BY account_id
) j ON j.account_id = a.account_id
WHERE a.balance_minor <> COALESCE(j.s, 0) ORDER BY a.account_id
"""


def _some(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more"
                                       if len(items) > limit else "")


async def reconcile(engine: AsyncEngine) -> Report:
    """The four checks over the ledger that ``engine`` reaches (its search_path is the
    account center's schema, as ``Ledger.from_settings(settings).engine``). One read-only
    repeatable-read transaction: the checks see one snapshot."""
    report = Report()
    async with engine.connect() as conn:
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        totals = (await conn.execute(text(_TOTALS), {
            "clearing": CLEARING_PREFIX, "seed": SEED_PREFIX, "funding": FUNDING_PREFIX,
            "external_like": EXTERNAL_PREFIX + "%"})).all()
        unbalanced = (await conn.execute(text(_UNBALANCED))).all()
        mismatched = (await conn.execute(text(_MISMATCHED))).all()
        await conn.rollback()

    conserved_off: list[str] = []
    clearing_off: list[str] = []
    for currency_raw, balances, clearing, seed, funding, external in totals:
        currency = str(currency_raw).strip()
        balances, clearing = int(balances), int(clearing)
        seeded, funded, entered = -int(seed), -int(funding), -int(external)
        report.totals[currency] = {"balances": balances, "seeded": seeded, "funded": funded,
                                   "entered": entered, "clearing": clearing}
        if balances != entered - clearing:
            conserved_off.append(currency)
            report.drifts.append(Drift("money conserved", currency, entered - clearing,
                                       balances))
        if clearing != 0:
            clearing_off.append(currency)
            report.drifts.append(Drift("clearing account zero", f"{CLEARING_PREFIX}{currency}",
                                       0, clearing))
    summary = "; ".join(
        f"{cur}: balances {t['balances']} = seeded {t['seeded']} + funded {t['funded']}"
        + (f" + other {t['entered'] - t['seeded'] - t['funded']}"
           if t['entered'] != t['seeded'] + t['funded'] else "")
        + (f" - clearing {t['clearing']}" if t['clearing'] else "")
        for cur, t in report.totals.items()) or "no accounts"
    report.checks.append(Check(
        "money conserved", not conserved_off,
        summary if not conserved_off else f"differs in {_some(conserved_off)}; {summary}"))
    report.checks.append(Check(
        "clearing account zero", not clearing_off,
        "nothing held in clearing" if not clearing_off else
        f"held in clearing: {_some(clearing_off)} (transfers in flight? run again once "
        f"the system is quiet)"))
    for command_id, total in unbalanced:
        report.drifts.append(Drift("journal balanced per command", str(command_id), 0,
                                   int(total)))
    report.checks.append(Check(
        "journal balanced per command", not unbalanced,
        "every command's lines sum to zero" if not unbalanced else
        f"{len(unbalanced)} unbalanced: {_some([str(r[0]) for r in unbalanced])}"))
    for account_id, balance, journal in mismatched:
        report.drifts.append(Drift("balances = journal", str(account_id), int(journal),
                                   int(balance)))
    report.checks.append(Check(
        "balances = journal", not mismatched,
        "every balance equals its journal" if not mismatched else
        f"{len(mismatched)} mismatched: {_some([str(r[0]) for r in mismatched])}"))
    return report
