"""Unit tests of the metrics and the saga's telemetry (app/metrics.py, app/saga_telemetry.py)
and of the account center's live reconciliation alarm (reference/account_center/service.py): no
broker, no database."""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from app import metrics, saga_telemetry
from app.domain import transfer_saga as s
from app.log_format import JsonFormatter
from app.reconciliation import Check, Drift, Report
from app.record_failures import SourceRecord, dead_letter
from reference.account_center import service as ac_service

POLICY = s.Policy(otp_ttl_seconds=300.0, otp_max_attempts=5, otp_pepper=b"p" * 32,
                  command_timeout_seconds=5.0, command_max_backoff_seconds=40.0)
T0 = 1_000_000.0


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def transfer(tid: str = "11111111-1111-4111-8111-111111111111", kind: str = "transfer"
             ) -> s.Transfer:
    return s.Transfer(transfer_id=tid, operator_id="alice", idempotency_key="k",
                      fingerprint="f", from_account_id="acc-a", to_account_id="acc-b",
                      amount_minor=500, currency="USD", note='a "state":"X" note',
                      home_partition=4, kind=kind)


def step(saga: s.Saga, outputs: tuple[s.Output, ...]) -> s.Saga:
    saga_telemetry.observe(saga, outputs)
    return saga


@pytest.mark.parametrize(("reason", "category"), [
    ("too large: the record is 70000 bytes, over the 65536-byte limit", "too_large"),
    ("undecodable: invalid JSON: unexpected character: line 1 column 1 (char 0)",
     "undecodable"),
    ("too deep: JSON nested deeper than 32 levels", "too_deep"),
    ("invalid envelope: type: Input should be ...", "invalid"),
    ("invalid account event: commandId: Field required", "invalid"),
    ("internal error (ZeroDivisionError)", "internal_error"),
    ("foreign id: it names partition 9, which does not exist (6 partitions)", "foreign_id"),
    ("not a charge of this service", "foreign_id"),
    ("capture x:charge:1 for an unknown top-up: give it back to the source by hand",
     "unknown_topup_capture"),
    ("output to business.replies of 950000 bytes, over the 900000-byte limit",
     "output_unsendable"),
    ("an output was refused: MessageSizeTooLargeError", "output_refused"),
    ("its event was refused: MessageSizeTooLargeError", "output_refused"),
    ("ledger refused the command: DataError (sqlstate 22P05)", "ledger_refused"),
    ("something new", "other"),
])
def test_dead_letter_reasons_fall_into_a_bounded_set(reason: str, category: str) -> None:
    assert metrics.reason_category(reason) == category


def test_a_dead_letter_is_counted_by_topic_and_category() -> None:
    before = value("bizcenter_dlq_records_total", topic="x.business.commands",
                   reason="undecodable")
    dead_letter(SourceRecord("x.business.commands", 0, 7, b"k", b"{"), "undecodable: nope")
    assert value("bizcenter_dlq_records_total", topic="x.business.commands",
                 reason="undecodable") == before + 1


def test_a_record_made_in_the_worker_is_counted_at_its_origin_by_its_own_reason() -> None:
    """A saga input decided in-process is dead-lettered at the event it was made from: it
    is counted under that event's topic, and its category is its own reason's (the
    letter's reason starts with the in-process prefix, which must not make it ``other``)."""
    before = value("bizcenter_dlq_records_total", topic="x.funding.events",
                   reason="unknown_topup_capture")
    event = SourceRecord("x.funding.events", 1, 9, b"ch", b'{"chargeId": "ch"}')
    made = SourceRecord("x.business.saga-inputs", 2, -1, b"t", b"{}", origin=event)
    letter = dead_letter(made, "capture ch for an unknown top-up: give it back by hand")
    assert letter.reason.startswith("in-process saga input: capture ch")
    assert value("bizcenter_dlq_records_total", topic="x.funding.events",
                 reason="unknown_topup_capture") == before + 1


