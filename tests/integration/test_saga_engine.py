"""The saga engine's guarantees (agents/saga_engine.py), on the real system: what a *cycle*
(decide every record, flush the sagas and saved replies in one transaction, send every
output, commit) must keep true that the per-record tests elsewhere cannot show.

- duplicates inside one cycle see each other (the write buffer is read before the table);
- a poison record in the middle of a cycle costs only itself, and the cycle commits past it;
- a crash between the flush and the sends (fault injected into the worker process only)
  loses no answer and moves no money twice;
- a replay of ``business.commands`` from offset 0 in the engine's own consumer group
  (``<app_id>-sagas``) moves no money and answers every request as before.

Whether records really shared a cycle is not assumed: a ``sitecustomize`` on the worker's
``PYTHONPATH`` (written by this module) logs the coordinates of every cycle's records, and
the tests check it. The same hook, gated by an environment variable, ends the process with
``os._exit`` right after ``PostgresSagaState.write`` returns for the Nth cycle that carries
records of a given topic.

One system for the module; the tests run in file order, each on its own users and ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from conftest import wait_for  # type: ignore[import-not-found, unused-ignore]
from sqlalchemy import text
from system import PIN, System  # type: ignore[import-not-found, unused-ignore]

from agents.saga_engine import saga_group
from app.adapters.saga_state import PostgresSagaState
from app.domain import transfer_saga as saga_core
from app.transfers.ids import transfer_id_for
from events.consumer_groups import group_progress
from reference.gateway_client import GatewayClient, TopicTail

pytestmark = pytest.mark.integration

CURRENCY = "USD"
WRONG_PIN = "11112222"
#: The exit code of the injected crash: nothing else in the worker exits with it.
FAULT_EXIT_CODE = 86

SITECUSTOMIZE = '''
"""Test-only fault injection (tests/integration/test_saga_engine.py), in the worker only.

FAULT_SAGA_CYCLE_LOG=<file>: every cycle of the saga engine that carries records appends
one JSON line {"pid", "records": [[topic, partition, offset], ...]} before it is decided.
FAULT_EXIT_AFTER_FLUSH_CYCLE=N (with FAULT_EXIT_CYCLE_TOPIC=<topic suffix>, optional):
in the Nth cycle carrying records (of that topic), the process ends with os._exit(86)
right after PostgresSagaState.write returns for the batch that cycle sealed: the sagas
and replies written, no output sent, no offset committed.
FAULT_HOLD_WRITE_CYCLE=N (with FAULT_EXIT_CYCLE_TOPIC, and FAULT_HOLD_WRITE_FILE=<file>):
the write of the batch the Nth such cycle sealed waits until <file> exists; every seal
and the hold's start and end are logged to FAULT_HOLD_LOG=<file> (JSON lines)."""
import json
import os

_log = os.environ.get("FAULT_SAGA_CYCLE_LOG", "")
_exit_at = int(os.environ.get("FAULT_EXIT_AFTER_FLUSH_CYCLE", "0"))
_hold_at = int(os.environ.get("FAULT_HOLD_WRITE_CYCLE", "0"))
_hold_file = os.environ.get("FAULT_HOLD_WRITE_FILE", "")
_hold_log = os.environ.get("FAULT_HOLD_LOG", "")
_topic = os.environ.get("FAULT_EXIT_CYCLE_TOPIC", "")
if _log or _exit_at or _hold_at:
    import asyncio

    from agents import saga_engine as _engine
    from app.adapters import saga_state as _state

    _seen = {"cycles": 0, "armed": False, "hold": False}
    _armed_batches = []
    _held_batches = []

    def _note(event, **fields):
        if _hold_log:
            with open(_hold_log, "a") as out:
                out.write(json.dumps({"pid": os.getpid(), "event": event, **fields}) + "\\n")

    _cycle = _engine.SagaEngine._cycle
    _wait = _engine.SagaEngine._wait_completions
    _seal = _state.PostgresSagaState.seal
    _write = _state.PostgresSagaState.write

    async def _logged_cycle(self, batch):
        records = [[tp.topic, tp.partition, r.offset]
                   for tp, rs in batch.items() for r in rs]
        if records and _log:
            with open(_log, "a") as out:
                out.write(json.dumps({"pid": os.getpid(), "records": records}) + "\\n")
        _seen["records"] = records
        if records and (_exit_at or _hold_at) and any(t.endswith(_topic)
                                                      for t, _p, _o in records):
            _seen["cycles"] += 1
            _seen["armed"] = _seen["cycles"] == _exit_at
            _seen["hold"] = _seen["cycles"] == _hold_at
        try:
            return await _cycle(self, batch)
        finally:
            _seen["armed"] = _seen["hold"] = False

    def _armed_seal(self):
        sealed = _seal(self)
        if _seen["armed"]:
            _armed_batches.append(sealed)
        if _seen["hold"]:
            _held_batches.append(sealed)
        _note("sealed", sagas=[t for t, _saga in sealed.sagas])
        return sealed

    async def _logged_wait(self):
        task = self._completion
        if task is not None and not task.done():
            _note("waits for the cycle before", records=_seen.get("records", []))
        return await _wait(self)

    async def _write_then_exit(self, sealed):
        if any(sealed is held for held in _held_batches):
            _note("held")
            while not os.path.exists(_hold_file):
                await asyncio.sleep(0.05)
            _note("released")
        await _write(self, sealed)
        if any(sealed is armed for armed in _armed_batches):
            print("FAULT INJECTION: exit right after the flush", flush=True)
            os._exit(86)

    _engine.SagaEngine._cycle = _logged_cycle
    _engine.SagaEngine._wait_completions = _logged_wait
    _state.PostgresSagaState.seal = _armed_seal
    _state.PostgresSagaState.write = _write_then_exit
    print(f"FAULT INJECTION: saga engine hooks (exit at {_exit_at} {_topic!r})", flush=True)
