"""Partitions move between workers while transfers are in flight.

The saga agent keeps several records in flight at once (one per partition lane,
agents/lanes.py) and the worker's consumer hands whole fetched batches to the streams
(app/faust_consumer.py). A rebalance must wait for the records in flight, and a record
handed over but not finished must come again to the partition's next owner: here a
second worker joins the group under load and later leaves it (SIGTERM), so every
partition moves twice while money is moving.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from system import System, free_port

pytestmark = pytest.mark.integration

CURRENCY = "USD"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("rebalance"), table_store="rocksdb://",
                        account_command_timeout_seconds=2.0)
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def _transfer(system: System, payer: str, payee: str, amount: int) -> dict[str, Any]:
    init = await system.init(payer, f"acc-{payee}", amount, timeout=180)
    if init["status"] != "ok":
        return init
    idem = str(uuid.uuid4())
    reply = await system.confirm(payer, init["data"]["transferToken"], idem=idem, timeout=180)
    if reply.get("code") == "OTP_REQUIRED":
        tid = reply["data"]["transferId"]
        otp = await system.otp_for(tid, timeout=180)
        reply = await system.call("verifyOtp", payer, {"otp": otp}, idem=idem, timeout=180)
    return reply


async def test_a_worker_joining_and_leaving_under_load_moves_money_once(system: System) -> None:
    rng = random.Random(1124)
    users = [f"rb{i:02d}" for i in range(16)]
    for u in users:
        await system.add_user(u, balance=rng.randrange(50_000, 200_000), threshold=150_000)
    assert system.ledger is not None
    seeded = await system.ledger.seeded_total(CURRENCY)

    async def one(i: int) -> dict[str, Any]:
        payer, payee = rng.sample(users, 2)
        amount = rng.choice([rng.randrange(1, 20_000), rng.randrange(100_000, 250_000)])
        await asyncio.sleep(i * 0.03)  # a ramp, so both moves land while work is in flight
        return await _transfer(system, payer, payee, amount)

    async def join_then_leave() -> None:
        await asyncio.sleep(1.0)
        system.start_worker("worker-2", web_port=free_port())
        await asyncio.sleep(3.0)
        await system.stop_process("worker-2")  # SIGTERM: a graceful leave

    results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(150))),
                                      join_then_leave())
    outcomes: dict[str, int] = {}
    for r in results:
        assert r["status"] in ("ok", "error"), r
        key = "COMPLETED" if r["status"] == "ok" else r["code"]
        outcomes[key] = outcomes.get(key, 0) + 1
        if r["status"] == "ok":
            assert r["data"]["state"] == "COMPLETED"
    assert set(outcomes) <= {"COMPLETED", "INSUFFICIENT_FUNDS", "LIMIT_EXCEEDED"}, outcomes
    assert outcomes.get("COMPLETED", 0) >= 50, outcomes

    assert await system.ledger.total_balances(CURRENCY) == seeded
    assert await system.ledger.clearing_balance(CURRENCY) == 0
    assert await system.ledger.unbalanced_commands() == []
    assert await system.ledger.mismatched_accounts() == []
