"""Money moves exactly once through crashes, redeliveries and an operator's replay.

The worker here uses the production table store (RocksDB) so that restarts exercise it.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import wait_for
from sqlalchemy import text
from system import PIN, System, free_port, kafka_tool

pytestmark = pytest.mark.integration

CURRENCY = "USD"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("resilience"), table_store="rocksdb://",
                        account_command_timeout_seconds=2.0)
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def _money(system: System) -> tuple[int, int, int]:
    assert system.ledger is not None
    return (await system.ledger.total_balances(CURRENCY),
            await system.ledger.clearing_balance(CURRENCY),
            await system.ledger.seeded_total(CURRENCY))


async def _processed_commands(system: System) -> int:
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM processed_commands")))
                   .scalar_one())


async def _end_offsets(system: System, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(
            [TopicPartition(t, p) for t in topics
             for p in range(system.settings.topic_partitions)]))
    finally:
        await consumer.stop()


async def _committed_reach(system: System, group: str, targets: dict[TopicPartition, int]
                           ) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return all((committed.get(tp) is not None and committed[tp].offset >= end)
               for tp, end in targets.items() if end > 0)


async def _transfer_tolerating_crashes(system: System, payer: str, payee: str, amount: int,
                                       *, asked_again: list[str] | None = None
                                       ) -> dict[str, Any]:
    """A whole transfer as a patient client does it across a crash: the same requests,
    the same idempotency key; a re-issued OTP (the worker crashed before recording the
    first) is read again from the topic. With ``asked_again``, a request unanswered for
    60 s is sent again (a new request id, the same idempotency key and token), as a
    frontend retries; each such retry is recorded there."""
    async def ask(command: str, payload: dict[str, Any], idem: str | None) -> dict[str, Any]:
        if asked_again is None:
            return await system.call(command, payer, payload, idem=idem, timeout=180)
        for attempt in range(3):
            try:
                return await system.call(command, payer, payload, idem=idem, timeout=60)
            except AssertionError as exc:
                if "no final reply" not in str(exc) or attempt == 2:
                    raise
                asked_again.append(command)
        raise AssertionError("unreachable")

    init = await ask("transferInit", {"toAccountId": f"acc-{payee}", "amountMinor": amount,
                                      "currency": CURRENCY}, None)
    if init["status"] != "ok":
        return init
    idem = str(uuid.uuid4())
    reply = await ask("transferConfirm", {"transferToken": init["data"]["transferToken"],
                                          "pin": PIN}, idem)
    for _attempt in range(3):
        if reply.get("code") != "OTP_REQUIRED" and reply.get("code") != "INVALID_OTP":
            return reply
        assert system.otps is not None
        tid = reply["data"]["transferId"]
        otps = [v["otp"] for _k, v in system.otps.messages if v["transferId"] == tid]
        if not otps:
            await system.otp_for(tid, timeout=180)
            otps = [v["otp"] for _k, v in system.otps.messages if v["transferId"] == tid]
        reply = await ask("verifyOtp", {"otp": otps[-1]}, idem)
    return reply


async def test_200_concurrent_transfers_with_crashes_conserve_money(system: System) -> None:
    """200 transfers among 20 accounts, concurrently; the worker and the account center
    are each killed (SIGKILL) and restarted in the middle. Money is conserved, clearing
    is empty at the end, and every transfer ends COMPLETED or with an error code."""
    rng = random.Random(20261124)
    users = [f"load{i:02d}" for i in range(20)]
    for u in users:
        await system.add_user(u, balance=rng.randrange(50_000, 200_000), threshold=150_000)
    total_before, clearing_before, seeded = await _money(system)
    assert clearing_before == 0 and total_before == seeded

    async def one(i: int) -> dict[str, Any]:
        payer, payee = rng.sample(users, 2)
        amount = rng.choice([rng.randrange(1, 20_000), rng.randrange(100_000, 250_000)])
        await asyncio.sleep(i * 0.02)  # a ramp: the crashes land while work is in flight
        return await _transfer_tolerating_crashes(system, payer, payee, amount)

    async def crashes() -> None:
        await asyncio.sleep(1.0)
        await system.stop_process("worker", kill=True)
        system.start_process("worker")
        await asyncio.sleep(1.5)
        await system.stop_process("account-center", kill=True)
        system.start_process("account-center")

    results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(200))), crashes())
    await _assert_final_and_conserved(system, results, seeded)


async def _assert_final_and_conserved(system: System, results: list[dict[str, Any]],
                                      seeded: int) -> None:
    """Every transfer ended COMPLETED or with an expected error code, at least 50
    completed; balances sum to what was seeded, clearing is empty, the journal balances."""
    outcomes: dict[str, int] = {}
    for r in results:
        assert r["status"] in ("ok", "error"), r
        key = "COMPLETED" if r["status"] == "ok" else r["code"]
        outcomes[key] = outcomes.get(key, 0) + 1
        if r["status"] == "ok":
            assert r["data"]["state"] == "COMPLETED"
    assert set(outcomes) <= {"COMPLETED", "INSUFFICIENT_FUNDS", "LIMIT_EXCEEDED"}, outcomes
    assert outcomes.get("COMPLETED", 0) >= 50, outcomes

    total, clearing, seeded_after = await _money(system)
    assert seeded_after == seeded
    assert clearing == 0
    assert total == seeded, f"money not conserved: {total} != {seeded} ({outcomes})"
    assert system.ledger is not None
    assert await system.ledger.unbalanced_commands() == []
    assert await system.ledger.mismatched_accounts() == []


async def test_a_worker_joining_and_leaving_under_load_moves_money_once(system: System) -> None:
    """Partitions move between workers while transfers are in flight. The saga agent keeps
    several records in flight at once (a lane per partition, agents/lanes.py) and the
    worker's consumer hands whole fetched batches to the streams (app/faust_consumer.py):
    a rebalance must wait for the records in flight, and a record handed over but not
    finished must come again to the partition's next owner. A second worker joins the
    group under load, takes partitions, and leaves it (SIGTERM): every partition moves
    twice, and transfers keep starting until both moves are done.

    Known limit (faust-streaming, also without this project's lanes and consumer: seen in
    about 1 run in 4 at commit 23f23b7): a request handled around the live hand-over can go
    unanswered. The client asks again with the same idempotency key and gets the answer;
    money moves once either way, which is what this test holds the system to."""
    rng = random.Random(1124)
    users = [f"rb{i:02d}" for i in range(16)]
    for u in users:
        await system.add_user(u, balance=rng.randrange(50_000, 200_000), threshold=150_000)
    _total, _clearing, seeded = await _money(system)
    moved = asyncio.Event()

    async def one() -> dict[str, Any]:
        payer, payee = rng.sample(users, 2)
        amount = rng.choice([rng.randrange(1, 20_000), rng.randrange(100_000, 250_000)])
        return await _transfer_tolerating_crashes(system, payer, payee, amount,
                                                  asked_again=asked_again)

    asked_again: list[str] = []

    async def load() -> list[dict[str, Any]]:
        started: list[asyncio.Task[dict[str, Any]]] = []
        while (not moved.is_set() or len(started) < 100) and len(started) < 2000:
            started.append(asyncio.create_task(one()))
            await asyncio.sleep(0.03)  # a steady stream of new transfers
        return list(await asyncio.gather(*started))

    async def join_then_leave() -> None:
        await asyncio.sleep(1.0)
        system.start_worker("worker-2", web_port=free_port())
        await wait_for(lambda: _group_is(system, "Stable", 2), timeout=120, interval=0.2,
                       what="the second worker to take partitions")
        await system.stop_process("worker-2")  # SIGTERM: a graceful leave
        await wait_for(lambda: _group_is(system, "Stable", 1), timeout=120, interval=0.2,
                       what="the first worker to take every partition back")
        moved.set()

    results, _ = await asyncio.gather(load(), join_then_leave())
    assert len(results) < 2000, "the partitions never moved back: load stopped at its cap"
    await _assert_final_and_conserved(system, results, seeded)
    assert len(asked_again) <= len(results) // 20, asked_again  # the limit stays a rare one


async def _group_is(system: System, state: str, members: int) -> bool:
    return await system.group_state() == (state, members)


async def test_operator_replay_from_offset_zero_moves_no_money(system: System) -> None:
    """Both consumer groups are reset to offset 0 on every input topic with Kafka's own
    consumer-group tool and both processes restarted: no balance changes, and every
    request that is answered again gets the same answer."""
    assert system.client is not None and system.ledger is not None
    # A variety of histories to replay: completed, OTP, failed, refunded, wrong PIN.
    await system.add_user("rp-a", balance=100_000, threshold=20_000)
    await system.add_user("rp-b", balance=0)
    await system.add_user("rp-gone", balance=0)
    await system.ledger.close_account("acc-rp-gone")
    assert (await system.transfer("rp-a", "acc-rp-b", 1_000))["status"] == "ok"
    assert (await system.transfer("rp-a", "acc-rp-b", 30_000))["status"] == "ok"
    assert (await system.transfer("rp-a", "acc-rp-b", 900_000))["code"] in (
        "INSUFFICIENT_FUNDS", "LIMIT_EXCEEDED")
    assert (await system.transfer("rp-a", "acc-rp-gone", 2_000))["code"] == "ACCOUNT_NOT_FOUND"
    init = await system.init("rp-a", "acc-rp-b", 10)
    assert (await system.confirm("rp-a", init["data"]["transferToken"], pin="1111"))[
        "code"] == "INVALID_PIN"
    assert (await system.confirm("rp-a", init["data"]["transferToken"], pin=PIN))[
        "status"] == "ok"

    accounts = [f"acc-{u}" for u in ("rp-a", "rp-b", "rp-gone")]
    balances_before = await system.balances(*accounts)
    money_before = await _money(system)
    processed_before = await _processed_commands(system)
    answered = {rid: list(replies) for rid, replies in system.client.replies.items()}

    await system.stop_process("worker")
    await system.stop_process("account-center")
    s = system.settings
    worker_inputs = [s.topic("business.commands"), s.topic("business.saga-inputs"),
                     s.topic("account.events")]
    for group, topics in ((s.app_id, worker_inputs),
                          (s.account_center_group, [s.topic("account.commands")])):
        args = ["consumer-groups", "--bootstrap-server", s.kafka_bootstrap_servers,
                "--group", group, "--reset-offsets", "--to-earliest", "--execute"]
        for t in topics:
            args += ["--topic", t]
        done = kafka_tool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    targets_worker = await _end_offsets(system, [s.topic("business.commands"),
                                                 s.topic("account.events")])
    targets_ac = await _end_offsets(system, [s.topic("account.commands")])
    system.start_process("account-center")
    system.start_process("worker")

    await wait_for(lambda: _committed_reach(system, s.app_id, targets_worker), timeout=120,
                   interval=0.5, what="the worker to replay its input topics")
    await wait_for(lambda: _committed_reach(system, s.account_center_group, targets_ac),
                   timeout=120, interval=0.5, what="the account center to replay")
    # Everything the replay re-sent has been re-sent: each earlier request answered again.
    replayed = {rid for rid, replies in system.client.replies.items()
                if len(replies) > len(answered.get(rid, []))}
    assert replayed, "the replay re-sent no reply at all"
    for rid, replies in system.client.replies.items():
        if rid in answered:
            outcomes = {(r["status"], r.get("code"), str(r.get("data", {}).get("transferId")),
                         r.get("data", {}).get("state")) for r in replies
                        if r.get("code") != "IN_PROGRESS"}  # "still working" is no answer
            assert len(outcomes) == 1, f"request {rid} got different answers: {replies}"
    # And the money did not move: wait for the account center's re-emitted events to be
    # absorbed too, then compare.
    targets_events = await _end_offsets(system, [s.topic("account.events")])
    await wait_for(lambda: _committed_reach(system, s.app_id, targets_events), timeout=120,
                   interval=0.5, what="the worker to absorb re-emitted account events")
    assert await system.balances(*accounts) == balances_before
    assert await _money(system) == money_before
    assert await _processed_commands(system) == processed_before
