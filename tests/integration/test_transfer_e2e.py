"""The transfer saga end to end: the real broker, the real PostgreSQL, the worker and the
account center as the processes an operator runs, the gateway protocol on the wire."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
from sqlalchemy import text
from system import PIN, System

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("e2e"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


def _user() -> str:
    return "u" + uuid.uuid4().hex[:8]


async def _pair(system: System, payer_balance: int = 100_000, **kw: Any) -> tuple[str, str]:
    payer, payee = _user(), _user()
    await system.add_user(payer, balance=payer_balance, **kw)
    await system.add_user(payee, balance=0)
    return payer, payee


async def _debits_of(system: System, transfer_id: str) -> int:
    assert system.ledger is not None
    async with system.ledger.engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT count(*) FROM processed_commands WHERE transfer_id = :t AND type = 'debit'"
        ), {"t": transfer_id})
        return int(rows.scalar_one())


async def test_happy_path_under_the_threshold(system: System) -> None:
    payer, payee = await _pair(system)
    idem = str(uuid.uuid4())
    reply = await system.transfer(payer, f"acc-{payee}", 12_345, idem=idem)
    assert reply["status"] == "ok", reply
    assert reply["data"]["state"] == "COMPLETED"
    # The outcome kept beyond the saga's purge, in the key's idempotency record: saved
    # when the saga ended, before its final reply was sent.
    assert system.store is not None
    kept = await system.store.kept_outcome(payer, idem)
    assert kept is not None and (kept.state, kept.code) == ("COMPLETED", None)
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 100_000 - 12_345, f"acc-{payee}": 12_345}
    # The audit trail: DEBITING → CREDITING → COMPLETED, keyed by transferId.
    assert system.transfer_events is not None
    tid = reply["data"]["transferId"]
    states = await system.transfer_events.wait(
        lambda msgs: (s := [v["state"] for _k, v in msgs if v["transferId"] == tid])
        and s[-1] == "COMPLETED" and s, 30)
    assert states == ["DEBITING", "CREDITING", "COMPLETED"]


async def test_init_moves_no_money_and_tells_whether_an_otp_is_needed(system: System) -> None:
    payer, payee = await _pair(system, threshold=50_000)
    small = await system.init(payer, f"acc-{payee}", 50_000)
    large = await system.init(payer, f"acc-{payee}", 50_001)
    assert small["status"] == large["status"] == "ok"
    assert small["data"]["otpRequired"] is False and large["data"]["otpRequired"] is True
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 100_000}


async def test_otp_step_up_reads_the_otp_from_the_notification_topic(system: System) -> None:
    payer, payee = await _pair(system, payer_balance=500_000, threshold=10_000)
    init = await system.init(payer, f"acc-{payee}", 200_000)
    idem = str(uuid.uuid4())
    pending = await system.confirm(payer, init["data"]["transferToken"], idem=idem)
    assert (pending["status"], pending["code"]) == ("pending", "OTP_REQUIRED")
    assert "otpExpiresAt" in pending["data"]
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 500_000}  # not yet
    otp = await system.otp_for(pending["data"]["transferId"])
    assert otp not in json.dumps(pending)
    done = await system.call("verifyOtp", payer, {"otp": otp}, idem=idem)
    assert done["status"] == "ok" and done["data"]["state"] == "COMPLETED", done
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 300_000, f"acc-{payee}": 200_000}
    # The same OTP again: the saved final outcome, no second debit.
    again = await system.call("verifyOtp", payer, {"otp": otp}, idem=idem)
    assert again["status"] == "ok" and again["data"] == done["data"]
    assert await _debits_of(system, done["data"]["transferId"]) == 1


async def test_wrong_pin_five_times_locks_the_pin(system: System) -> None:
    payer, payee = await _pair(system)
    codes = []
    for _ in range(5):
        init = await system.init(payer, f"acc-{payee}", 100)
        reply = await system.confirm(payer, init["data"]["transferToken"], pin="000000")
        codes.append(reply["code"])
    assert codes == ["INVALID_PIN"] * 4 + ["PIN_LOCKED"]
    init = await system.init(payer, f"acc-{payee}", 100)
    reply = await system.confirm(payer, init["data"]["transferToken"], pin=PIN)
    assert reply["code"] == "PIN_LOCKED"
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 100_000}


async def test_a_wrong_pin_does_not_burn_the_key_nor_the_token(system: System) -> None:
    payer, payee = await _pair(system)
    init = await system.init(payer, f"acc-{payee}", 700)
    idem = str(uuid.uuid4())
    wrong = await system.confirm(payer, init["data"]["transferToken"], idem=idem, pin="999999")
    assert wrong["code"] == "INVALID_PIN" and wrong["data"]["attemptsLeft"] == 4
    right = await system.confirm(payer, init["data"]["transferToken"], idem=idem)
    assert right["status"] == "ok", right


async def test_wrong_otp_five_times_fails_the_transfer_and_moves_no_money(
        system: System) -> None:
    payer, payee = await _pair(system, threshold=10)
    init = await system.init(payer, f"acc-{payee}", 5_000)
    idem = str(uuid.uuid4())
    pending = await system.confirm(payer, init["data"]["transferToken"], idem=idem)
    real = await system.otp_for(pending["data"]["transferId"])
    wrong = f"{(int(real) + 1) % 10**6:06d}"
    codes = [(await system.call("verifyOtp", payer, {"otp": wrong}, idem=idem))["code"]
             for _ in range(5)]
    assert codes == ["INVALID_OTP"] * 4 + ["OTP_LOCKED"]
    late = await system.call("verifyOtp", payer, {"otp": real}, idem=idem)
    assert late["code"] == "OTP_LOCKED" and late["data"]["state"] == "FAILED"
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 100_000, f"acc-{payee}": 0}
    assert await _debits_of(system, pending["data"]["transferId"]) == 0


async def test_operator_must_be_the_token_subject(system: System) -> None:
    payer, payee = await _pair(system)
    reply = await system.init(payer, f"acc-{payee}", 100, token=system.token(payee))
    assert reply["code"] == "FORBIDDEN"


def _forge(claims: dict[str, Any], alg: str = "none") -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}."


async def test_bad_access_tokens_are_unauthenticated(system: System) -> None:
    payer, payee = await _pair(system)
    good = system.token(payer)
    head, _body, sig = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    tampered_claims = base64.urlsafe_b64encode(
        json.dumps({**claims, "sub": payee}).encode()).rstrip(b"=").decode()
    bad_tokens = {
        "tampered": f"{head}.{tampered_claims}.{sig}",
        "expired": system.token(payer, ttl_seconds=-120),
        "wrong algorithm": jwt.encode(claims, "x" * 64, algorithm="HS512"),
        "alg none": _forge(claims),
        "garbage": "not-a-jwt",
    }
    for name, token in bad_tokens.items():
        reply = await system.init(payer, f"acc-{payee}", 100, token=token)
        assert reply["code"] == "UNAUTHENTICATED", (name, reply)
        assert token not in json.dumps(reply)


async def test_a_transfer_token_is_not_an_access_token(system: System) -> None:
    payer, payee = await _pair(system)
    init = await system.init(payer, f"acc-{payee}", 100)
    reply = await system.init(payer, f"acc-{payee}", 100, token=init["data"]["transferToken"])
    assert reply["code"] == "UNAUTHENTICATED"


async def test_one_transfer_token_funds_one_transfer(system: System) -> None:
    payer, payee = await _pair(system)
    init = await system.init(payer, f"acc-{payee}", 1_000)
    first = await system.confirm(payer, init["data"]["transferToken"])
    second = await system.confirm(payer, init["data"]["transferToken"])
    assert first["status"] == "ok"
    assert second["code"] == "TOKEN_ALREADY_USED"
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 99_000}


async def test_same_key_other_payload_is_refused(system: System) -> None:
    payer, payee = await _pair(system)
    idem = str(uuid.uuid4())
    a = await system.init(payer, f"acc-{payee}", 1_000)
    b = await system.init(payer, f"acc-{payee}", 2_000)
    assert (await system.confirm(payer, a["data"]["transferToken"], idem=idem))["status"] == "ok"
    reused = await system.confirm(payer, b["data"]["transferToken"], idem=idem)
    assert reused["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 99_000}


async def test_fifty_concurrent_identical_confirms_debit_once(system: System) -> None:
    payer, payee = await _pair(system)
    init = await system.init(payer, f"acc-{payee}", 3_000)
    idem = str(uuid.uuid4())
    replies = await asyncio.gather(*(
        system.confirm(payer, init["data"]["transferToken"], idem=idem, first=True)
        for _ in range(50)))
    transfer_ids = {r["data"]["transferId"] for r in replies}
    assert len(transfer_ids) == 1
    assert all(r["status"] in ("ok", "pending") for r in replies), replies
    assert {r.get("code") for r in replies if r["status"] == "pending"} <= {"IN_PROGRESS"}
    # The request that started the saga gets the outcome; wait for it if it came later.
    starters = [r for r in replies if r["status"] == "ok"]
    if not starters:
        assert system.client is not None
        pending = [r["requestId"] for r in replies]
        starters = [await system.client.wait(lambda _: next(
            (x for rid in pending for x in system.client.replies[rid]  # type: ignore[union-attr]
             if x["status"] == "ok"), None), 60)]
    assert starters[0]["data"]["state"] == "COMPLETED"
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 97_000, f"acc-{payee}": 3_000}
    assert await _debits_of(system, replies[0]["data"]["transferId"]) == 1


async def test_insufficient_funds(system: System) -> None:
    payer, payee = await _pair(system, payer_balance=500)
    idem = str(uuid.uuid4())
    reply = await system.transfer(payer, f"acc-{payee}", 501, idem=idem)
    assert reply["code"] == "INSUFFICIENT_FUNDS" and reply["data"]["state"] == "FAILED"
    assert system.store is not None
    kept = await system.store.kept_outcome(payer, idem)
    assert kept is not None and (kept.state, kept.code) == ("FAILED", "INSUFFICIENT_FUNDS")
    assert await system.balances(f"acc-{payer}", f"acc-{payee}") == {
        f"acc-{payer}": 500, f"acc-{payee}": 0}
    # The reservation of the daily limit was given back.
    assert system.store is not None
    from datetime import UTC, datetime
    assert await system.store.reserved_today(payer, datetime.now(UTC).date()) == 0


async def test_credit_to_a_missing_account_is_refunded(system: System) -> None:
    payer, payee = await _pair(system)
    assert system.ledger is not None
    await system.ledger.close_account(f"acc-{payee}")  # the account center no longer has it
    reply = await system.transfer(payer, f"acc-{payee}", 4_000)
    assert reply["code"] == "ACCOUNT_NOT_FOUND" and reply["data"]["state"] == "FAILED", reply
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 100_000}
    assert await system.ledger.clearing_balance("USD") == 0
    assert system.transfer_events is not None
    tid = reply["data"]["transferId"]
    states = await system.transfer_events.wait(
        lambda msgs: (s := [v["state"] for _k, v in msgs if v["transferId"] == tid])
        and s[-1] == "FAILED" and s, 30)
    assert states == ["DEBITING", "CREDITING", "REFUNDING", "FAILED"]


async def test_undecodable_command_goes_to_the_dead_letter_topic(system: System) -> None:
    from reference.gateway_client import TopicTail

    dlq = TopicTail(system.settings, system.settings.topic("business.dlq"))
    await dlq.start()
    try:
        assert system.client is not None
        await system.client.send(b"\xff not json", key=b"garbage-key")
        letter = await dlq.wait(lambda msgs: next(
            (v for k, v in msgs if k == b"garbage-key"), None), 30)
        assert letter["reason"].startswith("undecodable")
        # coordinates and digest of the original, never its value (issue 9)
        assert letter["valueSha256"] == hashlib.sha256(b"\xff not json").hexdigest()
        assert letter["valueSize"] == len(b"\xff not json") and "valueB64" not in letter
        # ... and the worker goes on: the next command is answered.
        payer, payee = await _pair(system)
        assert (await system.init(payer, f"acc-{payee}", 100))["status"] == "ok"
    finally:
        await dlq.stop()


async def test_invalid_envelope_gets_an_invalid_request_reply(system: System) -> None:
    payer, payee = await _pair(system)
    assert system.client is not None
    env = system.client.envelope("transferInit", payer, system.token(payer),
                                 {"toAccountId": f"acc-{payee}", "amountMinor": 1.5,
                                  "currency": "USD"})
    await system.client.send(env)
    reply = await system.final(env["requestId"])
    assert reply["code"] == "INVALID_REQUEST" and "amountMinor" in reply["message"]


def test_logs_never_hold_pins_otps_or_tokens(system: System) -> None:
    """Runs after the tests above in this module (file order): scan both processes' logs."""
    logs = system.log_tail("worker", 100_000) + system.log_tail("account-center", 100_000)
    assert logs, "the processes wrote no log"
    def appears(secret: str) -> bool:
        return re.search(rf"(?<![0-9a-fA-F]){secret}(?![0-9a-fA-F])", logs) is not None

    assert not appears(PIN)
    assert "eyJ" not in logs  # the start of every JWT
    assert system.otps is not None and system.otps.messages
    for _k, v in system.otps.messages:
        assert not appears(v["otp"])



async def test_daily_limit_holds_for_simultaneous_confirms(system: System) -> None:
    """Two transfers of one user confirmed at the same instant (two idempotency keys, so
    two partitions, possibly two workers) cannot both slip under the daily limit."""
    payer, payee = await _pair(system, daily_limit=10_000)
    a = await system.init(payer, f"acc-{payee}", 6_000)
    b = await system.init(payer, f"acc-{payee}", 6_000)
    assert a["status"] == b["status"] == "ok"  # each fits alone: init only pre-checks
    replies = await asyncio.gather(system.confirm(payer, a["data"]["transferToken"]),
                                   system.confirm(payer, b["data"]["transferToken"]))
    outcomes = sorted(r.get("code") or r["data"]["state"] for r in replies)
    assert outcomes == ["COMPLETED", "LIMIT_EXCEEDED"], replies
    assert await system.balances(f"acc-{payer}") == {f"acc-{payer}": 94_000}
