"""topUp end to end: the worker, the account center and the reference funding provider as
processes, against the real broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from system import PIN, System

from reference.gateway_client import TopicTail

pytestmark = pytest.mark.integration

FUNDING_TIMEOUT = 4.0
LATE_AFTER = 7.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(
        kafka_bootstrap, database_url, isolation_id, tmp_path_factory.mktemp("topup"),
        funding_timeout_seconds=FUNDING_TIMEOUT, account_command_timeout_seconds=1.0,
        funding_decline_sources=["src-decline"], funding_silent_sources=["src-silent"],
        funding_late_sources=["src-late"], funding_late_capture_seconds=LATE_AFTER,
    )
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def funding_commands(system: System) -> AsyncIterator[TopicTail]:
    tail = TopicTail(system.settings, system.settings.topic("funding.commands"),
                     from_beginning=True)
    await tail.start()
    yield tail
    await tail.stop()


async def _user_with_source(system: System, source: str, *, balance: int = 10_000,
                            threshold: int = 1_000_000) -> str:
    user = "u" + uuid.uuid4().hex[:8]
    await system.add_user(user, balance=balance, threshold=threshold)
    await system.add_funding_source(user, source)
    return user


async def top_up(system: System, user: str, source: str, amount: int, *,
                 idem: str | None = None, timeout: float = 60.0, pin: str = PIN
                 ) -> dict[str, Any]:
    idem = idem or str(uuid.uuid4())
    reply = await system.call("topUp", user, {"fundingSourceId": source, "amountMinor": amount,
                                              "currency": "USD", "pin": pin}, idem=idem,
                              timeout=timeout)
    if reply.get("code") == "OTP_REQUIRED":
        otp = await system.otp_for(reply["data"]["transferId"])
        reply = await system.call("verifyOtp", user, {"otp": otp}, idem=idem, timeout=timeout)
    return reply


async def _states(system: System, transfer_id: str, last: str) -> list[str]:
    assert system.transfer_events is not None
    return await system.transfer_events.wait(  # type: ignore[no-any-return]
        lambda msgs: (s := [v["state"] for _k, v in msgs if v["transferId"] == transfer_id])
        and s[-1] == last and s, 30)


async def test_captured_top_up_credits_the_wallet(system: System) -> None:
    user = await _user_with_source(system, "card-ok-1")
    assert system.ledger is not None
    funded_before = await system.ledger.funded_total("USD")
    reply = await top_up(system, user, "card-ok-1", 2_500)
    assert reply["status"] == "ok" and reply["data"]["state"] == "COMPLETED", reply
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 12_500}
    assert await system.ledger.funded_total("USD") == funded_before + 2_500
    assert await system.ledger.clearing_balance("USD") == 0  # not the transfer clearing
    assert await _states(system, reply["data"]["transferId"], "COMPLETED") == [
        "CHARGING", "CREDITING", "COMPLETED"]


async def test_top_up_over_the_threshold_needs_the_otp(system: System) -> None:
    user = await _user_with_source(system, "card-ok-2", threshold=1_000)
    idem = str(uuid.uuid4())
    pending = await system.call("topUp", user, {"fundingSourceId": "card-ok-2",
                                                "amountMinor": 5_000, "currency": "USD",
                                                "pin": PIN},
                                idem=idem)
    assert pending["code"] == "OTP_REQUIRED"
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000}
    otp = await system.otp_for(pending["data"]["transferId"])
    done = await system.call("verifyOtp", user, {"otp": otp}, idem=idem)
    assert done["status"] == "ok", done
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 15_000}


async def test_declined_top_up_credits_nothing(system: System) -> None:
    user = await _user_with_source(system, "src-decline")
    reply = await top_up(system, user, "src-decline", 3_000)
    assert reply["code"] == "FUNDING_DECLINED" and reply["data"]["state"] == "FAILED"
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000}


async def test_silent_provider_is_retried_then_the_top_up_times_out(
        system: System, funding_commands: TopicTail) -> None:
    user = await _user_with_source(system, "src-silent")
    reply = await top_up(system, user, "src-silent", 4_000)
    assert reply["code"] == "FUNDING_TIMEOUT" and reply["data"]["state"] == "FAILED", reply
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000}
    charges = [v for _k, v in funding_commands.messages
               if v.get("fundingSourceId") == "src-silent"]
    assert len(charges) >= 2, "the charge was not retried"
    assert {(c["chargeId"], c["type"]) for c in charges} == {(charges[0]["chargeId"],
                                                               "charge")}


async def test_late_capture_is_refunded_to_the_source(
        system: System, funding_commands: TopicTail) -> None:
    """The provider captures after the business center gave up: the user was told
    FUNDING_TIMEOUT, so the capture is given back to the source rather than credited."""
    user = await _user_with_source(system, "src-late")
    reply = await top_up(system, user, "src-late", 6_000)
    assert reply["code"] == "FUNDING_TIMEOUT", reply
    tid = reply["data"]["transferId"]
    refunds = await funding_commands.wait(lambda msgs: [
        v for _k, v in msgs if v.get("fundingSourceId") == "src-late"
        and v["type"] == "refund"], LATE_AFTER + 30)
    assert refunds[0]["amountMinor"] == 6_000
    assert system.transfer_events is not None
    # FAILED (timeout) → REVERSING → FAILED (the source got its money back)
    states = await system.transfer_events.wait(
        lambda msgs: (s := [v["state"] for _k, v in msgs if v["transferId"] == tid])
        and s.count("FAILED") >= 2 and s, 30)
    assert states == ["CHARGING", "FAILED", "REVERSING", "FAILED"]
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000}
    # The user's answer never changed.
    assert system.client is not None
    for rid, replies in system.client.replies.items():
        if any(r.get("data", {}).get("transferId") == tid for r in replies):
            assert {r.get("code") for r in replies} == {"FUNDING_TIMEOUT"}, (rid, replies)


async def test_top_up_idempotency(system: System) -> None:
    user = await _user_with_source(system, "card-ok-3")
    idem = str(uuid.uuid4())
    first = await top_up(system, user, "card-ok-3", 700, idem=idem)
    again = await top_up(system, user, "card-ok-3", 700, idem=idem)
    other = await top_up(system, user, "card-ok-3", 800, idem=idem)
    assert first["status"] == again["status"] == "ok"
    assert again["data"]["transferId"] == first["data"]["transferId"]
    assert other["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_700}


async def test_someone_elses_funding_source_is_forbidden(system: System) -> None:
    owner = await _user_with_source(system, "card-owned")
    thief = await _user_with_source(system, "card-thief")
    reply = await top_up(system, thief, "card-owned", 1_000)
    assert reply["code"] == "FORBIDDEN"
    assert await system.balances(f"acc-{owner}", f"acc-{thief}") == {
        f"acc-{owner}": 10_000, f"acc-{thief}": 10_000}


async def test_concurrent_top_ups_and_transfers_conserve_money(system: System) -> None:
    """100 top-ups and transfers at once: the balances add up to the seeded funds plus the
    captured top-ups, and the transfer clearing is empty."""
    assert system.ledger is not None
    rng = random.Random(7)
    users = []
    for i in range(10):
        user = await _user_with_source(system, f"card-mix-{i}", balance=50_000)
        users.append(user)
    total_before = await system.ledger.total_balances("USD")
    funded_before = await system.ledger.funded_total("USD")
    await system.ledger.seeded_total("USD")

    async def one(i: int) -> dict[str, Any]:
        user = rng.choice(users)
        if i % 2:
            return await top_up(system, user, f"card-mix-{users.index(user)}",
                                rng.randrange(1, 10_000))
        payee = rng.choice([u for u in users if u != user])
        return await system.transfer(user, f"acc-{payee}", rng.randrange(1, 30_000))

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert all(r["status"] in ("ok", "error") for r in results), results
    assert {r.get("code") for r in results if r["status"] == "error"} <= {
        "INSUFFICIENT_FUNDS"}
    captured = await system.ledger.funded_total("USD") - funded_before
    topped = sum(1 for i, r in enumerate(results) if i % 2 and r["status"] == "ok")
    assert topped == 50 and captured > 0
    total = await system.ledger.total_balances("USD")
    assert total == total_before + captured
    assert await system.ledger.seeded_total("USD") + await system.ledger.funded_total(
        "USD") == total
    assert await system.ledger.clearing_balance("USD") == 0


async def test_a_top_up_is_confirmed_with_the_pin(system: System) -> None:
    """Issue 11 point 7: a stolen access token alone tops up nothing."""
    user = await _user_with_source(system, "card-pin")
    wrong = await top_up(system, user, "card-pin", 1_000, pin="00000000")
    assert (wrong["status"], wrong["code"], wrong["data"]) == (
        "error", "INVALID_PIN", {"attemptsLeft": 4})
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000}
    right = await top_up(system, user, "card-pin", 1_000)
    assert right["status"] == "ok", right
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 11_000}


async def test_top_ups_count_against_the_daily_top_up_limit(system: System) -> None:
    limit = system.settings.topup_daily_limit_minor
    user = await _user_with_source(system, "card-limit")
    first = await top_up(system, user, "card-limit", limit - 1_000)
    assert first["status"] == "ok", first
    over = await top_up(system, user, "card-limit", 1_001)
    assert (over["status"], over["code"]) == ("error", "LIMIT_EXCEEDED")
    rest = await top_up(system, user, "card-limit", 1_000)
    assert rest["status"] == "ok", rest
    assert await system.balances(f"acc-{user}") == {f"acc-{user}": 10_000 + limit}
