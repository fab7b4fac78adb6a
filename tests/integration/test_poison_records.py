"""Issue 9, the records that stopped the business or moved money twice, against the real
broker and PostgreSQL with the worker, the account center and the funding provider running
as the processes an operator runs: each poison record gets its error reply or its dead
letter, the processes keep serving, dead letters are bounded and clean, and a confirm whose
record key is not its idempotency key changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from conftest import wait_for
from sqlalchemy import text
from system import PIN, System

from agents.saga_engine import saga_group
from reference.gateway_client import TopicTail

pytestmark = pytest.mark.integration

DLQ_LIMIT = 2048  # bytes: a dead letter is coordinates, a digest and a bounded reason


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("poison"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dlq(system: System) -> AsyncIterator[TopicTail]:
    tail = TopicTail(system.settings, system.settings.topic("business.dlq"),
                     from_beginning=True)
    await tail.start()
    try:
        yield tail
    finally:
        await tail.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def producer(system: System) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer, as another team's or a broken client would be."""
    prod = AIOKafkaProducer(bootstrap_servers=system.settings.kafka_bootstrap_servers,
                            max_request_size=2 * 1024 * 1024, acks="all")
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


def _user() -> str:
    return "u" + uuid.uuid4().hex[:8]


async def _debits_of(system: System, transfer_id: str) -> int:
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT count(*) FROM processed_commands WHERE transfer_id = :t AND type = 'debit'"
        ), {"t": transfer_id})
        return int(rows.scalar_one())


def _alive(system: System) -> dict[str, int | None]:
    return {name: proc.poll() for name, proc in system.processes.items()}


async def _letter_of(dlq: TopicTail, topic: str, value: bytes,
                     timeout: float = 60) -> dict[str, Any]:
    digest = hashlib.sha256(value).hexdigest()
    found: dict[str, Any] = await dlq.wait(lambda msgs: next(
        (v for _k, v in msgs
         if v.get("sourceTopic") == topic and v.get("valueSha256") == digest), None),
        timeout)
    return found


async def test_a_confirm_keyed_otherwise_changes_nothing_then_moves_money_once(
        system: System) -> None:
    """Measured before issue 9: a null-key confirm started a saga on whatever partition it
    landed on, and the same confirm keyed properly a second one: two debits."""
    assert system.client is not None and system.client._producer is not None
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=100_000)
    await system.add_user(payee, balance=0)
    init = await system.init(payer, f"acc-{payee}", 2_500)
    idem = str(uuid.uuid4())
    env = system.client.envelope("transferConfirm", payer, system.token(payer),
                                 {"transferToken": init["data"]["transferToken"], "pin": PIN},
                                 idempotency_key=idem)
    rid = env["requestId"]
    for key in (None, b"another-key"):
        before = len(system.client.replies.get(rid, []))
        await system.client._producer.send_and_wait(
            system.settings.topic("business.commands"), json.dumps(env).encode(), key=key)
        reply = await system.client.next_reply(rid, after=before, timeout=60)
        assert (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST"), reply
    transfer_id = str(uuid.uuid5(uuid.UUID("6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01"),
                                 f"{payer}\x1f{idem}"))
    assert await _debits_of(system, transfer_id) == 0
    # The same confirm (same requestId), keyed properly: the transfer, once.
    await system.client.send(env)
    done = await system.client.wait(lambda _: next(
        (r for r in system.client.replies[rid] if r["status"] == "ok"), None), 60)  # type: ignore[union-attr]
    assert done["data"]["state"] == "COMPLETED"
    assert await _debits_of(system, transfer_id) == 1
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 97_500, f"acc-{payee}": 2_500}