'''


# --------------------------------------------------------------------------------------
# the system, the hook, the producer
# --------------------------------------------------------------------------------------


def _hook_env(tmp: Path) -> dict[str, str]:
    hook = tmp / "fault-injection"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FAULT_SAGA_CYCLE_LOG": str(tmp / "cycles.jsonl")}


@dataclass
class EngineSystem(System):  # type: ignore[misc, unused-ignore]
    """The system, its worker run with the hook (``hook_env``: its environment)."""

    hook_env: dict[str, str] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EngineSystem]:
    tmp = tmp_path_factory.mktemp("saga-engine")
    # The shortest session Kafka accepts: a crashed worker's partitions come back sooner.
    sys_ = EngineSystem.build(kafka_bootstrap, database_url, isolation_id, tmp,
                              consumer_session_timeout_seconds=6.0)
    assert isinstance(sys_, EngineSystem)
    sys_.hook_env = _hook_env(tmp)
    await sys_.start(worker_env=sys_.hook_env)
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def producer(system: EngineSystem) -> AsyncIterator[AIOKafkaProducer]:
    """Records appended within the linger go out as one batch per partition (atomic in the
    log): a burst is fetched, and decided, together."""
    prod = AIOKafkaProducer(bootstrap_servers=system.settings.kafka_bootstrap_servers,
                            acks="all", linger_ms=5_000, max_batch_size=512 * 1024)
    await prod.start()
    try:
        yield prod
    finally:
        await prod.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dlq(system: EngineSystem) -> AsyncIterator[TopicTail]:
    tail = TopicTail(system.settings, system.settings.topic("business.dlq"),
                     from_beginning=True)
    await tail.start()
    try:
        yield tail
    finally:
        await tail.stop()


Coord = tuple[str, int, int]


async def _produce(producer: AIOKafkaProducer, topic: str,
                   records: list[tuple[bytes, bytes, int]]) -> list[Coord]:
    """``(key, value, partition)`` records appended in this order, sent as one batch:
    their coordinates."""
    futures = [await producer.send(topic, value, key=key, partition=partition)
               for key, value, partition in records]
    await producer.flush()
    metas = await asyncio.gather(*futures)
    return [(topic, m.partition, m.offset) for m in metas]


def _partition_of(key: bytes, partitions: int) -> int:
    """The partition the gateway's producer (Kafka's default partitioner) picks."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(key, every, every))


def _ids_on(partition: int, partitions: int, prefix: str) -> Iterator[str]:
    """Fresh ids whose records land on ``partition`` as keys."""
    while True:
        candidate = f"{prefix}-{uuid.uuid4()}"
        if _partition_of(candidate.encode(), partitions) == partition:
            yield candidate


def _envelope(system: System, command_type: str, user: str, payload: dict[str, Any], *,
              request_id: str, idem: str | None = None) -> bytes:
    env = GatewayClient.envelope(command_type, user, system.token(user), payload,
                                 idempotency_key=idem, request_id=request_id)
    return json.dumps(env).encode()


def _cycles(system: EngineSystem) -> list[dict[str, Any]]:
    path = Path(system.hook_env["FAULT_SAGA_CYCLE_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _one_cycle_held(system: EngineSystem, coords: list[Coord]) -> bool:
    wanted = {tuple(c) for c in coords}
    return any(wanted <= {tuple(r) for r in c["records"]} for c in _cycles(system))


def _cycles_holding(system: EngineSystem, coords: list[Coord]) -> list[list[Any]]:
    """For the failure message: the cycles that held any of ``coords``, with those."""
    wanted = {tuple(c) for c in coords}
    return [[r for r in c["records"] if tuple(r) in wanted]
            for c in _cycles(system) if wanted & {tuple(r) for r in c["records"]}]


# --------------------------------------------------------------------------------------
# reading the system
# --------------------------------------------------------------------------------------


def _replies(system: System, request_id: str) -> list[dict[str, Any]]:
    assert system.client is not None
    return list(system.client.replies.get(request_id, []))


def _answers(system: System, request_id: str) -> list[dict[str, Any]]:
    """The replies that are answers ("still working" is none)."""
    return [r for r in _replies(system, request_id) if r.get("code") != "IN_PROGRESS"]


async def _resend(system: System, raw: bytes, key: str) -> None:
    assert system.client is not None
    await system.client.send(raw, key=key.encode())


async def _ledger_commands(system: System, transfer_id: str) -> dict[str, int]:
    """How many debits, credits and refunds the ledger applied for ``transfer_id``."""
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT type, count(*) FROM processed_commands WHERE transfer_id = :t "
            "AND result->>'type' <> 'rejected' GROUP BY type"), {"t": transfer_id})).all()
    return {str(r[0]): int(r[1]) for r in rows}


async def _processed_commands(system: System) -> int:
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM processed_commands")))
                   .scalar_one())


async def _sagas_of(system: System, operator: str) -> list[str]:
    assert system.store is not None
    async with system.store.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT transfer_id FROM sagas WHERE operator_id = :o"), {"o": operator})).all()
    return [str(r[0]) for r in rows]


async def _saga(system: System, transfer_id: str) -> saga_core.Saga | None:
    assert system.store is not None
    return await PostgresSagaState(system.store.engine, system.settings.db_schema).saga(
        transfer_id)


async def _balance_row(system: System, account_id: str) -> int | None:
    """The balance the query side serves for ``account_id`` (its ``query_balances`` row)."""
    assert system.store is not None
    async with system.store.engine.connect() as conn:
        value = (await conn.execute(text("SELECT value FROM query_balances WHERE key = :k"),
                                    {"k": account_id})).scalar()
    return None if value is None else int(json.loads(bytes(value))["balanceMinor"])


async def _transfer_row(system: System, transfer_id: str) -> dict[str, Any] | None:
    """The details the query side serves for ``transfer_id`` (its ``query_transfers`` row)."""
    assert system.store is not None
    async with system.store.engine.connect() as conn:
        value = (await conn.execute(text("SELECT value FROM query_transfers WHERE key = :k"),
                                    {"k": transfer_id})).scalar()
    return None if value is None else dict(json.loads(bytes(value)))


async def _money(system: System) -> tuple[int, int, int]:
    """(sum of balances, clearing, seeded): conserved when the first equals the last and
    nothing is held in clearing."""
    assert system.ledger is not None
    return (await system.ledger.total_balances(CURRENCY),
            await system.ledger.clearing_balance(CURRENCY),
            await system.ledger.seeded_total(CURRENCY))


async def _assert_conserved(system: System) -> None:
    total, clearing, seeded = await _money(system)
    assert (total, clearing) == (seeded, 0), f"money not conserved: {(total, clearing, seeded)}"
    assert system.ledger is not None
    assert await system.ledger.unbalanced_commands() == []


def _completed_events(system: System, transfer_id: str) -> set[str]:
    """The distinct event ids of the transfer's COMPLETED events (re-sent ones are the
    same event)."""
    assert system.transfer_events is not None
    return {v["eventId"] for _k, v in system.transfer_events.messages
            if v.get("transferId") == transfer_id and v.get("state") == "COMPLETED"}


def _otps(system: System, transfer_id: str) -> list[str]:
    assert system.otps is not None
    return [v["otp"] for _k, v in system.otps.messages if v.get("transferId") == transfer_id]


async def _behind(system: System, group: str, topics: list[str]) -> int:
    progress = await group_progress(system.settings.kafka_bootstrap_servers, group, topics,
                                    system.settings.topic_partitions)
    return progress.behind()


async def _quiet(system: System) -> bool:
    """Every consumer of the transfer loop has committed everything written so far."""
    s = system.settings
    return (await _behind(system, saga_group(s), [s.topic("business.commands"),
                                                 s.topic("business.saga-inputs"),
                                                 s.topic("account.events")]) == 0
            and await _behind(system, s.account_center_group,
                              [s.topic("account.commands")]) == 0)


async def _committed(system: System, group: str, topic: str) -> dict[int, int]:
    """partition -> the group's committed offset on ``topic`` (-1: none)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {p: (m.offset if (m := found.get(TopicPartition(topic, p))) is not None else -1)
            for p in range(system.settings.topic_partitions)}


async def _end_offsets(system: System, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(
            [TopicPartition(topic, p) for p in range(system.settings.topic_partitions)])
    finally:
        await consumer.stop()
    return {tp.partition: int(v) for tp, v in ends.items()}


async def _reached(system: System, group: str, topic: str, ends: dict[int, int]) -> bool:
    committed = await _committed(system, group, topic)
    return all(committed[p] >= end for p, end in ends.items() if end > 0)


def _start_worker(system: EngineSystem, **fault: str) -> None:
    system.start_process("worker", env={**system.hook_env, **fault})


async def _crash_of_worker(system: System) -> int:
    """Wait for the worker to end by itself (the injected fault); its exit code."""
    proc = system.processes["worker"]
    await wait_for(lambda: proc.poll() is not None, timeout=120, interval=0.1,
                   what="the worker to crash after the flush")
    code = proc.returncode
    assert code == FAULT_EXIT_CODE, (
        f"the worker ended with {code}, not by the fault\n{system.log_tail('worker')}")
    return int(code)


# --------------------------------------------------------------------------------------
# a. duplicates inside one cycle
# --------------------------------------------------------------------------------------


async def test_duplicates_inside_one_cycle_make_one_saga_one_answer_and_move_money_once(
        system: EngineSystem, producer: AIOKafkaProducer) -> None:
    """One produce batch (so one fetch, one cycle, checked in the cycle log) holds the same
    transferConfirm three times, the same confirm under another requestId twice, and the
    same transfer token under another idempotencyKey: one saga; each copy of a request the
    same answer (OTP_REQUIRED, one transferId, one OTP sent however often), the other key
    TOKEN_ALREADY_USED. Then a second batch holds a wrong OTP, the right OTP twice and the
    right OTP under another requestId: the saga in PostgreSQL remembers the wrong attempt
    AND moved on with the right one (each record of a cycle read the version the record
    before it wrote, and the flush wrote the last), the money moved once, the balances and
    their sum are right."""
    n = system.settings.topic_partitions
    commands = system.settings.topic("business.commands")
    payer, payee = "dup-payer", "dup-payee"
    opening = {f"acc-{payer}": 100_000, f"acc-{payee}": 0}
    await system.add_user(payer, balance=opening[f"acc-{payer}"], threshold=1_000)
    await system.add_user(payee, balance=0)
    init = await system.init(payer, f"acc-{payee}", 5_000, timeout=120)
    assert init["status"] == "ok" and init["data"]["otpRequired"], init
    token = init["data"]["transferToken"]
    idem = str(uuid.uuid4())
    home = _partition_of(idem.encode(), n)
    other_idem = next(_ids_on(home, n, "other-key"))  # same lane: decided after the first
    transfer_id = transfer_id_for(payer, idem)
    confirm = {"transferToken": token, "pin": PIN}
    ra, rb, rc = (f"{x}-{uuid.uuid4()}" for x in ("ra", "rb", "rc"))
    a = _envelope(system, "transferConfirm", payer, confirm, request_id=ra, idem=idem)
    b = _envelope(system, "transferConfirm", payer, confirm, request_id=rb, idem=idem)
    c = _envelope(system, "transferConfirm", payer, confirm, request_id=rc, idem=other_idem)
    k, k2 = idem.encode(), other_idem.encode()
    burst = await _produce(producer, commands, [
        (k, a, home), (k, a, home), (k, b, home), (k, a, home), (k, b, home), (k2, c, home)])

    await wait_for(lambda: len(_replies(system, ra)) >= 3 and len(_replies(system, rb)) >= 2
                   and len(_replies(system, rc)) >= 1, timeout=60,
                   what="an answer to each copy")
    assert _one_cycle_held(system, burst), (
        "the burst was not decided in one cycle (the test proves nothing then): "
        f"{_cycles_holding(system, burst)}")
    pending = _replies(system, ra)[0]
    assert (pending["status"], pending["code"]) == ("pending", "OTP_REQUIRED"), pending
    assert pending["data"]["transferId"] == transfer_id
    assert all(r == pending for r in _replies(system, ra)), _replies(system, ra)
    for r in _replies(system, rb):
        assert {**r, "requestId": ra} == pending, r  # the same answer, to its own request
    refused = _replies(system, rc)
    assert {(r["status"], r["code"]) for r in refused} == {("error", "TOKEN_ALREADY_USED")}
    assert await _sagas_of(system, payer) == [transfer_id]
    otps = await system.otps.wait(  # type: ignore[union-attr, unused-ignore]
        lambda _: _otps(system, transfer_id), timeout=30)
    assert len(set(otps)) == 1, f"more than one OTP for one saga: {otps}"
    otp = otps[0]

    # The OTP step, also inside one cycle: wrong, right, right again, right elsewhere.
    wrong = "000000" if otp != "000000" else "111111"
    v1, v2, v3 = (f"{x}-{uuid.uuid4()}" for x in ("v1", "v2", "v3"))
    verify = [_envelope(system, "verifyOtp", payer, {"otp": code}, request_id=rid, idem=idem)
              for code, rid in ((wrong, v1), (otp, v2), (otp, v3))]
    burst2 = await _produce(producer, commands, [
        (k, verify[0], home), (k, verify[1], home), (k, verify[1], home),
        (k, verify[2], home)])
    done = await system.final(v2, timeout=60)
    assert (done["status"], done["data"]) == (
        "ok", {"transferId": transfer_id, "state": "COMPLETED"}), done
    assert _one_cycle_held(system, burst2), _cycles_holding(system, burst2)
    assert [(r["status"], r["code"], r["data"]["attemptsLeft"]) for r in _answers(system, v1)
            ] == [("error", "INVALID_OTP", system.settings.otp_max_attempts - 1)]
    assert _answers(system, v3) == [], "answered before the transfer ended"
    await wait_for(lambda: _replies(system, v3), timeout=30, what="v3 told to wait")
    await _resend(system, verify[2], idem)  # the client asks again: now it is final
    later = await system.final(v3, timeout=60)
    assert {**later, "requestId": v2} == done, later
    assert all(r == done for r in _answers(system, v2)), _answers(system, v2)

    saga = await _saga(system, transfer_id)
    assert saga is not None
    assert (saga.state, saga.otp_attempts) == (saga_core.State.COMPLETED, 1), (
        "the saga lost a decision taken in the cycle", saga.state, saga.otp_attempts)
    assert await _sagas_of(system, payer) == [transfer_id]
    assert await _ledger_commands(system, transfer_id) == {"debit": 1, "credit": 1}
    assert await system.money_moved_more_than_once() == []
    assert await system.balances_off_from(
        opening, [(f"acc-{payer}", f"acc-{payee}", 5_000)]) == {}
    await wait_for(lambda: _completed_events(system, transfer_id), timeout=30)
    assert len(_completed_events(system, transfer_id)) == 1
    await _assert_conserved(system)


# --------------------------------------------------------------------------------------
# b. a poison record in the middle of a cycle
# --------------------------------------------------------------------------------------


async def test_poison_in_the_middle_of_a_cycle_costs_only_itself_and_is_committed_past(
        system: EngineSystem, producer: AIOKafkaProducer, dlq: TopicTail) -> None:
    """One produce batch on one partition (one lane, decided in offset order, in one cycle:
    checked): an init, a 70 KB record that is not even JSON but names its requestId in its
    first bytes, a confirm, a JSON object that breaks the envelope, a record with no
    readable requestId, an init. Every valid request gets its right answer, the two
    poison records with an id their INVALID_REQUEST, the other its dead letter (at its own
    offset), and the engine's group commits the end of every partition: nothing of the
    batch is left behind or delivered again."""
    n = system.settings.topic_partitions
    s = system.settings
    commands = s.topic("business.commands")
    payer, payee = "poison-payer", "poison-payee"
    opening = {f"acc-{payer}": 50_000, f"acc-{payee}": 0}
    await system.add_user(payer, balance=opening[f"acc-{payer}"])
    await system.add_user(payee, balance=0)
    init = await system.init(payer, f"acc-{payee}", 2_500, timeout=120)
    assert init["status"] == "ok" and not init["data"]["otpRequired"], init
    idem = str(uuid.uuid4())
    home = _partition_of(idem.encode(), n)
    on_home = _ids_on(home, n, "init")
    i1, i2 = next(on_home), next(on_home)
    r_big, r_bad, r_confirm = (f"{x}-{uuid.uuid4()}" for x in ("big", "bad", "confirm"))
    to_payee = {"toAccountId": f"acc-{payee}", "amountMinor": 10, "currency": CURRENCY}
    big = (b'{"requestId": "' + r_big.encode() + b'", "type": "transferInit", "payload": "'
           + b"x" * 70_000)  # over the 64 KB limit, and cut: not JSON
    bad = json.dumps({"requestId": r_bad, "type": "transferTeleport",
                      "operatorId": payer}).encode()
    unreadable = b"\xff not json, no id " + uuid.uuid4().hex.encode()
    batch = [
        (i1.encode(), _envelope(system, "transferInit", payer, to_payee, request_id=i1), home),
        (b"big", big, home),
        (idem.encode(), _envelope(system, "transferConfirm", payer,
                                  {"transferToken": init["data"]["transferToken"],
                                   "pin": PIN}, request_id=r_confirm, idem=idem), home),
        (b"bad", bad, home),
        (b"unreadable", unreadable, home),
        (i2.encode(), _envelope(system, "transferInit", payer, to_payee, request_id=i2), home),
    ]
    coords = await _produce(producer, commands, batch)
    assert [c[2] for c in coords] == list(range(coords[0][2], coords[0][2] + len(batch)))

    for rid in (i1, i2):
        reply = await system.final(rid, timeout=60)
        assert reply["status"] == "ok" and reply["data"]["transferToken"], reply
    confirmed = await system.final(r_confirm, timeout=60)
    assert (confirmed["status"], confirmed["data"]["state"]) == ("ok", "COMPLETED"), confirmed
    for rid in (r_big, r_bad):
        reply = await system.final(rid, timeout=60)
        assert (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST"), reply
    assert "too large" in _replies(system, r_big)[0]["message"]
    digest = hashlib.sha256(unreadable).hexdigest()
    letter = await dlq.wait(lambda msgs: next(
        (v for _k, v in msgs if v.get("valueSha256") == digest), None), timeout=60)
    assert (letter["sourceTopic"], letter["sourcePartition"], letter["sourceOffset"]) == (
        commands, home, coords[4][2]), letter
    assert _one_cycle_held(system, coords), (
        "the batch was not decided in one cycle (the test proves nothing then): "
        f"{_cycles_holding(system, coords)}")

    ends = await _end_offsets(system, commands)
    assert ends[home] >= coords[-1][2] + 1
    try:
        await wait_for(lambda: _reached(system, saga_group(s), commands, ends), timeout=60,
                       interval=0.2, what="the engine to commit the end of business.commands")
    except AssertionError:
        raise AssertionError(f"committed {await _committed(system, saga_group(s), commands)}"
                             f", ends {ends}") from None
    # Each record of the batch decided once: no answer came twice (nothing redelivered).
    for rid in (i1, i2, r_big, r_bad):
        assert len(_replies(system, rid)) == 1, _replies(system, rid)
    assert await system.balances_off_from(
        opening, [(f"acc-{payer}", f"acc-{payee}", 2_500)]) == {}
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    await _assert_conserved(system)


# --------------------------------------------------------------------------------------
# b'. account events decided where they are read
# --------------------------------------------------------------------------------------


async def _saga_inputs_naming(system: System, transfer_id: str) -> int:
    """How many records of business.saga-inputs name ``transfer_id`` (relayed events)."""
    topic = system.settings.topic("business.saga-inputs")
    ends = await _end_offsets(system, topic)
    tps = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
    if not tps:
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap_servers,
                                enable_auto_commit=False)
    await consumer.start()
    found = 0
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any(await consumer.position(tp) < ends[tp.partition] for tp in tps):
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                found += sum(transfer_id.encode() in (r.value or b"") for r in records)
    finally:
        await consumer.stop()
    return found


async def test_account_events_move_their_sagas_where_they_are_read_and_bad_ones_cost_only_themselves(  # noqa: E501
        system: EngineSystem, producer: AIOKafkaProducer, dlq: TopicTail) -> None:
    """One worker owns every partition: a transfer's account events are decided where the
    engine reads them (no record on business.saga-inputs names the transfer), and a balance
    query sent right after the final reply reads the new balance (the query rows are
    written in the cycle's transaction, before the reply is sent), and so is the
    transfer's details row. Then one produce batch
    on one account.events partition: an event on another partition than its key's, one
    whose key holds U+001F, a record that is not JSON, and a valid event of another
    service's command: the three bad ones are dead-lettered at their offsets, the valid
    one is applied to the query rows, and the engine's group commits the end."""
    n = system.settings.topic_partitions
    s = system.settings
    payer, payee = "events-payer", "events-payee"
    await system.add_user(payer, balance=9_000)
    await system.add_user(payee, balance=0)
    done = await system.transfer(payer, f"acc-{payee}", 1_250)
    assert (done["status"], done["data"]["state"]) == ("ok", "COMPLETED"), done
    balance = await system.call("queryBalance", payer, {})
    assert balance["data"]["balanceMinor"] == 9_000 - 1_250, balance
    assert await _balance_row(system, f"acc-{payee}") == 1_250
    details = await _transfer_row(system, done["data"]["transferId"])
    assert details is not None and (details["state"], details["amountMinor"]) == (
        "COMPLETED", 1_250), "the details row was not written with the saga"
    assert await _saga_inputs_naming(system, done["data"]["transferId"]) == 0

    events = s.topic("account.events")
    account = next(_ids_on(0, n, "acc-ev"))
    other = next(_ids_on(1, n, "acc-ev"))
    separated = next(a for a in (f"acc-ev\x1f{uuid.uuid4()}" for _ in range(1000))
                     if _partition_of(a.encode(), n) == 0)

    def event(account_id: str, balance_after: int) -> bytes:
        return json.dumps({"commandId": f"other-service-{uuid.uuid4()}",
                           "type": "credited", "accountId": account_id, "amountMinor": 5,
                           "balanceAfterMinor": balance_after,
                           "occurredAt": "2026-11-30T12:00:00Z"}).encode()

    unreadable = b"\xff not an event " + uuid.uuid4().hex.encode()
    coords = await _produce(producer, events, [
        (other.encode(), event(other, 11), 0),            # not its key's partition
        (separated.encode(), event(separated, 12), 0),    # the tables' separator
        (b"junk", unreadable, 0),
        (account.encode(), event(account, 13), 0),        # valid, another service's
    ])
    await wait_for(lambda: _balance_row_is(system, account, 13), timeout=60, interval=0.2,
                   what="the valid event in the query rows")
    for coord, reason in ((coords[0], "partition of its key"), (coords[1], "U+001F"),
                          (coords[2], "")):
        letter = await dlq.wait(lambda msgs, c=coord: next(
            (v for _k, v in msgs if (v.get("sourceTopic"), v.get("sourcePartition"),
                                     v.get("sourceOffset")) == c), None), timeout=60)
        assert reason in str(letter.get("reason", "")), letter
    assert await _balance_row(system, other) is None
    assert await _balance_row(system, separated) is None
    assert _one_cycle_held(system, coords), (
        f"the batch was not decided in one cycle: {_cycles_holding(system, coords)}")
    ends = await _end_offsets(system, events)
    await wait_for(lambda: _reached(system, saga_group(s), events, ends), timeout=60,
                   interval=0.2, what="the engine to commit the end of account.events")
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    await _assert_conserved(system)


async def _balance_row_is(system: System, account_id: str, balance: int) -> bool:
    return await _balance_row(system, account_id) == balance


# --------------------------------------------------------------------------------------
# c. a crash between the flush and the sends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["gzip", "lz4", "snappy", "zstd"])
async def test_commands_compressed_by_the_gateway_are_answered(system: EngineSystem,
                                                               codec: str) -> None:
    """Kafka keeps a producer's compression (``compression.type=producer``): a gateway that
    compresses its commands with any of Kafka's codecs is answered (a codec the consumer
    could not decode would raise in the fetch, outside any record's guard, and stop the
    worker on every restart)."""
    payer, payee = f"codec-{codec}-payer", f"codec-{codec}-payee"
    await system.add_user(payer, balance=10_000)
    await system.add_user(payee, balance=0)
    prod = AIOKafkaProducer(bootstrap_servers=system.settings.kafka_bootstrap_servers,
                            acks="all", compression_type=codec)
    await prod.start()
    try:
        request_id = str(uuid.uuid4())
        idem = str(uuid.uuid4())
        value = _envelope(system, "transferInit", payer,
                          {"toAccountId": f"acc-{payee}", "amountMinor": 700,
                           "currency": "USD"}, request_id=request_id, idem=idem)
        await (await prod.send(system.settings.topic("business.commands"), value,
                               key=idem.encode()))
    finally:
        await prod.stop()
    reply = await system.final(request_id, timeout=120)
    assert reply["status"] == "ok" and reply["data"]["transferToken"].count(".") == 2, reply


async def test_a_crash_between_the_flush_and_the_sends_loses_no_answer_and_moves_money_once(
        system: EngineSystem, producer: AIOKafkaProducer) -> None:
    """The worker ends (``os._exit``) right after a cycle's flush, twice: first in the cycle
    of four commands (an init, a confirm, a confirm that needs an OTP, a confirm with a
    wrong PIN), then in the first cycle of account events (the debit's event, decided
    where it is read, one worker owning every partition: the credit decided, the payer's
    query rows written, neither sent nor committed). Each time the evidence that the crash
    hit the window: the sagas (and query rows) are in PostgreSQL in their new state, no
    reply and no account command of the cycle left, the offsets not committed. Restarted
    without the fault: every request is answered (the wrong PIN counted once), both
    transfers complete, each final once (one debit, one credit in the ledger, one COMPLETED
    event), no money moved twice, balances exact, their sum conserved."""
    n = system.settings.topic_partitions
    s = system.settings
    commands = s.topic("business.commands")
    plain, stepped, clumsy, payee = "crash-plain", "crash-otp", "crash-pin", "crash-payee"
    opening = {f"acc-{plain}": 40_000, f"acc-{stepped}": 40_000, f"acc-{clumsy}": 40_000,
               f"acc-{payee}": 0}
    await system.add_user(plain, balance=40_000)
    await system.add_user(stepped, balance=40_000, threshold=1_000)
    await system.add_user(clumsy, balance=40_000)
    await system.add_user(payee, balance=0)
    tokens = {}
    for user, amount in ((plain, 3_000), (stepped, 4_000), (clumsy, 500)):
        init = await system.init(user, f"acc-{payee}", amount, timeout=120)
        assert init["status"] == "ok", init
        tokens[user] = init["data"]["transferToken"]
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    await system.stop_process("worker")

    # Four commands on one partition, written while the worker is down: one cycle.
    idem_plain = str(uuid.uuid4())
    home = _partition_of(idem_plain.encode(), n)
    on_home = _ids_on(home, n, "crash")
    idem_stepped, idem_clumsy, r_init = next(on_home), next(on_home), next(on_home)
    t_plain, t_stepped = transfer_id_for(plain, idem_plain), transfer_id_for(stepped,
                                                                           idem_stepped)
    r_plain, r_stepped, r_clumsy = (f"{x}-{uuid.uuid4()}" for x in ("p", "s", "c"))
    coords = await _produce(producer, commands, [
        (r_init.encode(), _envelope(system, "transferInit", plain, {
            "toAccountId": f"acc-{payee}", "amountMinor": 700, "currency": CURRENCY},
            request_id=r_init), home),
        (idem_plain.encode(), _envelope(system, "transferConfirm", plain, {
            "transferToken": tokens[plain], "pin": PIN}, request_id=r_plain,
            idem=idem_plain), home),
        (idem_stepped.encode(), _envelope(system, "transferConfirm", stepped, {
            "transferToken": tokens[stepped], "pin": PIN}, request_id=r_stepped,
            idem=idem_stepped), home),
        (idem_clumsy.encode(), _envelope(system, "transferConfirm", clumsy, {
            "transferToken": tokens[clumsy], "pin": WRONG_PIN}, request_id=r_clumsy,
            idem=idem_clumsy), home),
    ])
    requests = (r_init, r_plain, r_stepped, r_clumsy)
    committed_before = (await _committed(system, saga_group(s), commands))[home]

    # 1. The crash after the flush of the commands' cycle.
    _start_worker(system, FAULT_EXIT_AFTER_FLUSH_CYCLE="1",
                  FAULT_EXIT_CYCLE_TOPIC="business.commands")
    await _crash_of_worker(system)
    pid = system.processes["worker"].pid
    crashed = [c for c in _cycles(system) if c["pid"] == pid]
    assert crashed and {tuple(r) for r in crashed[-1]["records"]} >= set(coords), (
        f"the crashed cycle did not hold the four commands: {crashed}")
    assert [rid for rid in requests if _replies(system, rid)] == [], "an output was sent"
    assert {t for t in (t_plain, t_stepped) if await _saga(system, t) is not None} == {
        t_plain, t_stepped}, "the flush did not write the cycle's sagas"
    assert await _ledger_commands(system, t_plain) == {}, "the debit was sent"
    assert _otps(system, t_stepped) == [], "the OTP was sent"
    assert (await _committed(system, saga_group(s), commands))[home] == committed_before

    # 2. Restarted: the commands come again; the crash after the flush of the first
    # cycle of account events (the debit's event: the saga moves to CREDITING).
    events_committed = await _committed(system, saga_group(s), s.topic("account.events"))
    _start_worker(system, FAULT_EXIT_AFTER_FLUSH_CYCLE="1",
                  FAULT_EXIT_CYCLE_TOPIC="account.events")
    await _crash_of_worker(system)
    saga = await _saga(system, t_plain)
    assert saga is not None and saga.state is saga_core.State.CREDITING, saga
    assert await _ledger_commands(system, t_plain) == {"debit": 1}, "the credit was sent"
    assert _answers(system, r_plain) == []
    assert await _committed(system, saga_group(s), s.topic("account.events")) == \
        events_committed, "the account events' offsets were committed"
    assert await _balance_row(system, f"acc-{plain}") == 40_000 - 3_000, (
        "the payer's query row was not written in the cycle's transaction")

    # 3. Restarted without the fault.
    _start_worker(system)
    done = await system.final(r_plain, timeout=120)
    assert (done["status"], done["data"]) == (
        "ok", {"transferId": t_plain, "state": "COMPLETED"}), done
    pending = await system.final(r_stepped, timeout=60)
    assert (pending["code"], pending["data"]["transferId"]) == ("OTP_REQUIRED", t_stepped)
    otp = await system.otp_for(t_stepped)
    assert set(_otps(system, t_stepped)) == {otp}, "a second OTP for one saga"
    verified = await system.call("verifyOtp", stepped, {"otp": otp}, idem=idem_stepped)
    assert (verified["status"], verified["data"]) == (
        "ok", {"transferId": t_stepped, "state": "COMPLETED"}), verified
    refused = await system.final(r_clumsy, timeout=60)
    assert (refused["code"], refused["data"]["attemptsLeft"]) == (
        "INVALID_PIN", s.pin_max_attempts - 1), refused
    init = await system.final(r_init, timeout=60)
    assert init["status"] == "ok", init
    for rid in requests:  # answered again after a crash, never differently
        answers = _answers(system, rid)
        assert answers and all(r == answers[0] for r in answers), answers

    for t in (t_plain, t_stepped):
        assert await _ledger_commands(system, t) == {"debit": 1, "credit": 1}, t
        await wait_for(lambda t=t: _completed_events(system, t), timeout=30)
        assert len(_completed_events(system, t)) == 1, t
    assert await system.money_moved_more_than_once() == []
    assert await system.balances_off_from(opening, [
        (f"acc-{plain}", f"acc-{payee}", 3_000),
        (f"acc-{stepped}", f"acc-{payee}", 4_000)]) == {}
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    await _assert_conserved(system)


# --------------------------------------------------------------------------------------
# d. a replay from offset 0
# --------------------------------------------------------------------------------------


async def test_a_replay_of_the_commands_from_offset_zero_moves_no_money_and_answers_the_same(
        system: EngineSystem) -> None:
    """With the worker stopped, the engine's group (``<app_id>-sagas``) is set back to
    offset 0 on every partition of business.commands (the consumer's commit API), and the
    worker restarted: EVERY request ever sent in this module (a completed transfer, one
    with an OTP, a wrong then right PIN, one refused for funds, and the earlier tests'
    in-cycle duplicates, mid-batch poison and crashed-after-flush requests) is answered
    again, each with exactly the reply it had (the whole reply: a re-decided init would
    carry another transfer token); no balance, ledger command or OTP is added.
    tests/integration/test_resilience.py replays every group with Kafka's tool and checks
    that some replies came again with the same status, code, transferId and state; this
    one proves the engine's own group replays from the very first record, answer for
    answer, over the histories only the engine's cycles make."""
    s = system.settings
    commands = s.topic("business.commands")
    payer, payee = "replay-payer", "replay-payee"
    await system.add_user(payer, balance=100_000, threshold=20_000)
    await system.add_user(payee, balance=0)
    assert (await system.transfer(payer, f"acc-{payee}", 1_000))["status"] == "ok"
    assert (await system.transfer(payer, f"acc-{payee}", 30_000))["status"] == "ok"
    init = await system.init(payer, f"acc-{payee}", 10)
    idem = str(uuid.uuid4())
    wrong = await system.confirm(payer, init["data"]["transferToken"], pin=WRONG_PIN,
                                 idem=idem)
    assert wrong["code"] == "INVALID_PIN", wrong
    right = await system.confirm(payer, init["data"]["transferToken"], idem=idem)
    assert right["data"]["state"] == "COMPLETED", right
    poor = await system.transfer(payer, f"acc-{payee}", 90_000)
    assert poor["code"] in ("INSUFFICIENT_FUNDS", "LIMIT_EXCEEDED"), poor

    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    assert system.client is not None and system.ledger is not None
    before = {rid: list(replies) for rid, replies in system.client.replies.items()}
    money = await _money(system)
    processed = await _processed_commands(system)
    assert system.otps is not None
    otps_sent = len(system.otps.messages)
    accounts = [f"acc-{u}" for u in (payer, payee)]
    balances = await system.balances(*accounts)

    await system.stop_process("worker")
    ends = await _end_offsets(system, commands)
    reset = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap_servers,
                             group_id=saga_group(s), enable_auto_commit=False)
    await reset.start()
    try:
        tps = [TopicPartition(commands, p) for p in range(s.topic_partitions)]
        reset.assign(tps)
        await reset.commit(dict.fromkeys(tps, 0))
    finally:
        await reset.stop()
    assert set((await _committed(system, saga_group(s), commands)).values()) == {0}
    _start_worker(system)

    await wait_for(lambda: _reached(system, saga_group(s), commands, ends), timeout=120,
                   interval=0.2, what="the engine to replay business.commands")

    def unanswered() -> list[str]:
        return [rid for rid, old in before.items() if len(_replies(system, rid)) <= len(old)]

    try:
        await wait_for(lambda: not unanswered(), timeout=60, interval=0.1,
                       what="every request answered again")
    except AssertionError:
        raise AssertionError(f"not answered again: {unanswered()}") from None
    for rid in before:
        answers = _answers(system, rid)
        assert all(r == answers[0] for r in answers), f"{rid} answered otherwise: {answers}"
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    assert await system.balances(*accounts) == balances
    assert await _money(system) == money
    assert await _processed_commands(system) == processed
    assert await system.money_moved_more_than_once() == []
    assert len(system.otps.messages) == otps_sent, "the replay sent an OTP"


# --------------------------------------------------------------------------------------
# e. the pipeline: a cycle is decided while the one before it is written
# --------------------------------------------------------------------------------------


def _hold_events(path: Path, pid: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [e for e in events if e["pid"] == pid]


async def test_a_cycle_is_decided_while_the_one_before_is_written_and_sends_after_it(
        system: EngineSystem, producer: AIOKafkaProducer,
        tmp_path: Path) -> None:
    """The engine's pipeline of two cycles (agents/saga_engine.py): the write of a cycle of
    commands is held (the hook waits for a file before PostgresSagaState.write). Meanwhile a
    second command arrives: its cycle is fetched and decided, then waits for the one before
    it, and nothing of either cycle is sent (no reply) while the first is not written.
    Released: the first cycle is written and sent, only then is the second sealed (its
    writes apart from the first's), and both requests are answered once."""
    s = system.settings
    n = s.topic_partitions
    commands = s.topic("business.commands")
    first, second, payee = "pipe-first", "pipe-second", "pipe-payee"
    await system.add_user(first, balance=10_000)
    await system.add_user(second, balance=10_000)
    await system.add_user(payee, balance=0)
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    await system.stop_process("worker")

    def init(user: str, request_id: str) -> tuple[bytes, bytes, int]:
        return (request_id.encode(), _envelope(system, "transferInit", user, {
            "toAccountId": f"acc-{payee}", "amountMinor": 100, "currency": CURRENCY},
            request_id=request_id), _partition_of(request_id.encode(), n))

    r_first, r_second = f"pipe-1-{uuid.uuid4()}", f"pipe-2-{uuid.uuid4()}"
    release, hold_log = tmp_path / "release", tmp_path / "hold.jsonl"
    [first_coord] = await _produce(producer, commands, [init(first, r_first)])
    # No tick meanwhile (the first cycle runs them): a cycle of ticks alone would be the
    # one waiting for the first, and the second command would be fetched only after it.
    _start_worker(system, FAULT_HOLD_WRITE_CYCLE="1", FAULT_EXIT_CYCLE_TOPIC="business.commands",
                  FAULT_HOLD_WRITE_FILE=str(release), FAULT_HOLD_LOG=str(hold_log),
                  BIZ_TICK_INTERVAL_SECONDS="600")
    pid = system.processes["worker"].pid
    await wait_for(lambda: any(e["event"] == "held" for e in _hold_events(hold_log, pid)),
                   timeout=120, interval=0.1, what="the first cycle's write to be held")
    assert _one_cycle_held(system, [first_coord])

    [second_coord] = await _produce(producer, commands, [init(second, r_second)])

    def second_waits() -> bool:
        return any(e["event"] == "waits for the cycle before"
                   and list(second_coord) in e["records"]
                   for e in _hold_events(hold_log, pid))

    await wait_for(second_waits, timeout=60, interval=0.1,
                   what="the second cycle, decided, to wait for the first")
    assert _replies(system, r_first) == [] and _replies(system, r_second) == [], (
        "a reply was sent before its cycle, or the cycle before it, was written")
    assert system.processes["worker"].poll() is None

    release.touch()
    answered = [await system.final(rid, timeout=60) for rid in (r_first, r_second)]
    assert [a["status"] for a in answered] == ["ok", "ok"], answered
    events = [e["event"] for e in _hold_events(hold_log, pid)]
    held = events.index("held")
    assert events[held:held + 3] == ["held", "waits for the cycle before", "released"], events
    assert "sealed" in events[held + 3:], events  # the second cycle, sealed after
    await wait_for(lambda: _quiet(system), timeout=60, interval=0.2, what="quiet")
    for rid in (r_first, r_second):
        assert len(_answers(system, rid)) == 1, _replies(system, rid)
    await system.stop_process("worker")
    _start_worker(system)  # as the module's other tests run it