def test_a_reply_type_the_contract_does_not_know_is_other() -> None:
    before = value("bizcenter_requests_total", type="other", status="error",
                   code="INVALID_REQUEST")
    metrics.replied("made-up-type-123", "error", "INVALID_REQUEST")
    metrics.replied("transferInit", "ok", None)
    assert value("bizcenter_requests_total", type="other", status="error",
                 code="INVALID_REQUEST") == before + 1
    assert value("bizcenter_requests_total", type="made-up-type-123", status="error",
                 code="INVALID_REQUEST") == 0
    assert value("bizcenter_requests_total", type="transferInit", status="ok", code="") >= 1


def test_the_state_and_home_partition_are_read_from_the_stored_saga() -> None:
    saga, _ = s.start(transfer(), request_id="r", otp=None, user_id="alice", now=T0,
                      policy=POLICY)
    raw = orjson.dumps(s.saga_to_dict(saga))
    assert metrics.saga_state_and_home(raw) == ("DEBITING", 4)
    assert metrics.saga_state_and_home(b"{}") is None
    assert metrics.saga_state_and_home(b'{"state":"X","home_partition":x}') is None


def test_a_scrape_time_gauge_is_cached_and_a_failure_serves_nothing() -> None:
    calls: list[int] = []
    now = [0.0]

    def compute() -> list[tuple[tuple[str, ...], float]]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return [(("a",), float(len(calls)))]

    collector = metrics.CallbackCollector("t_gauge", "test", ["l"], compute, ttl=5.0,
                                          clock=lambda: now[0])

    def scraped() -> list[tuple[str, float]]:
        (family,) = list(collector.collect())
        return [(smp.labels["l"], smp.value) for smp in family.samples]

    assert scraped() == [("a", 1.0)]
    now[0] = 4.9
    assert scraped() == [("a", 1.0)] and len(calls) == 1  # cached
    now[0] = 5.0
    assert scraped() == [("a", 2.0)]
    now[0] = 10.0
    assert scraped() == []  # computing failed: no sample, no stale value


def test_each_state_change_is_counted_and_the_first_final_state_is_a_transfer(
        caplog: pytest.LogCaptureFixture) -> None:
    t = transfer("22222222-2222-4222-8222-222222222222")
    labels = {"kind": "transfer", "outcome": "MANUAL_REVIEW"}
    before = {
        "review": value("bizcenter_transfers_total", **labels),
        "duration": value("bizcenter_saga_duration_seconds_count", **labels),
        "crediting": value("bizcenter_saga_transitions_total", kind="transfer",
                           state="CREDITING"),
        "resolved": value("bizcenter_resolutions_total", action="refund", outcome="FAILED"),
        "failed": value("bizcenter_transfers_total", kind="transfer", outcome="FAILED"),
    }
    caplog.set_level(logging.DEBUG, logger="app.saga")
    saga = step(*s.start(t, request_id="r-1", otp=None, user_id="alice", now=T0,
                         policy=POLICY))
    saga = step(*s.on_account_event(saga, s.command_id(t, "debit"), "debited", None, T0 + 1,
                                    POLICY))
    saga = step(*s.on_account_event(saga, s.command_id(t, "credit"), "rejected",
                                    "ACCOUNT_NOT_FOUND", T0 + 2, POLICY))
    saga = step(*s.on_account_event(saga, s.command_id(t, "refund"), "rejected",
                                    "ACCOUNT_NOT_FOUND", T0 + 3.5, POLICY))
    assert saga.state is s.State.MANUAL_REVIEW
    assert value("bizcenter_transfers_total", **labels) == before["review"] + 1
    assert value("bizcenter_saga_duration_seconds_count", **labels) == before["duration"] + 1
    assert value("bizcenter_saga_duration_seconds_sum", **labels) >= 3.5
    assert value("bizcenter_saga_transitions_total", kind="transfer",
                 state="CREDITING") == before["crediting"] + 1

    # one line per state change: the routine steps at DEBUG, money going back at INFO,
    # MANUAL_REVIEW at WARNING, the ids as JSON fields
    lines = [r for r in caplog.records if r.name == "app.saga"]
    assert [r.levelname for r in lines] == ["DEBUG", "DEBUG", "INFO", "WARNING"]
    assert [r.getMessage().split(": ", 1)[1] for r in lines] == [
        "start -> DEBITING", "DEBITING -> CREDITING",
        "CREDITING -> REFUNDING",
        "REFUNDING -> MANUAL_REVIEW (INTERNAL)"]
    assert "REFUNDING -> MANUAL_REVIEW (INTERNAL)" in lines[-1].getMessage()
    as_json = json.loads(JsonFormatter().format(lines[-1]))
    assert (as_json["transferId"], as_json["requestId"], as_json["operatorId"]) == (
        t.transfer_id, "r-1", "alice")
    assert as_json["level"] == "WARNING" and as_json["logger"] == "app.saga"

    # an operator's resolution: counted as such, not as a second transfer
    saga = step(*s.on_resolution(saga, "res-1", 1, "refund", "ops-anna", "why", T0 + 10,
                                 POLICY))
    assert "operator resolution 1: refund by ops-anna" in caplog.records[-1].getMessage()
    assert caplog.records[-1].levelname == "INFO"
    saga = step(*s.on_account_event(saga, s.command_id(t, "refund.r1"), "refunded", None,
                                    T0 + 11, POLICY))
    assert saga.state is s.State.FAILED
    assert value("bizcenter_resolutions_total", action="refund",
                 outcome="FAILED") == before["resolved"] + 1
    assert value("bizcenter_transfers_total", kind="transfer",
                 outcome="FAILED") == before["failed"]
    assert value("bizcenter_transfers_total", **labels) == before["review"] + 1


