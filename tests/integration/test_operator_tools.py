"""Operating the system for real (issue 14): the worker's and the account center's
``/metrics`` moving after a transfer; a dead letter counted and shown by ``bizcenter dlq``;
a transfer driven into MANUAL_REVIEW, listed by ``bizcenter sagas list`` (from the sagas
table in PostgreSQL), logged at WARNING as a JSON line with its ids, resolved by
``bizcenter sagas resolve`` (money moved once, the command idempotent); the account
center's live reconciliation raising its alarm on a ledger row changed behind its back.

One system (worker, account center, funding provider as child processes) in its own topics
and schemas; JSON logs; the live reconciliation every second.

Then ``bizcenter sagas`` without any worker: rows written straight into the ``sagas`` table
of a schema of their own (its filters, its JSON, not found, a store that cannot be read),
and ``resolve`` sending its signed input to the saga's home partition."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from conftest import wait_for
from sqlalchemy import text
from system import ROOT, System

from app.adapters.postgres_store import PostgresBusinessStore
from app.child_env import child_env
from app.domain.resolution_signing import resolution_signed
from app.domain.transfer_saga import Saga, State, Transfer, saga_to_dict
from app.settings import Settings
from cli.operator_commands import iso, read_topic
from events.topics import ensure_topics, partition_of
from schemas.wire import SagaInput, TransferEvent

ALICE, BOB, CAROL = "ot-alice", "ot-bob", "ot-carol"
OPENING = 1_000_000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("operator")
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id, tmp, log_format="json",
                        reconcile_interval_seconds=1.0)
    try:
        await sys_.start()
        for user in (ALICE, BOB, CAROL):
            await sys_.add_user(user, balance=OPENING)
        await wait_for(lambda: _ready(sys_), timeout=120, interval=0.5,
                       what="the worker's and the account center's /readyz")
        yield sys_
    finally:
        await sys_.close()


async def _ready(system: System) -> bool:
    for port in (system.settings.web_port, system.settings.account_center_web_port):
        try:
            status, _body, _ = await system.http_get(port, "/readyz")
        except OSError:
            return False
        if status != 200:
            return False
    return True


async def scrape(system: System, port: int) -> dict[str, float]:
    """``name{labels}`` → value of every sample of a ``/metrics`` page."""
    status, body, headers = await system.http_get(port, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain"), headers
    samples: dict[str, float] = {}
    for line in str(body).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (0 if none)."""
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if metric == name and all(found.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def bizcenter(system: System, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli(system.env(), *args, timeout=timeout)


def run_cli(env: dict[str, str], *args: str, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    """``bizcenter ARGS`` as an operator runs it, with ``env`` (every setting explicit)."""
    return subprocess.run([sys.executable, "-m", "cli", *args],
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.mark.integration
async def test_metrics_are_served_and_move_after_a_transfer(system: System) -> None:
    worker_port = system.settings.web_port
    ac_port = system.settings.account_center_web_port
    before = await scrape(system, worker_port)
    ac_before = await scrape(system, ac_port)

    reply = await system.transfer(ALICE, f"acc-{BOB}", 1_250)
    assert reply["status"] == "ok", reply

    async def moved() -> dict[str, float] | None:
        after = await scrape(system, worker_port)
        done = sample(after, "bizcenter_transfers_total", kind="transfer",
                      outcome="COMPLETED")
        return after if done >= sample(before, "bizcenter_transfers_total", kind="transfer",
                                       outcome="COMPLETED") + 1 else None

    after = await wait_for(moved, timeout=30, what="bizcenter_transfers_total to move")
    for name, labels in [
        ("bizcenter_requests_total", {"type": "transferInit", "status": "ok", "code": ""}),
        ("bizcenter_requests_total", {"type": "transferConfirm", "status": "ok", "code": ""}),
        ("bizcenter_saga_duration_seconds_count", {"kind": "transfer",
                                                   "outcome": "COMPLETED"}),
        ("bizcenter_saga_transitions_total", {"kind": "transfer", "state": "CREDITING"}),
    ]:
        assert sample(after, name, **labels) == sample(before, name, **labels) + 1, (
            name, labels)
    assert sample(after, "bizcenter_saga_duration_seconds_sum", kind="transfer",
                  outcome="COMPLETED") > sample(before, "bizcenter_saga_duration_seconds_sum",
                                                kind="transfer", outcome="COMPLETED")
    # the scrape-time gauges: every open state present, the lag of the input partitions
    for state in ("AWAITING_OTP", "DEBITING", "CREDITING", "REFUNDING", "MANUAL_REVIEW"):
        assert f'bizcenter_open_sagas{{state="{state}"}}' in after, sorted(after)[:40]
    commands = system.settings.topic("business.commands")
    lags = [k for k in after if k.startswith("bizcenter_consumer_lag{")
            and f'topic="{commands}"' in k]
    assert len(lags) == system.settings.topic_partitions, lags
    assert all(after[k] >= 0 for k in lags)

    # the account center: its own metrics, consumer lag, the live reconciliation's gauges
    async def ac_moved() -> dict[str, float] | None:
        now = await scrape(system, ac_port)
        runs = sample(now, "bizcenter_reconciliation_runs_total", result="balanced")
        return now if runs > sample(ac_before, "bizcenter_reconciliation_runs_total",
                                    result="balanced") else None

    ac_after = await wait_for(ac_moved, timeout=30, what="a live reconciliation run")
    assert 'bizcenter_reconciliation_drift_minor{currency="USD"}' in ac_after, sorted(ac_after)
    assert sample(ac_after, "bizcenter_reconciliation_drift_minor", currency="USD") == 0
    assert sample(ac_after, "bizcenter_reconciliation_check_ok",
                  check="money conserved") == 1
    account_commands = system.settings.topic("account.commands")

    async def ac_lag() -> bool:  # a partition's lag is known once the center committed it
        return any(k.startswith("bizcenter_consumer_lag{") and account_commands in k
                   for k in await scrape(system, ac_port))

    await wait_for(ac_lag, timeout=30, what="the account center's consumer lag")
    assert (await system.http_get(ac_port, "/healthz"))[:2] == (200, {"status": "alive"})
    status, body, _ = await system.http_get(ac_port, "/readyz")
    assert (status, body) == (200, {"ready": True, "checks": {
        "assigned": True, "consuming": True, "postgres": True}})


@pytest.mark.integration
async def test_a_dead_letter_is_counted_listed_and_shown(system: System) -> None:
    port = system.settings.web_port
    commands = system.settings.topic("business.commands")
    before = await scrape(system, port)
    assert system.client is not None and system.client._producer is not None
    marker = uuid.uuid4().hex.encode()
    await system.client._producer.send_and_wait(commands, b"not json " + marker, key=marker)

    async def counted() -> bool:
        now = await scrape(system, port)
        return sample(now, "bizcenter_dlq_records_total", topic=commands,
                      reason="undecodable") == sample(
            before, "bizcenter_dlq_records_total", topic=commands, reason="undecodable") + 1

    await wait_for(counted, timeout=30, what="the dead letter to be counted")

    listed = bizcenter(system, "dlq", "list", "--json", "--topic", "business.commands")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    mine = [d for d in letters if d.get("keyB64") == base64.b64encode(marker).decode()]
    assert len(mine) == 1, letters
    letter = mine[0]
    assert letter["sourceTopic"] == commands and letter["reason"].startswith("undecodable")
    assert "value" not in letter  # never the original value
    table = bizcenter(system, "dlq", "list")
    assert table.returncode == 0 and letter["id"] in table.stdout, table.stdout
    shown = bizcenter(system, "dlq", "show", letter["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == letter
    missing = bizcenter(system, "dlq", "show", "99:99999")
    assert missing.returncode == 1, missing.stdout + missing.stderr


async def _manual_review_transfer(system: System) -> str:
    """A transfer alice → carol whose credit is refused (carol's account closed) and whose
    refund is refused too (a trigger of this test's own schema closes alice's account as
    soon as her debit is journaled): MANUAL_REVIEW, the amount held in clearing."""
    assert system.ledger is not None
    async with system.ledger.engine.begin() as conn:  # search_path: the ledger's schema
        await conn.execute(text("""
            CREATE OR REPLACE FUNCTION close_payer() RETURNS trigger AS $$
            BEGIN
                UPDATE accounts SET status = 'closed' WHERE account_id = NEW.account_id;
                RETURN NEW;
            END $$ LANGUAGE plpgsql"""))
        await conn.execute(text("""
            CREATE TRIGGER close_payer AFTER INSERT ON journal FOR EACH ROW
            WHEN (NEW.account_id = 'acc-ot-alice' AND NEW.amount_minor < 0)
            EXECUTE FUNCTION close_payer()"""))
    await system.ledger.close_account(f"acc-{CAROL}")
    try:
        reply = await system.transfer(ALICE, f"acc-{CAROL}", 4_321)
    finally:
        async with system.ledger.engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER close_payer ON journal"))
    assert reply["status"] == "error" and reply["data"]["state"] == "MANUAL_REVIEW", reply
    return str(reply["data"]["transferId"])


@pytest.mark.integration
async def test_a_manual_review_transfer_is_listed_logged_and_resolved_once(
        system: System) -> None:
    assert system.ledger is not None
    port = system.settings.web_port
    before = await scrape(system, port)
    alice_before = (await system.balances(f"acc-{ALICE}"))[f"acc-{ALICE}"]
    assert alice_before is not None
    transfer_id = await _manual_review_transfer(system)
    assert (await system.balances(f"acc-{ALICE}"))[f"acc-{ALICE}"] == alice_before - 4_321

    # the state change logged at WARNING, a JSON line carrying the ids
    def warned() -> dict[str, Any] | None:
        return next((line for line in json_lines(system.logdir / "worker.log")
                     if line.get("transferId") == transfer_id
                     and "MANUAL_REVIEW" in line["message"]), None)

    line = await wait_for(warned, timeout=30, what="the MANUAL_REVIEW log line")
    assert line["level"] == "WARNING", line
    assert line["operatorId"] == ALICE and line["requestId"], line
    assert line["logger"] == "app.saga"
    after = await scrape(system, port)
    assert sample(after, "bizcenter_transfers_total", kind="transfer",
                  outcome="MANUAL_REVIEW") == sample(
        before, "bizcenter_transfers_total", kind="transfer", outcome="MANUAL_REVIEW") + 1

    async def open_in_review() -> bool:  # computed when scraped, at most every 5 s
        return sample(await scrape(system, port), "bizcenter_open_sagas",
                      state="MANUAL_REVIEW") == 1

    await wait_for(open_in_review, timeout=30, what="bizcenter_open_sagas{MANUAL_REVIEW}")

    # sagas list / show
    listed = bizcenter(system, "sagas", "list", "--state", "MANUAL_REVIEW", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["transferId"] for r in rows] == [transfer_id], rows
    assert rows[0]["amountMinor"] == 4_321 and rows[0]["fromAccountId"] == f"acc-{ALICE}"
    assert "otp_digest" not in listed.stdout and "otpDigest" not in listed.stdout
    old_only = bizcenter(system, "sagas", "list", "--state", "MANUAL_REVIEW",
                         "--older-than", "1h", "--json")
    assert old_only.returncode == 0 and json.loads(old_only.stdout) == []
    table = bizcenter(system, "sagas", "list", "--state", "MANUAL_REVIEW")
    assert transfer_id in table.stdout and "1 saga(s)" in table.stdout, table.stdout
    assert bizcenter(system, "sagas", "show", str(uuid.uuid4())).returncode == 1

    # resolve: the payer's account reopened, the amount refunded through the saga, once
    async with system.ledger.engine.begin() as conn:
        await conn.execute(text("UPDATE accounts SET status = 'open' WHERE account_id = :a"),
                           {"a": f"acc-{ALICE}"})
    first = bizcenter(system, "sagas", "resolve", transfer_id, "--refund", "--operator",
                      "ops-anna", "--reason", "payer account reopened", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(first.stdout)["outcome"] == "FAILED", first.stdout
    assert (await system.balances(f"acc-{ALICE}"))[f"acc-{ALICE}"] == alice_before

    again = bizcenter(system, "sagas", "resolve", transfer_id, "--refund", "--operator",
                      "ops-anna", "--reason", "payer account reopened", "--json",
                      "--wait", "5")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["outcome"] in ("already resolved", "FAILED"), again.stdout
    other = bizcenter(system, "sagas", "resolve", transfer_id, "--complete", "--operator",
                      "ops-anna", "--reason", "changed my mind", "--wait", "5")
    assert other.returncode == 1, other.stdout + other.stderr
    assert (await system.balances(f"acc-{ALICE}", f"acc-{CAROL}")) == {
        f"acc-{ALICE}": alice_before, f"acc-{CAROL}": OPENING}
    assert await system.money_moved_more_than_once() == []
    async with system.ledger.engine.connect() as conn:
        refunds = (await conn.execute(text(
            "SELECT count(*) FROM processed_commands WHERE transfer_id = :t "
            "AND type = 'refund' AND result->>'type' = 'refunded'"), {"t": transfer_id})
        ).scalar_one()
    assert refunds == 1

    # resolve read FAILED in the saga's row, which is written before the saga's outputs
    # are sent: the FAILED event follows it onto business.transfer-events
    def shown_until_failed() -> subprocess.CompletedProcess[str] | None:
        shown = bizcenter(system, "sagas", "show", transfer_id, "--json")
        assert shown.returncode == 0, shown.stderr
        events = json.loads(shown.stdout)["transferEvents"]
        return shown if events and events[-1]["state"] == "FAILED" else None

    shown = await wait_for(shown_until_failed, timeout=30, interval=0.5,
                           what="the FAILED transfer event")
    saga = json.loads(shown.stdout)
    assert saga["saga"]["state"] == "FAILED"
    assert saga["versions"] == [saga["saga"]]  # one stored version: the row
    assert (saga["saga"]["resolvedBy"], saga["saga"]["resolutionReason"]) == (
        "ops-anna", "payer account reopened")
    states = [e["state"] for e in saga["transferEvents"]]
    assert states[-3:] == ["MANUAL_REVIEW", "REFUNDING", "FAILED"], states
    assert "otpDigest" not in shown.stdout and "otp_digest" not in shown.stdout
    await wait_for(lambda: _clearing_zero(system), timeout=30, what="clearing back to 0")
    resolved = await scrape(system, port)
    assert sample(resolved, "bizcenter_resolutions_total", action="refund",
                  outcome="FAILED") == 1


async def _clearing_zero(system: System) -> bool:
    samples = await scrape(system, system.settings.account_center_web_port)
    return sample(samples, "bizcenter_clearing_minor", currency="USD") == 0 and sample(
        samples, "bizcenter_reconciliation_check_ok", check="clearing account zero") == 1


@pytest.mark.integration
async def test_the_live_reconciliation_alarms_on_a_drift(system: System) -> None:
    assert system.ledger is not None
    port = system.settings.account_center_web_port
    account = f"acc-{BOB}"
    async with system.ledger.engine.begin() as conn:  # behind the account center's back
        await conn.execute(text("UPDATE accounts SET balance_minor = balance_minor + 7 "
                                "WHERE account_id = :a"), {"a": account})
    try:
        async def drifted() -> bool:
            samples = await scrape(system, port)
            return sample(samples, "bizcenter_reconciliation_drift_minor",
                          currency="USD") == 7

        await wait_for(drifted, timeout=30, what="the drift gauge")
        samples = await scrape(system, port)
        assert sample(samples, "bizcenter_reconciliation_check_ok",
                      check="balances = journal") == 0

        def alarm() -> dict[str, Any] | None:
            return next((line for line in json_lines(system.logdir / "account-center.log")
                         if "RECONCILIATION DRIFT" in line["message"]), None)

        line = await wait_for(alarm, timeout=30, what="the drift alarm")
        assert line["level"] == "ERROR", line
        assert account in line["message"] and "+7" in line["message"], line

        # the worker owning acc-bob: its query table serves another balance than the ledger
        async def mismatched() -> bool:
            samples = await scrape(system, system.settings.web_port)
            return sample(samples, "bizcenter_query_balance_mismatches") == 1

        await wait_for(mismatched, timeout=30, what="the query balance mismatch gauge")

        def worker_alarm() -> dict[str, Any] | None:
            return next((line for line in json_lines(system.logdir / "worker.log")
                         if "QUERY BALANCE MISMATCH" in line["message"]), None)

        line = await wait_for(worker_alarm, timeout=30, what="the worker's mismatch alarm")
        assert line["level"] == "ERROR" and account in line["message"], line
        assert "(+7)" in line["message"], line
    finally:
        async with system.ledger.engine.begin() as conn:
            await conn.execute(text("UPDATE accounts SET balance_minor = balance_minor - 7 "
                                    "WHERE account_id = :a"), {"a": account})

    def balanced_again() -> bool:
        return any("balanced again" in line["message"]
                   for line in json_lines(system.logdir / "account-center.log"))

    await wait_for(balanced_again, timeout=30, what="the all-clear")
    samples = await scrape(system, port)
    assert sample(samples, "bizcenter_reconciliation_drift_minor", currency="USD") == 0

    async def matched() -> bool:
        samples = await scrape(system, system.settings.web_port)
        return sample(samples, "bizcenter_query_balance_mismatches") == 0

    await wait_for(matched, timeout=30, what="the query tables to match again")


# --------------------------------------------------------------------------------------
# bizcenter sagas without a worker: rows written straight into the table
# --------------------------------------------------------------------------------------

#: What ``sagas list --json`` shows of a saga, and nothing else.
SAGA_KEYS = {"transferId", "kind", "state", "code", "seq", "operatorId", "fromAccountId",
             "toAccountId", "amountMinor", "currency", "homePartition", "createdAt",
             "updatedAt", "lastTrigger", "commandAttempts", "nextRetryAt", "resolutionCount",
             "resolutionAction", "resolvedBy", "resolutionReason"}
OTP_DIGEST = "0123456789abcdef-an-otp-digest-never-shown"


@dataclass(frozen=True)
class SagaTable:
    """A schema with the business DDL (the sagas table) and the topics of a run of its
    own; no worker."""

    settings: Settings
    store: PostgresBusinessStore
    now: float

    def env(self, **changes: str) -> dict[str, str]:
        return {**child_env(self.settings), **changes}

    async def insert(self, *sagas: Saga) -> None:
        """The rows as the saga engine writes them (its columns, the orjson of
        ``saga_to_dict`` as bytea), by SQL: not through the code under test."""
        async with self.store.engine.begin() as conn:  # search_path: the schema
            await conn.execute(text(
                "INSERT INTO sagas (transfer_id, home_partition, operator_id, state,"
                " deadline, updated_at, saga) VALUES (:t, :p, :o, :s, :d, :u, :j)"), [{
                    "t": g.transfer.transfer_id, "p": g.transfer.home_partition,
                    "o": g.transfer.operator_id, "s": g.state.value, "d": g.deadline(),
                    "u": g.updated_at, "j": orjson.dumps(saga_to_dict(g)),
                } for g in sagas])

    async def publish_event(self, saga: Saga, seq: int, state: str,
                            previous: str | None) -> None:
        """A transfer event of ``saga`` as the worker publishes it (its key, its
        partition)."""
        t = saga.transfer
        event = TransferEvent(
            event_id=f"{t.transfer_id}:{seq}", transfer_id=t.transfer_id, seq=seq,
            state=state, operator_id=t.operator_id, from_account_id=t.from_account_id,
            to_account_id=t.to_account_id, amount_minor=t.amount_minor, currency=t.currency,
            occurred_at=datetime.fromtimestamp(saga.created_at + seq, UTC),
            previous_state=previous)
        key = t.transfer_id.encode()
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                    acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                self.settings.topic("business.transfer-events"),
                orjson.dumps(event.to_wire()), key=key,
                partition=partition_of(key, self.settings.topic_partitions))
        finally:
            await producer.stop()


def stored_saga(name: str, state: State, *, age: float, now: float, partition: int = 1,
                **changes: Any) -> Saga:
    transfer = Transfer(
        transfer_id=f"{name}-{uuid.uuid4()}", operator_id="ot-alice", idempotency_key=name,
        fingerprint="fp", from_account_id="acc-ot-alice", to_account_id="acc-ot-bob",
        amount_minor=4_321, currency="USD", note=None, home_partition=partition)
    return Saga(transfer=transfer, state=state, seq=3, created_at=now - age - 5,
                updated_at=now - age, origin_request_id=f"r-{name}", reply_to=f"r-{name}",
                reply_type="transferConfirm", otp_digest=OTP_DIGEST, **changes)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def table(kafka_bootstrap: str, database_url: str) -> AsyncIterator[SagaTable]:
    run = "t" + uuid.uuid4().hex[:10]  # not the system's: its worker writes no row here
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, database_url=database_url,
        topic_prefix=f"{run}.", topic_partitions=3, app_id=f"{run}-worker",
        db_schema=f"{run}_biz", account_center_db_schema=f"{run}_ac",
        environment="development")
    store = PostgresBusinessStore.from_settings(settings)
    try:
        await ensure_topics(settings)
        await store.migrate()
        yield SagaTable(settings, store, time.time())
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE'))
        await store.close()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            mine = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()


@pytest.mark.integration
async def test_sagas_list_and_show_read_the_table(table: SagaTable) -> None:
    now = table.now
    old_review = stored_saga("old-review", State.MANUAL_REVIEW, age=7_200, now=now,
                             code="REFUND_REJECTED")
    new_review = stored_saga("new-review", State.MANUAL_REVIEW, age=60, now=now)
    debiting = stored_saga("debiting", State.DEBITING, age=30, now=now,
                           next_retry_at=now + 5, command_attempts=1)
    done = stored_saga("done", State.COMPLETED, age=3 * 86_400, now=now)
    await table.insert(old_review, new_review, debiting, done)
    ids = {g.transfer.transfer_id: g for g in (old_review, new_review, debiting, done)}

    def listed(*args: str) -> list[str]:
        result = run_cli(table.env(), "sagas", "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        assert OTP_DIGEST not in result.stdout
        rows = json.loads(result.stdout)
        for row in rows:
            assert set(row) == SAGA_KEYS, row
        return [r["transferId"] for r in rows]

    # every saga, the least recently updated first; then the filters
    order = [done, old_review, new_review, debiting]
    assert listed() == [g.transfer.transfer_id for g in order]
    assert listed("--state", "MANUAL_REVIEW") == [old_review.transfer.transfer_id,
                                                  new_review.transfer.transfer_id]
    assert listed("--state", "MANUAL_REVIEW", "--older-than", "1h") == [
        old_review.transfer.transfer_id]
    assert listed("--older-than", "10m") == [done.transfer.transfer_id,
                                             old_review.transfer.transfer_id]
    assert listed("--state", "DEBITING", "--older-than", "1h") == []
    assert listed("--state", "NO_SUCH_STATE") == []

    # the JSON row is the saga as stored
    full = run_cli(table.env(), "sagas", "list", "--json", "--state", "DEBITING")
    (row,) = json.loads(full.stdout)
    assert row == {
        "transferId": debiting.transfer.transfer_id, "kind": "transfer", "state": "DEBITING",
        "code": None, "seq": 3, "operatorId": "ot-alice", "fromAccountId": "acc-ot-alice",
        "toAccountId": "acc-ot-bob", "amountMinor": 4_321, "currency": "USD",
        "homePartition": 1, "createdAt": iso(debiting.created_at),
        "updatedAt": iso(debiting.updated_at), "lastTrigger": "", "commandAttempts": 1,
        "nextRetryAt": iso(now + 5), "resolutionCount": 0, "resolutionAction": None,
        "resolvedBy": None, "resolutionReason": None}

    # the table, and --limit (the oldest first; stderr says more match)
    shown = run_cli(table.env(), "sagas", "list", "--state", "MANUAL_REVIEW")
    assert shown.returncode == 0, shown.stderr
    assert "2 saga(s)" in shown.stdout and "REFUND_REJECTED" in shown.stdout, shown.stdout
    assert old_review.transfer.transfer_id in shown.stdout
    limited = run_cli(table.env(), "sagas", "list", "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert "2 saga(s)" in limited.stdout and "more sagas match" in limited.stderr
    assert debiting.transfer.transfer_id not in limited.stdout
    exact = run_cli(table.env(), "sagas", "list", "--limit", "4")
    assert "4 saga(s)" in exact.stdout and exact.stderr == ""

    # show: the row and the transfer's events (published out of order: shown by seq)
    for seq, state, previous in [(2, "DEBITING", "AWAITING_OTP"), (1, "AWAITING_OTP", None)]:
        await table.publish_event(debiting, seq, state, previous)
    result = run_cli(table.env(), "sagas", "show", debiting.transfer.transfer_id, "--json")
    assert result.returncode == 0, result.stderr
    assert OTP_DIGEST not in result.stdout
    body = json.loads(result.stdout)
    assert body["saga"] == row and body["versions"] == [row]
    assert [(e["seq"], e["state"]) for e in body["transferEvents"]] == [
        (1, "AWAITING_OTP"), (2, "DEBITING")]
    text_form = run_cli(table.env(), "sagas", "show", debiting.transfer.transfer_id)
    assert text_form.returncode == 0, text_form.stderr
    assert "AWAITING_OTP -> DEBITING" in text_form.stdout, text_form.stdout
    assert OTP_DIGEST not in text_form.stdout
    no_events = run_cli(table.env(), "sagas", "show", done.transfer.transfer_id, "--json")
    assert no_events.returncode == 0, no_events.stderr
    assert json.loads(no_events.stdout)["transferEvents"] == []

    # a purged saga (no row) whose events remain: shown, its saga null
    purged = stored_saga("purged", State.COMPLETED, age=10, now=now)
    await table.publish_event(purged, 1, "AWAITING_OTP", None)
    gone = run_cli(table.env(), "sagas", "show", purged.transfer.transfer_id, "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["saga"] is None
    assert json.loads(gone.stdout)["versions"] == []

    # not found: exit 1
    missing = run_cli(table.env(), "sagas", "show", str(uuid.uuid4()))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "no saga" in missing.stderr
    assert set(ids) <= set(listed())


@pytest.mark.integration
async def test_sagas_exit_2_when_a_store_cannot_be_read(table: SagaTable) -> None:
    nowhere = "postgresql+asyncpg://nobody:nothing@127.0.0.1:9/none"
    for args in (("sagas", "list"), ("sagas", "show", "t-1")):
        result = run_cli(table.env(DATABASE_URL=nowhere), *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert "PostgreSQL" in result.stderr and "Traceback" not in result.stderr, (
            result.stderr)
        assert "nothing@" not in result.stderr  # no password shown
    # a schema without the table (never migrated): unreadable, not empty
    bare = run_cli(table.env(BIZ_DB_SCHEMA=f"{table.settings.db_schema}_none"),
                   "sagas", "list")
    assert bare.returncode == 2, bare.stderr
    assert "UndefinedTable" in bare.stderr, bare.stderr
    # the events' store: Kafka unreachable
    no_kafka = run_cli(table.env(KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9"), "sagas", "show",
                       "t-1")
    assert no_kafka.returncode == 2, no_kafka.stderr
    assert "Kafka" in no_kafka.stderr and "Traceback" not in no_kafka.stderr
    # resolve reads the saga first: nothing sent
    resolve = run_cli(table.env(DATABASE_URL=nowhere), "sagas", "resolve", "t-1",
                      "--refund", "--operator", "ops-anna", "--reason", "why", "--wait", "1")
    assert resolve.returncode == 2, resolve.stderr
    assert "PostgreSQL" in resolve.stderr


@pytest.mark.integration
async def test_sagas_resolve_decides_from_the_row_and_sends_to_the_home_partition(
        table: SagaTable) -> None:
    """No worker here: what is resolvable is read from the row, the signed input lands on
    the saga's home partition of business.saga-inputs, and its outcome, never seen, is
    exit 3. (The outcome read from the row: the system test above.)"""
    now = table.now
    review = stored_saga("resolvable", State.MANUAL_REVIEW, age=120, now=now, partition=2)
    moving = stored_saga("moving", State.CREDITING, age=5, now=now)
    await table.insert(review, moving)

    def resolve(transfer_id: str, *more: str) -> subprocess.CompletedProcess[str]:
        return run_cli(table.env(), "sagas", "resolve", transfer_id, "--refund",
                       "--operator", "ops-anna", "--reason", "payer account reopened",
                       "--json", *more)

    not_review = resolve(moving.transfer.transfer_id)
    assert not_review.returncode == 1, not_review.stdout + not_review.stderr
    assert json.loads(not_review.stdout)["outcome"] == "not in MANUAL_REVIEW (state CREDITING)"
    unknown = resolve(str(uuid.uuid4()))
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["outcome"] == "not found"

    sent = resolve(review.transfer.transfer_id, "--wait", "1")
    assert sent.returncode == 3, sent.stdout + sent.stderr
    answer = json.loads(sent.stdout)
    assert (answer["outcome"], answer["resolution"], answer["homePartition"]) == (
        "sent", 1, 2), answer
    again = resolve(review.transfer.transfer_id, "--wait", "0")
    assert again.returncode == 3, again.stdout + again.stderr
    assert json.loads(again.stdout)["resolutionId"] == answer["resolutionId"]  # the same input

    inputs = [r for r in await read_topic(
        table.settings, table.settings.topic("business.saga-inputs"), partitions=[2],
        keep=lambda k: k == review.transfer.transfer_id.encode())]
    assert len(inputs) == 2, inputs
    for record in inputs:
        item = SagaInput.model_validate_json(record.value or b"")
        assert item.kind == "operatorResolution" and item.resolution is not None
        resolution = item.resolution
        assert (resolution.resolution_id, resolution.number, resolution.action) == (
            answer["resolutionId"], 1, "refund")
        assert resolution_signed(
            table.settings.operator_secret.get_secret_value().encode(), resolution.signature,
            transfer_id=resolution.transfer_id, resolution_id=resolution.resolution_id,
            number=resolution.number, action=resolution.action,
            operator=resolution.operator, reason=resolution.reason)
