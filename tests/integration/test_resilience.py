"""Money moves exactly once through crashes, redeliveries and an operator's replay.

The worker here uses the production table store (RocksDB) so that restarts exercise it.

Over 400 lines: four long scenarios on one expensive system, and the money checks they
share.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition
from conftest import wait_for
from sqlalchemy import text
from system import PIN, System, free_port, kafka_tool

from agents.saga_engine import saga_group

pytestmark = pytest.mark.integration

CURRENCY = "USD"


#: How long a patient client waits for an answer before asking again. It separates a lost
#: request (never answered) from a late one: the load runs through a dead member's session
#: timeout, a restart and the drain of the backlog built meanwhile, on a machine the CI
#: shares with the broker and the database. Latency is the benchmark's to measure.
REASK_AFTER_SECONDS = 120.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("resilience"), table_store="rocksdb://",
                        account_command_timeout_seconds=2.0,
                        # These users step up to an OTP at machine speed, many times in a
                        # few minutes: the per-user OTP send budget (tests/test_security_e2e
                        # tests it) is lifted so the outcomes here are the crashes' alone.
                        otp_max_sends=1_000)
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
    ``REASK_AFTER_SECONDS`` is sent again (a new request id, the same idempotency key and
    token), as a
    frontend retries; each such retry is recorded there."""
    async def ask(command: str, payload: dict[str, Any], idem: str | None) -> dict[str, Any]:
        if asked_again is None:
            return await system.call(command, payer, payload, idem=idem, timeout=180)
        for attempt in range(3):
            try:
                return await system.call(command, payer, payload, idem=idem,
                                         timeout=REASK_AFTER_SECONDS)
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
    are each killed (SIGKILL) while transfers are in flight, and restarted. Money is
    conserved, clearing is empty at the end, every transfer ends COMPLETED or with an error
    code, and money moved exactly once per transfer."""
    rng = random.Random(20261124)
    users = [f"load{i:02d}" for i in range(20)]
    opening = {}
    for u in users:
        opening[f"acc-{u}"] = rng.randrange(50_000, 200_000)
        await system.add_user(u, balance=opening[f"acc-{u}"], threshold=150_000)
    total_before, clearing_before, seeded = await _money(system)
    assert clearing_before == 0 and total_before == seeded
    started: list[int] = []
    finished: list[int] = []

    async def one(i: int) -> Attempt:
        payer, payee = rng.sample(users, 2)
        amount = rng.choice([rng.randrange(1, 20_000), rng.randrange(100_000, 250_000)])
        await asyncio.sleep(i * 0.02)  # a ramp: the crashes land while work is in flight
        started.append(i)
        try:
            reply = await _transfer_tolerating_crashes(system, payer, payee, amount)
        finally:
            finished.append(i)
        return Attempt(f"acc-{payer}", f"acc-{payee}", amount, reply)

    in_flight_at_kills: list[int] = []

    async def crashes() -> None:
        await wait_for(lambda: len(started) - len(finished) >= 10, timeout=60,
                       interval=0.05, what="transfers in flight")
        in_flight_at_kills.append(len(started) - len(finished))
        await system.stop_process("worker", kill=True)
        system.start_process("worker")
        await wait_for(lambda: len(started) - len(finished) >= 10, timeout=60,
                       interval=0.05, what="transfers in flight")
        in_flight_at_kills.append(len(started) - len(finished))
        await system.stop_process("account-center", kill=True)
        system.start_process("account-center")

    results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(200))), crashes())
    assert len(in_flight_at_kills) == 2 and min(in_flight_at_kills) >= 10, in_flight_at_kills
    await _assert_final_and_conserved(system, [a.reply for a in results], seeded)
    await _assert_exactly_once(system, opening, results)


@dataclass(frozen=True)
class Attempt:
    payer_account: str
    payee_account: str
    amount: int
    reply: dict[str, Any]


async def _assert_exactly_once(system: System, opening: dict[str, int],
                               attempts: list[Attempt]) -> None:
    """Money moved exactly once per transfer: the ledger applied at most one debit and one
    credit (or refund) per transferId, and every account's balance is its opening balance
    minus what it sent plus what it received over the COMPLETED transfers. (Conservation
    alone would pass a transfer applied twice.)"""
    assert await system.money_moved_more_than_once() == []
    completed = [(a.payer_account, a.payee_account, a.amount) for a in attempts
                 if a.reply["status"] == "ok"]
    off = await system.balances_off_from(opening, completed)
    assert off == {}, f"accounts not moved exactly once (expected, actual): {off}"


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


async def test_workers_joining_leaving_and_crashing_under_load_answer_everything_once(
        system: System) -> None:
    """Partitions move between workers while transfers are in flight: a second worker joins
    the group, leaves it (SIGTERM), and then the first worker is killed (SIGKILL) and
    restarted at once; transfers keep starting until all three moves are done. The saga
    agent keeps several records in flight (a lane per partition, agents/lanes.py) and the
    consumer hands whole fetched batches to the streams (agents/faust_consumer.py): a record
    handed over but not finished must come again to the partition's next owner, and no
    record may be dropped at the hand-over (tests/integration/test_rebalance_records.py proves the
    mechanism with the window widened). Every request is answered without being asked
    again, money moves exactly once, and the group commits every input record."""
    rng = random.Random(1124)
    users = [f"rb{i:02d}" for i in range(16)]
    opening = {}
    for u in users:
        opening[f"acc-{u}"] = rng.randrange(50_000, 200_000)
        await system.add_user(u, balance=opening[f"acc-{u}"], threshold=150_000)
    _total, _clearing, seeded = await _money(system)
    moved = asyncio.Event()
    asked_again: list[str] = []

    async def one() -> Attempt:
        payer, payee = rng.sample(users, 2)
        amount = rng.choice([rng.randrange(1, 20_000), rng.randrange(100_000, 250_000)])
        reply = await _transfer_tolerating_crashes(system, payer, payee, amount,
                                                   asked_again=asked_again)
        return Attempt(f"acc-{payer}", f"acc-{payee}", amount, reply)

    async def load() -> list[Attempt]:
        started: list[asyncio.Task[Attempt]] = []
        while (not moved.is_set() or len(started) < 100) and len(started) < 3000:
            started.append(asyncio.create_task(one()))
            # A steady stream of new transfers (pacing, not synchronisation): ~12 a
            # second, within what one worker does on this 2-core machine with the broker,
            # the database and a second worker beside it, so a backlog built while a
            # member is dead drains in seconds.
            await asyncio.sleep(0.08)
        return list(await asyncio.gather(*started))

    async def join_leave_crash() -> None:
        await asyncio.sleep(1.0)  # some load first
        system.start_worker("worker-2", web_port=free_port())
        await wait_for(lambda: _group_is(system, "Stable", 2), timeout=120, interval=0.2,
                       what="the second worker to take partitions")
        await system.stop_process("worker-2")  # SIGTERM: a graceful leave
        await wait_for(lambda: _group_is(system, "Stable", 1), timeout=120, interval=0.2,
                       what="the first worker to take every partition back")
        await system.stop_process("worker", kill=True)  # a crash: no leave
        system.start_process("worker")
        await wait_for(lambda: _group_is(system, "Stable", 1), timeout=120, interval=0.2,
                       what="the restarted worker to take every partition")
        moved.set()

    results, _ = await asyncio.gather(load(), join_leave_crash())
    assert len(results) < 3000, "the partitions never settled: load stopped at its cap"
    assert asked_again == [], f"{len(asked_again)} requests had to be asked again"
    await _assert_final_and_conserved(system, [a.reply for a in results], seeded)
    await _assert_exactly_once(system, opening, results)
    await _assert_inputs_committed(system)


async def _assert_inputs_committed(system: System) -> None:
    """The workers' two groups (the saga engine's, the Faust app's) committed every
    record their input topics held once the run ended."""
    for group, topics in system.worker_groups().items():
        targets = await _end_offsets(system, topics)
        await wait_for(lambda g=group, t=targets: _committed_reach(system, g, t),
                       timeout=60, interval=0.5, what=f"{group} to commit every input record")


async def test_a_worker_killed_under_load_answers_again_within_seconds(system: System) -> None:
    """The worker is killed (SIGKILL: it never leaves the group) under a steady load and
    restarted at once. The group reassigns the dead member's partitions when its session
    times out (BIZ_CONSUMER_SESSION_TIMEOUT_SECONDS, 10 s; Faust's default of 60 s made
    this ~93 s), so the restarted worker answers again within seconds, and every request
    sent around the crash is answered without being asked again."""
    assert system.client is not None
    users = [f"kg{i}" for i in range(4)]
    for u in users:
        await system.add_user(u, balance=100_000)
    assert (await system.init(users[0], f"acc-{users[1]}", 1, timeout=120))["status"] == "ok"
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    stop = asyncio.Event()
    sent: list[tuple[float, asyncio.Task[dict[str, Any]]]] = []
    answered_at: dict[int, float] = {}

    async def ask(i: int) -> dict[str, Any]:
        payer, payee = rng.sample(users, 2)
        reply = await system.init(payer, f"acc-{payee}", rng.randrange(1, 500), timeout=120)
        answered_at[i] = loop.time()
        return reply

    async def load() -> None:
        while not stop.is_set():
            sent.append((loop.time(), asyncio.create_task(ask(len(sent)))))
            await asyncio.sleep(0.1)  # pacing of the load, not synchronisation

    loader = asyncio.create_task(load())
    await wait_for(lambda: len(answered_at) >= 20, timeout=60, interval=0.1,
                   what="answers before the crash")
    await system.stop_process("worker", kill=True)
    restarted = loop.time()
    system.start_process("worker")
    await wait_for(lambda: any(sent[i][0] > restarted for i in answered_at), timeout=120,
                   interval=0.1, what="an answer to a request sent after the restart")
    first_answer = min(at for i, at in answered_at.items() if sent[i][0] > restarted)
    mark = len(sent)
    await wait_for(lambda: sum(1 for i in answered_at if i >= mark) >= 10, timeout=60,
                   interval=0.1, what="steady answers after the restart")
    stop.set()
    await loader
    replies = await asyncio.gather(*(t for _at, t in sent))
    assert all(r["status"] == "ok" for r in replies), [r for r in replies
                                                       if r["status"] != "ok"][:3]
    gap = first_answer - restarted
    print(f"restarted worker answered {gap:.1f} s after its start")
    # The bound catches a session timeout back at Faust's 60 s; the target is 15 s.
    assert gap < 30, f"the restarted worker answered only {gap:.1f} s after its start"


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
    # The saga engine's group reads the saga topics and the account events.
    saga_inputs = [s.topic("business.commands"), s.topic("business.saga-inputs"),
                   s.topic("account.events")]
    for group, topics in ((saga_group(s), saga_inputs),
                          (s.account_center_group, [s.topic("account.commands")])):
        args = ["consumer-groups", "--bootstrap-server", s.kafka_bootstrap_servers,
                "--group", group, "--reset-offsets", "--to-earliest", "--execute"]
        for t in topics:
            args += ["--topic", t]
        done = kafka_tool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    targets_sagas = await _end_offsets(system, saga_inputs)
    targets_ac = await _end_offsets(system, [s.topic("account.commands")])
    system.start_process("account-center")
    system.start_process("worker")

    await wait_for(lambda: _committed_reach(system, saga_group(s), targets_sagas),
                   timeout=120, interval=0.5, what="the worker to replay the saga topics")
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
    await wait_for(lambda: _committed_reach(system, saga_group(s), targets_events),
                   timeout=120, interval=0.5,
                   what="the worker to absorb re-emitted account events")
    assert await system.balances(*accounts) == balances_before
    assert await _money(system) == money_before
    assert await _processed_commands(system) == processed_before
    assert await system.money_moved_more_than_once() == []