async def test_poison_records_are_answered_or_dead_lettered_and_nothing_stops(
        system: System, dlq: TopicTail, producer: AIOKafkaProducer) -> None:
    assert system.client is not None
    topic = system.settings.topic
    token = system.token("someone")
    uid = uuid.uuid4()
    commands = topic("business.commands")
    big_with_id = (b'{"requestId": "r-800k", "type": "transferInit", "payload": "'
                   + b"x" * 800_000 + b'"}')
    poison = {
        # an 800 KB undecodable command: its dead letter was base64 of it, over 1 MB
        ("business.commands", b"k-800k"): b"\xff" + b"garbage " * 100_000,
        # a 600 KB requestId: the error reply echoed it
        ("business.commands", b"k-600k"): json.dumps(
            {"requestId": "r" * 600_000, "type": "transferInit"}).encode(),
        # a non-JSON record carrying a PIN and an access token (trailing comma)
        ("business.commands", b"k-pin"): (
            f'{{"requestId": "r-pin", "pin": "{PIN}", "accessToken": "{token}",}}'.encode()),
        # foreign ids shaped like ours, naming partitions that do not exist
        ("account.events", b"acc-x"): json.dumps({
            "commandId": f"{uid}:credit:2024", "type": "credited", "accountId": "acc-x",
            "amountMinor": 1, "balanceAfterMinor": 1,
            "occurredAt": "2030-01-02T00:00:00Z"}).encode(),
        ("funding.events", b"c-x"): json.dumps(
            {"chargeId": f"{uid}:charge:2024", "status": "captured"}).encode(),
        ("funding.events", b"c-y"): json.dumps(
            {"chargeId": "payroll-2024:charge:1", "status": "captured"}).encode(),
        # the account center's and the funding provider's own topics
        ("account.commands", b"acc-x"): b"\xff" + b"garbage " * 100_000,
        ("funding.commands", b"c-z"): f'{{"pin": "{PIN}",'.encode(),
    }
    for (name, key), value in poison.items():
        await producer.send(topic(name), value, key=key)
    # another team's event (its commandId is not ours): counted, not relayed, no dead letter
    await producer.send(topic("account.events"), json.dumps({
        "commandId": "payroll-2024:credit:2024", "type": "credited", "accountId": "acc-x",
        "amountMinor": 1, "balanceAfterMinor": 2,
        "occurredAt": "2030-01-02T00:00:00Z"}).encode(), key=b"acc-x")
    await producer.send(commands, big_with_id, key=b"r-800k")
    await producer.flush()

    # An 800 KB command whose requestId is readable in its first bytes: INVALID_REQUEST.
    reply = await system.final("r-800k")
    assert (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST")
    assert "too large" in reply["message"]
    # Every other poison record: its dead letter, bounded, no value, no secret.
    for (name, _key), value in poison.items():
        letter = await _letter_of(dlq, topic(name), value)
        assert letter["valueSize"] == len(value) and "valueB64" not in letter, letter
    for _key, letter in dlq.messages:
        raw = json.dumps(letter)
        assert len(raw) < DLQ_LIMIT and "valueB64" not in letter
        assert PIN not in raw and token not in raw and "eyJ" not in raw
    assert "r-pin" not in system.client.replies  # not JSON: no readable requestId
    # The processes keep serving: a transfer completes, nobody restarted.
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=10_000)
    await system.add_user(payee, balance=0)
    done = await system.transfer(payer, f"acc-{payee}", 1_234)
    assert done["status"] == "ok" and done["data"]["state"] == "COMPLETED", done
    assert set(_alive(system).values()) == {None}, _alive(system)


async def test_every_record_is_passed_not_stalled_on(system: System,
                                                     producer: AIOKafkaProducer) -> None:
    """After the poison above, every consumer group has committed every record of its
    topics: no partition is stuck behind a record it cannot handle."""
    s = system.settings
    await producer.flush()
    groups = {
        saga_group(s): [s.topic(t) for t in ("business.commands", "account.events",
                                             "funding.events")],
        s.account_center_group: [s.topic("account.commands")],
        s.funding_provider_group: [s.topic("funding.commands")],
    }
    for group, topics in groups.items():
        await wait_for(lambda g=group, t=topics: _no_lag(system, g, t), timeout=90,
                       interval=0.5, what=f"{group} to commit past every record")
    assert set(_alive(system).values()) == {None}


async def _no_lag(system: System, group: str, topics: list[str]) -> bool:
    return await system.group_lag(group, topics) == 0


def test_logs_hold_no_secret(system: System) -> None:
    logs = "".join(system.log_tail(name, 100_000) for name in system.processes)
    assert logs and PIN not in logs and "eyJ" not in logs
    # The worker never crashed nor restarted on any of these records.
    assert "Crashed reason" not in system.log_tail("worker", 100_000)


async def test_records_keep_flowing_while_the_poison_is_replayed(
        system: System, producer: AIOKafkaProducer) -> None:
    """The same poison again and again, interleaved with real work: each real request is
    answered; nothing waits for the poison."""
    assert system.client is not None
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=50_000)
    await system.add_user(payee, balance=0)
    poison = b"\xff" + b"garbage " * 100_000
    sends = [producer.send(system.settings.topic("business.commands"), poison, key=b"p")
             for _ in range(20)]
    await asyncio.gather(*sends)
    replies = await asyncio.gather(*(system.init(payer, f"acc-{payee}", 100 + i)
                                     for i in range(10)))
    assert {r["status"] for r in replies} == {"ok"}