def test_a_late_capture_given_back_does_not_count_the_top_up_twice() -> None:
    t = transfer("33333333-3333-4333-8333-333333333333", kind=s.TOPUP)
    labels = {"kind": "topup", "outcome": "FAILED"}
    before = value("bizcenter_transfers_total", **labels)
    saga = step(*s.start(t, request_id="r-1", otp=None, user_id="alice", now=T0,
                         policy=POLICY))
    saga = step(*s.on_tick(saga, T0 + POLICY.funding_timeout_seconds + 1, POLICY))
    assert saga.state is s.State.FAILED and saga.code == "FUNDING_TIMEOUT"
    charge = s.command_id(t, "charge")
    saga = step(*s.on_funding_event(saga, charge, "captured", T0 + 60, POLICY))
    assert saga.state is s.State.REVERSING
    saga = step(*s.on_funding_event(saga, charge, "refunded", T0 + 61, POLICY))
    assert saga.state is s.State.FAILED
    assert value("bizcenter_transfers_total", **labels) == before + 1


def _report(drifts: list[Drift], clearing: int = 0, balances: int = 100) -> Report:
    report = Report()
    report.totals["USD"] = {"balances": balances, "seeded": 100, "funded": 0,
                            "entered": 100, "clearing": clearing}
    names = {d.check for d in drifts}
    for name in ("money conserved", "clearing account zero", "journal balanced per command",
                 "balances = journal"):
        report.checks.append(Check(name, name not in names, ""))
    report.drifts.extend(drifts)
    return report


