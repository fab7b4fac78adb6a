"""Issue 11 against the real broker and PostgreSQL, the worker, the account center and the
funding provider as the processes an operator runs: the per-user PIN and OTP budgets, the
operator's unlock, the payee's currency at init, an account command replayed with another
amount (points 2, 3, 4, 6)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy import text
from system import PIN, System

from reference.gateway_client import TopicTail

pytestmark = pytest.mark.integration

WRONG_PIN = "00000000"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("security"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


def _user() -> str:
    return "u" + uuid.uuid4().hex[:8]


async def _pair(system: System, **kw: Any) -> tuple[str, str]:
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=1_000_000, **kw)
    await system.add_user(payee, balance=0)
    return payer, payee


def _keys_over_partitions(n: int, partitions: int) -> list[str]:
    """``n`` idempotency keys, as many on each partition of business.commands (the
    gateway's key = the idempotency key, murmur2 as Kafka's default partitioner)."""
    partitioner = DefaultPartitioner()
    by_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    every = list(range(partitions))
    while sum(map(len, by_partition.values())) < n:
        key = str(uuid.uuid4())
        p = partitioner(key.encode(), every, every)
        if len(by_partition[p]) < -(-n // partitions):
            by_partition[p].append(key)
    keys = [k for row in zip(*by_partition.values(), strict=False) for k in row]
    return keys[:n]


def _unlock(system: System, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "users", "unlock", user],
                          env=system.env(), cwd=system.logdir, capture_output=True,
                          text=True, timeout=60, check=False)


async def test_twelve_wrong_pins_over_keys_and_partitions_lock_at_the_fifth(
        system: System) -> None:
    payer, payee = await _pair(system)
    keys = _keys_over_partitions(12, system.settings.topic_partitions)
    partitioner = DefaultPartitioner()
    every = list(range(system.settings.topic_partitions))
    assert {partitioner(k.encode(), every, every) for k in keys} == set(every)
    replies = []
    for key in keys:  # one after the other: "the 5th" is well defined
        init = await system.init(payer, f"acc-{payee}", 1_000)
        replies.append(await system.confirm(payer, init["data"]["transferToken"], idem=key,
                                            pin=WRONG_PIN))
    codes = [r["code"] for r in replies]
    assert codes == ["INVALID_PIN"] * 4 + ["PIN_LOCKED"] * 8, codes
    assert [r["data"]["attemptsLeft"] for r in replies[:4]] == [4, 3, 2, 1]
    init = await system.init(payer, f"acc-{payee}", 1_000)
    locked = await system.confirm(payer, init["data"]["transferToken"], pin=PIN)
    assert locked["code"] == "PIN_LOCKED"  # the right PIN too, while locked
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 1_000_000}

    done = await asyncio.to_thread(_unlock, system, payer)
    assert done.returncode == 0, done.stderr
    reply = await system.transfer(payer, f"acc-{payee}", 1_000)
    assert reply["status"] == "ok", reply
    missing = await asyncio.to_thread(_unlock, system, "nobody-" + _user())
    assert missing.returncode == 1 and "no user" in missing.stderr


async def test_otp_guessing_across_transfers_is_locked_at_the_budget(system: System) -> None:
    payer, payee = await _pair(system, threshold=100)
    budget = system.settings.otp_user_max_failures  # 10 per user in 24 h
    per_transfer = system.settings.otp_max_attempts  # 5 per transfer
    assert budget % per_transfer == 0
    for _ in range(budget // per_transfer):
        init = await system.init(payer, f"acc-{payee}", 1_000)
        idem = str(uuid.uuid4())
        pending = await system.confirm(payer, init["data"]["transferToken"], idem=idem)
        assert pending["code"] == "OTP_REQUIRED", pending
        right = await system.otp_for(pending["data"]["transferId"])
        wrong = f"{(int(right) + 1) % 10**6:06d}"
        for _ in range(per_transfer):
            last = await system.call("verifyOtp", payer, {"otp": wrong}, idem=idem)
        assert last["code"] == "OTP_LOCKED", last
    init = await system.init(payer, f"acc-{payee}", 1_000)
    refused = await system.confirm(payer, init["data"]["transferToken"])
    assert (refused["status"], refused["code"]) == ("error", "OTP_LOCKED")
    assert "data" not in refused  # refused before any transfer exists
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 1_000_000}
    assert (await asyncio.to_thread(_unlock, system, payer)).returncode == 0
    reply = await system.transfer(payer, f"acc-{payee}", 1_000)
    assert reply["status"] == "ok", reply


async def test_six_otp_sends_in_fifteen_minutes_the_sixth_is_rate_limited(
        system: System) -> None:
    payer, payee = await _pair(system, threshold=100)
    assert system.otps is not None
    codes = []
    for _ in range(6):
        init = await system.init(payer, f"acc-{payee}", 1_000)
        codes.append((await system.confirm(payer, init["data"]["transferToken"]))["code"])
    assert codes == ["OTP_REQUIRED"] * 5 + ["RATE_LIMITED"], codes
    sent = [v for _k, v in system.otps.messages if v.get("userId") == payer]
    assert len(sent) == 5


async def test_init_refuses_a_payee_in_another_currency(system: System) -> None:
    payer = _user()
    payee = _user()
    await system.add_user(payer, balance=10_000)
    await system.add_user(payee, balance=0, currency="EUR")
    reply = await system.init(payer, f"acc-{payee}", 1_000)
    assert (reply["status"], reply["code"]) == ("error", "CURRENCY_MISMATCH")
    itself = await system.init(payer, f"acc-{payer}", 1_000)
    assert (itself["status"], itself["code"]) == ("error", "INVALID_REQUEST")


async def test_an_account_command_replayed_with_another_amount_is_rejected(
        system: System) -> None:
    payer, payee = await _pair(system)
    reply = await system.transfer(payer, f"acc-{payee}", 2_500)
    assert reply["status"] == "ok", reply
    transfer_id = reply["data"]["transferId"]
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        debit_id = (await conn.execute(text(
            "SELECT command_id FROM processed_commands WHERE transfer_id = :t"
            " AND type = 'debit'"), {"t": transfer_id})).scalar_one()
    _tid, attempt, step, _p = debit_id.split(":")
    assert (step, len(attempt)) == ("debit", 16)  # unique to this attempt of the key
    events = TopicTail(system.settings, system.settings.topic("account.events"))
    await events.start()
    try:
        await system.produce("account.commands", f"acc-{payer}".encode(), {
            "commandId": debit_id, "type": "debit", "accountId": f"acc-{payer}",
            "amountMinor": 900_000, "currency": "USD", "transferId": transfer_id})
        refused = await events.wait(lambda msgs: next(
            (v for _k, v in msgs if v["commandId"] == debit_id), None), 30)
    finally:
        await events.stop()
    assert (refused["type"], refused["reason"], refused["amountMinor"]) == (
        "rejected", "COMMAND_ID_CONFLICT", 900_000)
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 997_500, f"acc-{payee}": 2_500}
    assert "COMMAND_ID_CONFLICT" in system.log_tail("account-center", 400)
    details = await system.call("queryTransactionDetails", payer, {"transferId": transfer_id})
    assert details["data"]["state"] == "COMPLETED"  # the worker took no decision on it


async def test_ids_with_the_separator_or_control_characters_are_refused(
        system: System) -> None:
    """Point 10: ``alice`` + ``\\x1fk`` and ``alice\\x1f`` + ``k`` would derive one
    transferId; such ids never reach a derived id."""
    payer, payee = await _pair(system)
    init = await system.init(payer, f"acc-{payee}", 1_000)
    token = init["data"]["transferToken"]
    for idem in ("k\x1fsplit", "k\x00nul", "k\x85next-line"):
        reply = await system.confirm(payer, token, idem=idem)
        assert (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST"), reply
        assert "idempotencyKey" in reply["message"]
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 1_000_000}
    good = await system.confirm(payer, token)  # the token was never claimed
    assert good["status"] == "ok", good