async def test_the_live_reconciliation_alarms_once_per_drift_and_says_when_it_is_gone(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    reports: list[Any] = []

    async def fake_reconcile(engine: Any) -> Report:
        item = reports.pop(0)
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    import app.reconciliation

    monkeypatch.setattr(app.reconciliation, "reconcile", fake_reconcile)
    now = [0.0]
    checker = ac_service.LiveReconciliation(engine=None, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger=ac_service.log.name)
    drift = [Drift("money conserved", "USD", 100, 107),
             Drift("balances = journal", "acc-bob", 1000, 1007)]
    in_flight = [Drift("clearing account zero", "clearing:USD", 0, 50)]

    def alarms() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "RECONCILIATION DRIFT" in r.getMessage()]

    reports.extend([_report(in_flight, clearing=50, balances=50), _report(drift, balances=107),
                    _report(drift, balances=107), _report(drift[1:], balances=107),
                    OSError("db away"), _report([])])
    await checker.run_once()  # money in clearing alone: no alarm
    assert alarms() == []
    assert value("bizcenter_clearing_minor", currency="USD") == 50
    assert value("bizcenter_reconciliation_drift_minor", currency="USD") == 0
    await checker.run_once()
    (alarm,) = alarms()
    assert alarm.levelno == logging.ERROR
    assert "acc-bob" in alarm.getMessage() and "(+7)" in alarm.getMessage()
    assert value("bizcenter_reconciliation_drift_minor", currency="USD") == 7
    assert value("bizcenter_reconciliation_check_ok", check="balances = journal") == 0
    now[0] = 60.0
    await checker.run_once()  # the same drift a minute later: not again
    assert len(alarms()) == 1
    await checker.run_once()  # it changed: again
    assert len(alarms()) == 2
    errors = value("bizcenter_reconciliation_runs_total", result="error")
    await checker.run_once()  # the ledger unreadable: counted, no alarm, no all-clear
    assert value("bizcenter_reconciliation_runs_total", result="error") == errors + 1
    assert len(alarms()) == 2
    await checker.run_once()
    assert any("balanced again" in r.getMessage() for r in caplog.records)
    assert value("bizcenter_reconciliation_drift_minor", currency="USD") == 0
    assert value("bizcenter_reconciliation_check_ok", check="balances = journal") == 1


async def test_a_query_table_balance_off_the_ledger_is_a_mismatch_once_it_persists(
        caplog: pytest.LogCaptureFixture) -> None:
    from app.query_reconciliation import QueryBalanceCheck

    ledger = {"acc-a": 100, "acc-b": 50, "acc-c": 10}
    applied = {"c1": 100, "c2": 50, "c3": 10}
    reads: list[tuple[list[str], list[str]]] = []

    async def read(accounts: list[str], commands: list[str]
                   ) -> tuple[dict[str, int], dict[str, int]]:
        reads.append((accounts, commands))
        return dict(ledger), dict(applied)

    check = QueryBalanceCheck(read)
    caplog.set_level(logging.INFO, logger="app.query_reconciliation")
    entries = {"acc-a": (100, "c1"), "acc-b": (50, "c2"), "acc-c": (10, "c3")}
    assert await check.run(entries) == []
    assert reads[-1] == (["acc-a", "acc-b", "acc-c"], ["c1", "c2", "c3"])
    ledger["acc-b"] = 57  # a movement on its way, or a drift: not yet a mismatch
    assert await check.run(entries) == []
    (mismatch,) = await check.run(entries) or []  # the same difference an interval later
    assert (mismatch.account_id, mismatch.table_balance, mismatch.ledger_balance) == (
        "acc-b", 50, 57)
    assert value("bizcenter_query_balance_mismatches") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "acc-b" in errors[0].getMessage()
    assert "(+7)" in errors[0].getMessage()
    # a table entry that is not what its own command left: at once
    entries["acc-c"] = (11, "c3")
    found = await check.run(entries) or []
    assert {m.account_id for m in found} == {"acc-b", "acc-c"}
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    # moving on (a new command each time) is never a mismatch
    ledger["acc-b"], entries["acc-b"], entries["acc-c"] = 57, (57, "c9"), (10, "c3")
    assert await check.run(entries) == []
    assert value("bizcenter_query_balance_mismatches") == 0
    assert any("match the ledger again" in r.getMessage() for r in caplog.records)


async def test_the_query_balance_check_turns_off_where_the_ledger_is_not_readable() -> None:
    from app.query_reconciliation import QueryBalanceCheck

    class UndefinedTable(Exception):
        sqlstate = "42P01"

    calls: list[int] = []

    async def read(accounts: list[str], commands: list[str]
                   ) -> tuple[dict[str, int], dict[str, int]]:
        calls.append(1)
        raise UndefinedTable()

    check = QueryBalanceCheck(read)
    assert await check.run({"acc-a": (1, "c")}) is None
    assert await check.run({"acc-a": (1, "c")}) is None
    assert calls == [1]  # off after the first


async def test_the_query_balance_check_reads_the_stored_balances() -> None:
    """``query_balances`` values in (the projection's documents): the ledger asked for the
    readable ones (an account id holding NUL left out: no ledger holds one); a read that
    fails counts an error and asks the ledger nothing."""
    from app.query_reconciliation import QueryBalanceCheck

    reads: list[tuple[list[str], list[str]]] = []

    async def read(accounts: list[str], commands: list[str]
                   ) -> tuple[dict[str, int], dict[str, int]]:
        reads.append((accounts, commands))
        return {"acc-a": 100, "acc-b": 9}, {"c1": 100, "c2": 8}

    async def stored() -> dict[str, bytes]:
        return {"acc-a": orjson.dumps({"balanceMinor": 100, "commandId": "c1", "seq": 3}),
                "acc-b": orjson.dumps({"balanceMinor": 9, "commandId": "c2", "seq": 1}),
                "acc-\x00": orjson.dumps({"balanceMinor": 5, "commandId": "c3", "seq": 1}),
                "acc-x": b"[]"}

    async def unreadable() -> dict[str, bytes]:
        raise OSError("connection refused")

    check = QueryBalanceCheck(read)
    (mismatch,) = await check.run_stored(stored) or []
    assert reads == [(["acc-a", "acc-b"], ["c1", "c2"])]
    assert (mismatch.account_id, mismatch.table_balance) == ("acc-b", 9)  # c2 left 8
    errors = value("bizcenter_query_balance_checks_total", result="error")
    assert await check.run_stored(unreadable) is None
    assert value("bizcenter_query_balance_checks_total", result="error") == errors + 1
    assert len(reads) == 1


def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import re
    from pathlib import Path

    import app.query_reconciliation  # noqa: F401  (its metrics)

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana"
                            / "bizcenter-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", name)
            for e in exprs for name in re.findall(r"\bbizcenter_\w+", e)}
    defined = {name for collector in list(REGISTRY._collector_to_names)
               for name in REGISTRY._collector_to_names[collector]}
    defined |= {"bizcenter_open_sagas", "bizcenter_consumer_lag"}  # scrape-time, per app
    assert used, exprs
    assert used <= {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in defined}, (
        used - defined)


def test_the_remembered_children_are_the_metrics_own() -> None:
    """``LabelledChildren`` hands out what ``labels()`` does, the same object each time,
    so a count through it is a count of the metric."""
    pairs = [(metrics.requests_of, metrics.REQUESTS, ("transferInit", "ok", "")),
             (metrics.transitions_of, metrics.TRANSITIONS, ("transfer", "DEBITING")),
             (metrics.transfers_of, metrics.TRANSFERS, ("transfer", "COMPLETED")),
             (metrics.saga_duration_of, metrics.SAGA_DURATION, ("transfer", "COMPLETED")),
             (metrics.resolutions_of, metrics.RESOLUTIONS, ("refund", "FAILED")),
             (metrics.dead_letters_of, metrics.DEAD_LETTERS, ("t", "invalid"))]
    for children, metric, labels in pairs:
        assert children(*labels) is metric.labels(*labels) is children(*labels)
    before = value("bizcenter_requests_total", type="verifyOtp", status="error",
                   code="INVALID_OTP")
    metrics.replied("verifyOtp", "error", "INVALID_OTP")
    metrics.replied("verifyOtp", "error", "INVALID_OTP")
    assert value("bizcenter_requests_total", type="verifyOtp", status="error",
                 code="INVALID_OTP") == before + 2
    bounded = metrics.LabelledChildren(metrics.REQUESTS, limit=1)
    assert bounded("a", "ok", "") is metrics.REQUESTS.labels("a", "ok", "")
    assert bounded("b", "ok", "") is metrics.REQUESTS.labels("b", "ok", "")
