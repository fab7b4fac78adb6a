"""The service layer with fakes: the whole transfer loop without Kafka or PostgreSQL.

Each test drives app.transfers.service.TransferService through tests/fakes.py: the
commands the gateway would publish, the account center simulator answering the account
commands, and the account events routed back to the saga. Crashes are simulated by
dropping what one call produced; redeliveries by delivering a message again.

Over 400 lines: the service's behaviour on one harness, in sections (happy paths, PIN, OTP,
tokens, duplicates and crashes, money, bad input, secrets, a random mix).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
from typing import Any

import orjson
import pytest
from fakes import DEFAULT_USERS, PIN, START, Harness, SeedUser

from app.domain.transfer_saga import State
from app.transfers.ids import transfer_id_for
from app.transfers.outbound import iso
from schemas.wire import SagaInput

WRONG_PIN = "00000000"


def _attempt(h: Harness, operator: str, idem: str) -> str:
    """The attempt id in the command ids of the operation under this key (its idempotency
    record)."""
    saga = h.saga(operator, idem)
    assert saga is not None and len(saga.transfer.attempt) == 16
    return saga.transfer.attempt


def tid(operator: str, idem: str) -> str:
    return transfer_id_for(operator, idem)


def states(h: Harness, transfer_id: str) -> list[str]:
    return [e["state"] for e in h.transfer_events if e["transferId"] == transfer_id]


def wrong_otp(right: str) -> str:
    return "000000" if right != "000000" else "111111"


def with_dave(**overrides: Any) -> Harness:
    """The default users plus dave, whose account the account center does not know."""
    return Harness((*DEFAULT_USERS, SeedUser("dave", "acc-dave", None)), **overrides)


# --------------------------------------------------------------------------------------
# the happy paths
# --------------------------------------------------------------------------------------


async def test_happy_path_under_the_threshold() -> None:
    h = Harness()
    init = await h.init("alice", "acc-bob", 5_000, request_id="r-init")
    assert init["status"] == "ok" and init["type"] == "transferInit"
    assert init["data"]["otpRequired"] is False
    assert init["data"]["expiresAt"] == iso(START + 300)
    assert h.account_commands == []  # no money moves at init

    reply = await h.confirm("alice", init["data"]["transferToken"], "k1", request_id="r-c")
    t = tid("alice", "k1")
    assert reply == {"requestId": "r-c", "idempotencyKey": "k1", "type": "transferConfirm",
                     "status": "ok", "data": {"transferId": t, "state": "COMPLETED"}}
    assert h.replies_for("r-c") == [reply]  # the outcome is the only reply
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    a = _attempt(h, "alice", "k1")
    assert [(c["commandId"], c["type"], c["accountId"], c["amountMinor"])
            for c in h.account_commands] == [(f"{t}:{a}:debit:0", "debit", "acc-alice", 5_000),
                                             (f"{t}:{a}:credit:0", "credit", "acc-bob", 5_000)]
    assert states(h, t) == ["DEBITING", "CREDITING", "COMPLETED"]
    assert [e["eventId"] for e in h.transfer_events] == [f"{t}:1", f"{t}:2", f"{t}:3"]
    assert h.otp_messages == []
    assert h.reserved_today("alice") == 5_000  # a completed transfer keeps its reservation
    assert h.sim.clearing == {"EUR": 0}


async def test_otp_path_reads_the_code_from_the_notification() -> None:
    h = Harness()
    init = await h.init("alice", "acc-bob", 20_000)
    assert init["data"]["otpRequired"] is True
    pending = await h.confirm("alice", init["data"]["transferToken"], "k1", request_id="r-c")
    t = tid("alice", "k1")
    assert pending is not None
    assert (pending["status"], pending["code"]) == ("pending", "OTP_REQUIRED")
    assert pending["data"] == {"transferId": t, "otpExpiresAt": iso(START + 300)}
    [note] = h.otp_messages
    assert note == {"userId": "alice", "phone": "+15550101", "otp": h.new_otp.issued[-1],
                    "expiresAt": iso(START + 300), "transferId": t}
    assert h.account_commands == [] and h.balance("alice") == 100_000

    done = await h.verify_otp("alice", note["otp"], "k1", request_id="r-otp")
    assert done is not None
    assert (done["status"], done["type"], done["data"]) == (
        "ok", "verifyOtp", {"transferId": t, "state": "COMPLETED"})
    assert (h.balance("alice"), h.balance("bob")) == (80_000, 70_000)
    assert h.replies_for("r-c") == [pending]  # the confirm got its pending reply only
    assert states(h, t) == ["AWAITING_OTP", "DEBITING", "CREDITING", "COMPLETED"]


async def test_a_saga_input_handed_over_decides_as_its_bytes_do() -> None:
    """The saga engine decides the saga input its relay made in the same process from the
    model the relay built (``SourceRecord.parsed``), not from its bytes parsed back: every
    path (completed, OTP, insufficient funds, a refund, a redelivered account event) must
    send byte for byte what the bytes gave."""

    async def run(hand_over: bool) -> tuple[list[tuple[str, bytes | None, bytes, int | None]],
                                             dict[str, int]]:
        h = with_dave(hand_over=hand_over)
        assert (await h.transfer("carol", "acc-bob", 5_000))["code"] == "INSUFFICIENT_FUNDS"
        assert (await h.transfer("alice", "acc-bob", 5_000))["status"] == "ok"
        assert (await h.transfer("alice", "acc-carol", 20_000))["status"] == "ok"  # OTP
        assert (await h.transfer("bob", "acc-dave", 1_000))["code"] == "ACCOUNT_NOT_FOUND"
        token = await h.transfer_token("bob", "acc-alice", 2_000)
        await h.confirm("bob", token, "k-again", run=False)
        handed, redelivered = 0, set()
        while h.outbox:  # every account event of the last transfer delivered twice
            out = h.outbox[0]
            handed += out.topic == h.topics.saga_inputs and isinstance(out.model, SagaInput)
            again = out.topic == h.topics.account_events and id(out) not in redelivered
            redelivered.add(id(out))
            await h.step(keep=again)
        balances = {u: h.balance(u) for u in ("alice", "bob", "carol")}
        assert handed > 0
        return [(o.topic, o.key, o.value, o.partition) for o in h.emitted], balances

    by_bytes, balances = await run(hand_over=False)
    handed_over, balances_handed = await run(hand_over=True)
    assert handed_over == by_bytes
    assert balances_handed == balances == {"alice": 100_000 - 5_000 - 20_000 + 2_000,
                                           "bob": 50_000 + 5_000 - 2_000, "carol": 20_000}


# --------------------------------------------------------------------------------------
# PIN
# --------------------------------------------------------------------------------------


async def test_five_wrong_pins_lock_the_pin() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    codes = []
    for i in range(5):
        reply = await h.confirm("alice", token, "k1", pin=WRONG_PIN)
        assert reply is not None
        codes.append((reply["code"], (reply.get("data") or {}).get("attemptsLeft")))
        assert h.store.pin_failures("alice") == i + 1
    assert codes == [("INVALID_PIN", 4), ("INVALID_PIN", 3), ("INVALID_PIN", 2),
                     ("INVALID_PIN", 1), ("PIN_LOCKED", None)]
    right = await h.confirm("alice", token, "k1")  # even the right PIN
    assert right is not None and right["code"] == "PIN_LOCKED"
    other_key = await h.confirm("alice", token, "k2")
    assert other_key is not None and other_key["code"] == "PIN_LOCKED"
    assert h.saga("alice", "k1") is None and h.store.token_uses == {}
    assert h.account_commands == [] and h.balance("alice") == 100_000


async def test_a_wrong_pin_consumes_neither_the_token_nor_the_key() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": WRONG_PIN},
                    idem="k1", request_id="r-wrong")
    first = await h.send(raw)
    assert h.reply("r-wrong") is not None and h.reply("r-wrong")["code"] == "INVALID_PIN"
    assert h.store.token_uses == {} and h.saga("alice", "k1") is None
    assert h.reserved_today("alice") == 0
    again = await h.send(raw)  # a redelivery of the wrong confirm counts once
    assert [o.value for o in again] == [o.value for o in first]
    assert h.store.pin_failures("alice") == 1

    reply = await h.confirm("alice", token, "k1", request_id="r-right")
    assert reply is not None and reply["status"] == "ok"
    assert reply["data"] == {"transferId": tid("alice", "k1"), "state": "COMPLETED"}
    assert h.store.pin_failures("alice") == 0  # a success resets the counter
    assert h.balance("alice") == 95_000


# --------------------------------------------------------------------------------------
# OTP failures
# --------------------------------------------------------------------------------------


async def test_five_wrong_otps_fail_the_transfer_and_move_no_money() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 20_000)
    await h.confirm("alice", token, "k1")
    t = tid("alice", "k1")
    right = h.otp_for(t)
    assert h.reserved_today("alice") == 20_000
    replies = [await h.verify_otp("alice", wrong_otp(right), "k1") for _ in range(5)]
    assert [(r["status"], r["code"]) for r in replies if r] == [("error", "INVALID_OTP")] * 4 + [
        ("error", "OTP_LOCKED")]
    assert [r["data"].get("attemptsLeft") for r in replies if r][:4] == [4, 3, 2, 1]
    assert replies[-1] is not None
    assert replies[-1]["data"] == {"transferId": t, "state": "FAILED"}
    late = await h.verify_otp("alice", right, "k1")
    assert late is not None and (late["status"], late["code"]) == ("error", "OTP_LOCKED")
    assert h.account_commands == []
    assert (h.balance("alice"), h.balance("bob")) == (100_000, 50_000)
    assert h.reserved_today("alice") == 0  # the limit is released
    assert states(h, t) == ["AWAITING_OTP", "FAILED"]


async def test_an_otp_never_verified_expires_on_tick() -> None:
    h = Harness(otp_ttl_seconds=30)
    token = await h.transfer_token("alice", "acc-bob", 20_000)
    pending = await h.confirm("alice", token, "k1", request_id="r-c")
    assert pending is not None and pending["data"]["otpExpiresAt"] == iso(START + 30)
    t = tid("alice", "k1")
    h.clock.advance(30)
    assert await h.tick() == []  # at the deadline itself the OTP is still valid
    h.clock.advance(1)
    await h.tick()
    failed = h.reply("r-c")
    assert failed is not None
    assert (failed["status"], failed["code"], failed["data"]) == (
        "error", "OTP_EXPIRED", {"transferId": t, "state": "FAILED"})
    assert h.account_commands == [] and h.balance("alice") == 100_000
    assert h.reserved_today("alice") == 0
    assert await h.tick() == []  # a final saga leaves the deadline index
    late = await h.verify_otp("alice", h.otp_for(t), "k1")
    assert late is not None and late["code"] == "OTP_EXPIRED"
    assert h.account_commands == []


@pytest.mark.parametrize("failure", [ConnectionRefusedError, RuntimeError])
async def test_a_tick_is_all_or_nothing_per_saga(
    failure: type[Exception], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 9: one saga's effect failing in a tick (an outage, or a bug) neither drops the
    other sagas' sends nor keeps a state whose reply was never sent. The failed saga is
    left as it was and tried again after a back-off."""
    h = Harness(otp_ttl_seconds=30)
    for idem in ("k-a", "k-b", "k-c"):
        token = await h.transfer_token("alice", "acc-bob", 20_000)
        pending = await h.confirm("alice", token, idem, request_id=f"r-{idem}")
        assert pending is not None and pending["code"] == "OTP_REQUIRED"
    broken = tid("alice", "k-b")
    release = h.store.release_daily_limit

    async def failing_for_b(transfer_id: str) -> None:
        if transfer_id == broken:
            raise failure("PostgreSQL went away" if failure is ConnectionRefusedError
                          else "a bug")
        await release(transfer_id)

    monkeypatch.setattr(h.store, "release_daily_limit", failing_for_b)
    h.clock.advance(31)
    outs = await h.tick()
    expired = {o["requestId"] for o in h.emitted_on(h.topics.replies, outs)}
    assert expired == {"r-k-a", "r-k-c"}  # the other sagas' sends are all there
    assert {e["transferId"] for e in h.emitted_on(h.topics.transfer_events, outs)} == {
        tid("alice", "k-a"), tid("alice", "k-c")}
    b = h.saga("alice", "k-b")
    assert b is not None and b.state is State.AWAITING_OTP  # unchanged: nothing unsent
    assert h.reply("r-k-b")["code"] == "OTP_REQUIRED"  # type: ignore[index]
    assert h.reply_cache.rows["alice\x1fr-k-b"] == orjson.dumps(h.reply("r-k-b"))
    assert h.dead_letters == []
    h.clock.advance(0.5)
    assert await h.tick() == []  # backing off
    monkeypatch.setattr(h.store, "release_daily_limit", release)
    h.clock.advance(0.5)
    await h.tick()
    assert h.reply("r-k-b")["code"] == "OTP_EXPIRED"  # type: ignore[index]
    b = h.saga("alice", "k-b")
    assert b is not None and b.state is State.FAILED
    assert h.reserved_today("alice") == 0


# --------------------------------------------------------------------------------------
# authentication and tokens
# --------------------------------------------------------------------------------------


async def test_operator_must_be_the_subject_of_the_access_token() -> None:
    h = Harness()
    reply = await h.init("alice", "acc-bob", 5_000, token=h.access_token("bob"))
    assert (reply["status"], reply["code"]) == ("error", "FORBIDDEN")
    assert "transferToken" not in str(reply)
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    rid = h.next_request_id()
    await h.send(h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                           idem="k1", request_id=rid, token=h.access_token("bob")))
    await h.run_until_quiet()
    assert h.reply(rid) is not None and h.reply(rid)["code"] == "FORBIDDEN"
    assert "check_pin" not in h.store.calls and h.account_commands == []


async def test_an_expired_access_token_is_unauthenticated() -> None:
    h = Harness()  # leeway 10 s
    token = h.access_token("alice", ttl_seconds=60)
    h.clock.advance(65)  # expired, but within the leeway
    ok = await h.init("alice", "acc-bob", 5_000, token=token)
    assert ok["status"] == "ok"
    h.clock.advance(6)
    reply = await h.init("alice", "acc-bob", 5_000, token=token)
    assert (reply["status"], reply["code"]) == ("error", "UNAUTHENTICATED")


async def test_a_transfer_token_is_not_an_access_token_and_vice_versa() -> None:
    h = Harness()
    transfer_token = await h.transfer_token("alice", "acc-bob", 5_000)
    as_access = await h.init("alice", "acc-bob", 5_000, token=transfer_token)
    assert as_access["code"] == "UNAUTHENTICATED"
    reply = await h.confirm("alice", h.access_token("alice"), "k1")  # access as transfer
    assert reply is not None and reply["code"] == "UNAUTHENTICATED"
    head, body, sig = transfer_token.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    reply = await h.confirm("alice", tampered, "k2")
    assert reply is not None and reply["code"] == "UNAUTHENTICATED"
    assert h.account_commands == [] and h.store.token_uses == {}


async def test_a_transfer_token_of_another_user_is_forbidden() -> None:
    h = Harness()
    bobs = await h.transfer_token("bob", "acc-alice", 5_000)
    calls = len(h.store.calls)
    reply = await h.confirm("alice", bobs, "k1")
    assert reply is not None and reply["code"] == "FORBIDDEN"
    assert len(h.store.calls) == calls  # refused on the token alone: no directory look-up
    assert h.account_commands == []


async def test_an_expired_transfer_token_cannot_start_a_transfer() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    h.clock.advance(300 + 10 + 1)  # ttl + leeway
    h_reply = await h.confirm("alice", token, "k1")
    assert h_reply is not None and h_reply["code"] == "TOKEN_EXPIRED"
    assert h.saga("alice", "k1") is None and h.account_commands == []


async def test_one_transfer_token_funds_one_transfer() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    first = await h.confirm("alice", token, "k1")
    assert first is not None and first["status"] == "ok"
    second = await h.confirm("alice", token, "k2")
    assert second is not None and (second["status"], second["code"]) == (
        "error", "TOKEN_ALREADY_USED")
    assert h.saga("alice", "k2") is None
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    assert h.reserved_today("alice") == 5_000


async def test_one_transfer_token_while_the_first_transfer_is_in_progress() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    await h.confirm("alice", token, "k1", run=False)
    second = await h.confirm("alice", token, "k2", run=False)
    assert second is not None and second["code"] == "TOKEN_ALREADY_USED"
    await h.run_until_quiet()
    assert h.balance("alice") == 95_000 and len(h.sim.applied) == 2


async def test_same_key_with_another_token_is_refused_and_nothing_else_happens() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    other = await h.transfer_token("alice", "acc-carol", 7_000)
    await h.confirm("alice", token, "k1", run=False)  # in progress: debit not answered
    t = tid("alice", "k1")
    stored = h.sagas.rows[t]
    calls, emitted, failures = len(h.store.calls), len(h.emitted), h.store.pin_failures("alice")
    outs = await h.send(h.command("transferConfirm", "alice",
                                  {"transferToken": other, "pin": WRONG_PIN},
                                  idem="k1", request_id="r-reuse"))
    assert [o.topic for o in outs] == ["business.replies"]
    reply = h.reply("r-reuse")
    assert reply is not None and (reply["status"], reply["code"]) == (
        "error", "IDEMPOTENCY_KEY_REUSED")
    assert h.sagas.rows[t] == stored
    assert len(h.store.calls) == calls  # no PIN check, no token claim, no reservation
    assert len(h.emitted) == emitted + 1
    assert h.store.pin_failures("alice") == failures
    await h.run_until_quiet()
    assert h.reply("r-reuse") == reply
    assert (h.balance("alice"), h.balance("bob"), h.balance("carol")) == (95_000, 55_000, 0)
    # after the end too, and the other token is still unused
    late = await h.confirm("alice", other, "k1")
    assert late is not None and late["code"] == "IDEMPOTENCY_KEY_REUSED"
    fresh = await h.confirm("alice", other, "k2")
    assert fresh is not None and fresh["status"] == "ok"
    assert h.balance("carol") == 7_000


# --------------------------------------------------------------------------------------
# duplicates and crashes
# --------------------------------------------------------------------------------------


async def test_idempotency_keys_are_scoped_per_operator() -> None:
    h = Harness()
    alice = await h.transfer("alice", "acc-carol", 1_000, idem="k-same")
    bob = await h.transfer("bob", "acc-carol", 2_000, idem="k-same")
    assert (alice["status"], bob["status"]) == ("ok", "ok")
    assert alice["data"]["transferId"] != bob["data"]["transferId"]
    assert h.balance("carol") == 3_000


async def test_fifty_identical_confirms_move_money_once() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    payload = {"transferToken": token, "pin": PIN}
    rids = [f"r-{i:02d}" for i in range(50)]
    for i, rid in enumerate(rids):
        await h.send(h.command("transferConfirm", "alice", payload, idem="k50", request_id=rid))
        if i == 24:
            await h.run_until_quiet()
        elif i % 3 == 0 and h.outbox:
            await h.step()
    await h.run_until_quiet()
    t = tid("alice", "k50")
    assert len(h.sim.applied_of(t, "debit")) == 1 and len(h.sim.applied_of(t, "credit")) == 1
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    assert states(h, t).count("COMPLETED") == 1
    kinds = []
    for rid in rids:
        [reply] = h.replies_for(rid)  # exactly one reply each
        assert reply["data"]["transferId"] == t
        kinds.append((reply["status"], reply.get("code"), reply["data"]["state"]))
    assert kinds[0] == ("ok", None, "COMPLETED")
    assert set(kinds) <= {("ok", None, "COMPLETED"), ("pending", "IN_PROGRESS", "DEBITING"),
                          ("pending", "IN_PROGRESS", "CREDITING")}
    assert any(k[1] == "IN_PROGRESS" for k in kinds)
    assert kinds.count(("ok", None, "COMPLETED")) > 1  # later ones get the saved outcome
    assert h.store.calls.count("check_pin") == 1
    assert h.store.calls.count("reserve_daily_limit") == 1


async def test_a_request_answered_in_progress_gets_the_outcome_when_retried() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    await h.confirm("alice", token, "k1", run=False)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k1", request_id="r-click")
    await h.send(raw)
    assert h.reply("r-click")["code"] == "IN_PROGRESS"  # type: ignore[index]
    await h.run_until_quiet()
    await h.send(raw)  # the gateway retries the same request
    assert [r.get("code") for r in h.replies_for("r-click")] == ["IN_PROGRESS", None]
    assert h.reply("r-click")["data"]["state"] == "COMPLETED"  # type: ignore[index]


async def test_a_wrong_pin_redelivered_after_its_reply_was_lost_counts_once() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": WRONG_PIN},
                    idem="k1", request_id="r-wrong")
    await h.send(raw)
    h.reply_cache.rows.clear()  # the replies table lost the entry (a crash before its write)
    await h.process(h.history[-1])  # Kafka delivers the same record again (same offset)
    assert [r["code"] for r in h.replies_for("r-wrong")] == ["INVALID_PIN", "INVALID_PIN"]
    assert h.store.pin_failures("alice") == 1
    assert h.reply("r-wrong")["data"] == {"attemptsLeft": 4}  # type: ignore[index]


async def test_redelivered_confirm_after_a_crash_resends_the_debit() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k1", request_id="r-c")
    dropped = await h.send(raw, deliver=False)  # the state was written, nothing was sent
    t = tid("alice", "k1")
    lost = [o.value for o in dropped if o.topic == "account.commands"]
    a = _attempt(h, "alice", "k1")
    assert len(lost) == 1 and orjson.loads(lost[0])["commandId"] == f"{t}:{a}:debit:0"
    saga = h.saga("alice", "k1")
    assert saga is not None and saga.state is State.DEBITING
    assert await h.run_until_quiet() == 0 and h.balance("alice") == 100_000

    resent = await h.send(raw)  # the redelivery
    assert [o.value for o in resent if o.topic == "account.commands"] == lost
    await h.run_until_quiet()
    final = h.reply("r-c")
    assert final is not None and final["status"] == "ok"
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    assert len(h.sim.applied_of(t)) == 2
    assert h.store.calls.count("check_pin") == 1  # the redelivery decided nothing again


async def test_redelivered_verify_otp_after_a_crash_resends_the_debit() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 20_000)
    await h.confirm("alice", token, "k1")
    t = tid("alice", "k1")
    raw = h.command("verifyOtp", "alice", {"otp": h.otp_for(t)}, idem="k1", request_id="r-o")
    dropped = await h.send(raw, deliver=False)
    resent = await h.send(raw)
    lost = [o.value for o in dropped if o.topic == "account.commands"]
    assert lost and [o.value for o in resent if o.topic == "account.commands"] == lost
    await h.run_until_quiet()
    assert h.reply("r-o") is not None and h.reply("r-o")["status"] == "ok"
    assert h.balance("alice") == 80_000 and len(h.sim.applied_of(t, "debit")) == 1
    assert len(h.otp_messages) == 1  # the OTP is never sent again


async def _crash_after_debited(h: Harness, idem: str) -> bytes:
    """Confirm, let the debit apply, then lose what the debited event produced."""
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    await h.confirm("alice", token, idem, run=False)
    await h.step()  # debit → account center
    await h.step()  # debited → relay
    dropped = await h.step(deliver=False)  # saga input: CREDITING written, credit lost
    saga = h.saga("alice", idem)
    assert saga is not None and saga.state is State.CREDITING
    assert not h.outbox
    [credit] = [o.value for o in dropped if o.topic == "account.commands"]
    assert orjson.loads(credit)["commandId"] == (
        f"{tid('alice', idem)}:{_attempt(h, 'alice', idem)}:credit:0")
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 50_000)
    return credit


async def test_a_lost_credit_is_resent_when_the_debited_event_is_redelivered() -> None:
    h = Harness()
    credit = await _crash_after_debited(h, "k1")
    outs = await h.process(h.history[-1])  # the saga input again
    assert [o.value for o in outs if o.topic == "account.commands"] == [credit]
    await h.run_until_quiet()
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    assert h.saga("alice", "k1").state is State.COMPLETED  # type: ignore[union-attr]


async def test_a_lost_credit_is_resent_by_the_tick_after_the_timeout() -> None:
    h = Harness(account_command_timeout_seconds=5)
    credit = await _crash_after_debited(h, "k1")
    h.clock.advance(4.9)
    assert await h.tick() == []  # nothing before the deadline
    h.clock.advance(0.1)
    outs = await h.tick()
    assert [o.value for o in outs if o.topic == "account.commands"] == [credit]
    await h.run_until_quiet()
    assert (h.balance("alice"), h.balance("bob")) == (95_000, 55_000)
    assert h.saga("alice", "k1").state is State.COMPLETED  # type: ignore[union-attr]
    assert len(h.sim.applied_of(tid("alice", "k1"), "credit")) == 1


async def test_an_unanswered_debit_is_resent_with_backoff() -> None:
    h = Harness(account_command_timeout_seconds=5, account_command_max_backoff_seconds=15)
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    await h.confirm("alice", token, "k1", run=False)
    first = h.outbox.popleft().value  # the account center never sees it
    resent_at = []
    for _ in range(60):
        h.clock.advance(1)
        outs = await h.tick()
        if outs:
            assert [o.value for o in outs] == [first]  # the same commandId, byte for byte
            resent_at.append(h.clock.now - START)
            h.outbox.clear()
    assert resent_at == [5, 15, 30, 45, 60]  # timeout, then 2x, 4x (capped at 15)...
    await h.tick()
    h.clock.advance(15)
    await h.tick()
    await h.run_until_quiet()
    assert h.balance("alice") == 95_000 and len(h.sim.applied_of(tid("alice", "k1"))) == 2


async def test_replaying_every_input_changes_nothing() -> None:
    h = with_dave(otps=["314159", "271828", "161803"])
    assert (await h.transfer("alice", "acc-bob", 5_000))["status"] == "ok"
    assert (await h.transfer("alice", "acc-carol", 20_000))["status"] == "ok"  # OTP
    token = await h.transfer_token("bob", "acc-alice", 15_000)
    await h.confirm("bob", token, "k-otp")
    right = h.otp_for(tid("bob", "k-otp"))
    assert (await h.verify_otp("bob", wrong_otp(right), "k-otp"))["code"] == "INVALID_OTP"  # type: ignore[index]
    assert (await h.verify_otp("bob", right, "k-otp"))["status"] == "ok"  # type: ignore[index]
    assert (await h.transfer("carol", "acc-bob", 90_000))["code"] == "INSUFFICIENT_FUNDS"
    assert (await h.transfer("alice", "acc-dave", 1_000))["code"] == "ACCOUNT_NOT_FOUND"
    token = await h.transfer_token("alice", "acc-bob", 2_000)
    assert (await h.confirm("alice", token, "k-pin", pin=WRONG_PIN))["code"] == "INVALID_PIN"  # type: ignore[index]
    assert (await h.confirm("alice", token, "k-pin"))["status"] == "ok"  # type: ignore[index]
    assert (await h.confirm("alice", token, "k-again"))["code"] == "TOKEN_ALREADY_USED"  # type: ignore[index]
    other = await h.transfer_token("alice", "acc-bob", 3_000)
    assert (await h.confirm("alice", other, "k-pin"))["code"] == "IDEMPOTENCY_KEY_REUSED"  # type: ignore[index]
    await h.tick()

    balances, clearing, applied = h.sim.balances(), dict(h.sim.clearing), len(h.sim.applied)
    sagas, reserved = dict(h.sagas.rows), dict(h.store.reservations)
    first: dict[bytes, bytes] = {}
    for out in h.emitted:
        if out.topic == "business.replies":
            assert out.key is not None
            assert first.setdefault(out.key, out.value) == out.value, "one reply per request"
    earlier_events = {e["eventId"]: e for e in h.transfer_events}
    before = len(h.emitted)

    history = list(h.history)
    h.clock.advance(3600)  # an operator resets the consumer groups an hour later
    for item in history:
        await h.process(item)
    await h.run_until_quiet()

    replayed = h.emitted[before:]
    replies = [o for o in replayed if o.topic == "business.replies"]
    assert {o.key for o in replies} == set(first)  # every request answered again...
    for out in replies:
        assert out.key is not None and out.value == first[out.key]  # ...identically
    assert h.sim.balances() == balances and h.sim.clearing == clearing
    assert len(h.sim.applied) == applied  # the account center applied nothing new
    assert h.sagas.rows == sagas and h.store.reservations == reserved
    assert h.emitted_on("notifications.otp", replayed) == []
    assert h.emitted_on("business.dlq", replayed) == []
    for e in h.emitted_on("business.transfer-events", replayed):
        assert earlier_events[e["eventId"]] == e


# --------------------------------------------------------------------------------------
# money outcomes
# --------------------------------------------------------------------------------------


async def test_insufficient_funds() -> None:
    h = Harness()
    reply = await h.transfer("carol", "acc-bob", 5_000)
    t = reply["data"]["transferId"]
    assert (reply["status"], reply["code"], reply["data"]["state"]) == (
        "error", "INSUFFICIENT_FUNDS", "FAILED")
    assert (h.balance("carol"), h.balance("bob")) == (0, 50_000)
    assert h.reserved_today("carol") == 0
    assert states(h, t) == ["DEBITING", "FAILED"]
    assert [c["type"] for c in h.account_commands] == ["debit"]


async def test_credit_to_a_missing_account_is_refunded() -> None:
    h = with_dave()
    reply = await h.transfer("alice", "acc-dave", 5_000)
    t = reply["data"]["transferId"]
    assert (reply["status"], reply["code"]) == ("error", "ACCOUNT_NOT_FOUND")
    assert h.balance("alice") == 100_000 and h.sim.clearing == {"EUR": 0}
    assert [c["type"] for c in h.account_commands] == ["debit", "credit", "refund"]
    assert states(h, t) == ["DEBITING", "CREDITING", "REFUNDING", "FAILED"]
    assert h.reserved_today("alice") == 0


async def test_daily_limit_at_init_and_at_confirm() -> None:
    alice = SeedUser("alice", "acc-alice", 100_000, daily_limit_minor=10_000)
    h = Harness((alice, *DEFAULT_USERS[1:]))
    assert (await h.transfer("alice", "acc-bob", 8_000))["status"] == "ok"
    at_init = await h.init("alice", "acc-bob", 2_001)
    assert (at_init["status"], at_init["code"], at_init["data"]) == (
        "error", "LIMIT_EXCEEDED", {"remainingMinor": 2_000})
    one = await h.transfer_token("alice", "acc-bob", 1_500)
    two = await h.transfer_token("alice", "acc-bob", 1_500)  # both fit at init...
    assert (await h.confirm("alice", one, "k1"))["status"] == "ok"  # type: ignore[index]
    at_confirm = await h.confirm("alice", two, "k2")  # ...only one at confirm
    assert at_confirm is not None and at_confirm["code"] == "LIMIT_EXCEEDED"
    assert h.saga("alice", "k2") is None
    assert h.balance("alice") == 90_500 and h.reserved_today("alice") == 9_500


async def test_a_failed_transfer_gives_its_limit_back() -> None:
    carol = SeedUser("carol", "acc-carol", 0, daily_limit_minor=5_000)
    h = Harness((*DEFAULT_USERS[:2], carol))
    assert (await h.transfer("carol", "acc-bob", 5_000))["code"] == "INSUFFICIENT_FUNDS"
    again = await h.init("carol", "acc-bob", 5_000)
    assert again["status"] == "ok"


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{not json", "undecodable"),
        (b"[1, 2, 3]", "undecodable"),
        (None, "undecodable"),
        (orjson.dumps({"type": "transferInit", "payload": {}}), "invalid envelope"),
    ],
)
async def test_undecodable_input_is_dead_lettered(raw: bytes | None, reason: str) -> None:
    h = Harness()
    outs = await h.send(raw, b"some-key", partition=2)
    assert [o.topic for o in outs] == ["business.dlq"]
    [letter] = h.dead_letters
    assert letter["reason"].startswith(reason)
    # The value is never kept, only its size and digest: the original stays in its topic.
    assert "valueB64" not in letter
    assert letter.get("valueSize") == (None if raw is None else len(raw))
    assert letter.get("valueSha256") == (None if raw is None
                                         else hashlib.sha256(raw).hexdigest())
    assert letter["keyB64"] == base64.b64encode(b"some-key").decode()
    assert letter["keySize"] == len(b"some-key")
    assert (letter["sourceTopic"], letter["sourcePartition"]) == ("business.commands", 2)
    assert h.replies == []


def _envelope(h: Harness, **changes: Any) -> bytes:
    doc = orjson.loads(h.command("transferInit", "alice",
                                 {"toAccountId": "acc-bob", "amountMinor": 1, "currency": "EUR"},
                                 request_id="r-bad"))
    for name, value in changes.items():
        if value is None:
            doc.pop(name)
        else:
            doc[name] = value
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"operatorId": None}, "operatorId"),
        ({"sentAt": "yesterday"}, "sentAt"),
        ({"type": "transferCancel"}, "type"),
        ({"payload": "not an object"}, "payload"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_an_invalid_envelope_with_a_request_id_gets_invalid_request(
    changes: dict[str, Any], where: str,
) -> None:
    h = Harness()
    outs = await h.send(_envelope(h, **changes))
    assert [o.topic for o in outs] == ["business.replies"]
    reply = h.reply("r-bad")
    assert reply is not None and (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST")
    assert where in reply["message"]
    assert h.dead_letters == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"toAccountId": "acc-nobody", "amountMinor": 100, "currency": "EUR"}, "ACCOUNT_NOT_FOUND"),
        ({"toAccountId": "acc-alice", "amountMinor": 100, "currency": "EUR"}, "INVALID_REQUEST"),
        ({"toAccountId": "acc-bob", "amountMinor": 100, "currency": "USD"}, "INVALID_REQUEST"),
        ({"toAccountId": "acc-bob", "amountMinor": 0, "currency": "EUR"}, "INVALID_REQUEST"),
        ({"toAccountId": "acc-bob", "amountMinor": 1.5, "currency": "EUR"}, "INVALID_REQUEST"),
        ({"toAccountId": "acc-bob", "amountMinor": "100", "currency": "EUR"}, "INVALID_REQUEST"),
        ({"toAccountId": "acc-bob", "currency": "EUR"}, "INVALID_REQUEST"),
    ],
)
async def test_init_rejections(payload: dict[str, Any], code: str) -> None:
    h = Harness()
    rid = h.next_request_id()
    await h.send(h.command("transferInit", "alice", payload, request_id=rid))
    reply = h.reply(rid)
    assert reply is not None and (reply["status"], reply["code"]) == ("error", code)
    assert "data" not in reply or "transferToken" not in reply["data"]


async def test_a_blocked_user_is_forbidden() -> None:
    from app.domain.ports import UserStatus

    h = Harness((SeedUser("alice", "acc-alice", status=UserStatus.BLOCKED), *DEFAULT_USERS[1:]))
    assert (await h.init("alice", "acc-bob", 100))["code"] == "FORBIDDEN"


async def test_confirm_without_idempotency_key_is_invalid() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    request_id="r-noidem")
    await h.send(raw)
    reply = h.reply("r-noidem")
    assert reply is not None and (reply["status"], reply["code"]) == ("error", "INVALID_REQUEST")
    assert "idempotencyKey" in reply["message"]
    assert "check_pin" not in h.store.calls and h.store.token_uses == {}


async def test_confirm_whose_message_key_is_not_the_idempotency_key_is_invalid() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k1", request_id="r-key")
    await h.send(raw, key=b"another-key")
    assert h.reply("r-key")["code"] == "INVALID_REQUEST"  # type: ignore[index]
    assert h.saga("alice", "k1") is None


async def test_verify_otp_without_a_transfer_is_invalid() -> None:
    h = Harness()
    reply = await h.verify_otp("alice", "123456", "k-nothing")
    assert reply is not None and reply["code"] == "INVALID_REQUEST"


async def test_an_internal_error_becomes_a_reply_and_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that belongs to the record (here a bug it triggers) is poison: INTERNAL
    and a dead letter, and the partition moves on."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k1", request_id="r-c")

    async def bug(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug this record triggers")

    with monkeypatch.context() as patch:
        patch.setattr(h.store, "check_pin", bug)
        outs = await h.send(raw)
    assert sorted(o.topic for o in outs) == ["business.dlq", "business.replies"]
    reply = h.reply("r-c")
    assert reply is not None and (reply["status"], reply["code"]) == ("error", "INTERNAL")
    assert h.dead_letters[0]["reason"] == "internal error"
    assert h.saga("alice", "k1") is None
    await h.send(raw)  # the gateway retries the same request once the bug is fixed
    await h.run_until_quiet()
    assert h.reply("r-c")["status"] == "ok"  # type: ignore[index]
    assert h.balance("alice") == 95_000


async def test_an_outage_is_waited_out_not_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL unreachable is the infrastructure's failure: the record is retried with
    back-off until it is back, never answered INTERNAL nor dead-lettered nor skipped."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k1", request_id="r-c")
    original = h.store.check_pin
    failures = 6

    async def down_for_a_while(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionRefusedError("connection refused")
        return await original(*args, **kwargs)

    monkeypatch.setattr(h.store, "check_pin", down_for_a_while)
    outs = await h.send(raw)
    assert failures == 0 and h.pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert h.dead_letters == [] and [o.topic for o in outs].count("business.dlq") == 0
    await h.run_until_quiet()
    assert h.replies_for("r-c") == [h.reply("r-c")]  # one answer: the outcome
    assert h.reply("r-c")["status"] == "ok"  # type: ignore[index]
    assert h.balance("alice") == 95_000
    assert h.service.guard.counters["outage_retries"] == 6


async def test_invalid_account_events_and_saga_inputs_are_dead_lettered() -> None:
    h = Harness()
    assert h.service.route_account_event(b"{}", b"acc", 1)[0].topic == "business.dlq"
    outs = await h.service.handle_saga_input(b"nope", b"x", 1)
    assert [o.topic for o in outs] == ["business.dlq"]
    foreign = orjson.dumps({"commandId": "other:debit:\u00b2", "type": "debited",
                            "accountId": "acc-bob", "amountMinor": 1,
                            "occurredAt": "2030-01-02T00:00:00Z"})
    assert h.service.route_account_event(foreign, b"acc-bob", 0) == []


def _account_event(command_id: str) -> bytes:
    return orjson.dumps({"commandId": command_id, "type": "credited", "accountId": "acc-bob",
                         "amountMinor": 1, "balanceAfterMinor": 1,
                         "occurredAt": "2030-01-02T00:00:00Z"})


async def test_foreign_ids_are_never_relayed() -> None:
    """Another team's command ids look like anything; only ``<uuid>:<our step>:<partition
    that exists>`` is relayed. A foreign one is counted and ignored; one shaped like ours
    but naming a partition that does not exist is dead-lettered (aiokafka would raise
    "Unrecognized partition" on the relay)."""
    h = Harness()  # 6 partitions
    t = tid("alice", "k")
    for foreign in ("payroll-2024:credit:2024", f"{t.upper()}:debit:1", f"{t}:charge:1",
                    f"{t}:debit:-1", "x" * 120 + ":debit:1", f"{t}:debit:01x"):
        assert h.service.route_account_event(_account_event(foreign), b"acc-bob", 0) == [], \
            foreign
    assert h.service.counters["foreign_account_events"] == 6
    for out_of_range in (f"{t}:credit:6", f"{t}:credit:2024", f"{t}:refund:{'9' * 60}"):
        outs = h.service.route_account_event(_account_event(out_of_range), b"acc-bob", 3, 17)
        assert [o.topic for o in outs] == ["business.dlq"], out_of_range
        letter = orjson.loads(outs[0].value)
        assert (letter["sourceTopic"], letter["sourcePartition"], letter["sourceOffset"]) == (
            "account.events", 3, 17)
        assert "partition" in letter["reason"]
    ours = h.service.route_account_event(_account_event(f"{t}:credit:5"), b"acc-bob", 0)
    assert [(o.topic, o.partition) for o in ours] == [("business.saga-inputs", 5)]
    for key in (None, b"acc-alice"):  # account.events is keyed by the account
        outs = h.service.route_account_event(_account_event(f"{t}:credit:5"), key, 0)
        assert [o.topic for o in outs] == ["business.dlq"], key
    # funding.events answers this service only: anything else goes to operators
    for charge in ("payroll-2024:charge:1", f"{t}:debit:1", f"{t}:charge:6"):
        outs = h.service.route_funding_event(
            orjson.dumps({"chargeId": charge, "status": "captured"}), b"k", 0)
        assert [o.topic for o in outs] == ["business.dlq"], charge
    # a saga input whose id names another partition was not relayed by this service
    misrouted = orjson.dumps({"kind": "accountEvent",
                              "accountEvent": orjson.loads(_account_event(f"{t}:credit:5"))})
    assert await h.service.handle_saga_input(misrouted, t.encode(), 4) == []
    assert h.service.counters["misrouted_saga_inputs"] == 1


async def test_the_record_key_must_be_the_idempotency_key_or_the_request_id() -> None:
    """A null key passes nothing: the confirm changes nothing (no PIN check, no token claim,
    no reservation, no saga), and the same confirm keyed properly then moves money once."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 5_000)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k-null", request_id="r-null")
    calls = len(h.store.calls)
    for key in (None, b"", b"r-null", b"k-null "):
        outs = await h.send(raw, key=key, partition=1)
        assert [o.topic for o in outs] == ["business.replies"]
        reply = orjson.loads(outs[0].value)
        assert (reply["code"], reply["requestId"]) == ("INVALID_REQUEST", "r-null")
    assert h.store.calls[calls:] == [] and h.store.token_uses == {}
    assert h.store.reservations == {} and h.saga("alice", "k-null") is None
    assert h.reply_cache.rows == {k: v for k, v in h.reply_cache.rows.items()
                                  if "r-null" not in k}  # the refusal is not saved
    reply = await h.confirm("alice", token, "k-null", request_id="r-null")
    assert reply is not None and reply["status"] == "ok", reply
    assert len(h.sim.applied_of(tid("alice", "k-null"), "debit")) == 1
    assert h.balance("alice") == 95_000
    # a command without an idempotency key is keyed by its requestId
    init = h.command("transferInit", "alice", {"toAccountId": "acc-bob", "amountMinor": 1,
                                               "currency": "EUR"}, request_id="r-init")
    for key in (None, b"another"):
        outs = await h.send(init, key=key)
        assert orjson.loads(outs[0].value)["code"] == "INVALID_REQUEST"
    outs = await h.send(init, key=b"r-init")
    assert orjson.loads(outs[0].value)["status"] == "ok"


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        # over 64 KiB: never parsed; the requestId is read from the first 4 KiB only
        (b'{"requestId": "r-big", "type": "transferInit", "payload": "'
         + b"x" * 800_000 + b'"}', "INVALID_REQUEST"),
        (b'{"type": "transferInit", "payload": "' + b"x" * 800_000
         + b'", "requestId": "r-big"}', "dlq"),
        (b'{"requestId": "' + b"r" * 600_000 + b'", "type": "transferInit"}', "dlq"),
        # a requestId over 128 characters is not readable: cutting it would address
        # another request
        (orjson.dumps({"requestId": "r" * 129, "type": "transferInit"}), "dlq"),
        (b'{"requestId": "r-deep", "type": "transferInit", "payload": {"a": '
         + b"[" * 32 + b"]" * 32 + b"}}", "INVALID_REQUEST"),  # 34 levels deep
        (b"[" * 5000 + b"]" * 5000, "dlq"),
        (b'{"requestId": "r-pin", "pin": "73910482",}', "dlq"),  # trailing comma: not JSON
    ],
)
async def test_limits_and_bounded_answers(raw: bytes, answer: str) -> None:
    h = Harness()
    outs = await h.send(raw, key=b"k")
    assert len(outs) == 1
    out = outs[0]
    assert len(out.value) < 2048 and len(out.key or b"") <= 128
    if answer == "dlq":
        assert out.topic == "business.dlq"
        letter = orjson.loads(out.value)
        assert letter["valueSha256"] == hashlib.sha256(raw).hexdigest()
        assert letter["valueSize"] == len(raw) and "valueB64" not in letter
        assert PIN not in out.value.decode()
    else:
        reply = orjson.loads(out.value)
        assert (out.topic, reply["status"], reply["code"]) == (
            "business.replies", "error", "INVALID_REQUEST")
        assert reply["requestId"] in ("r-big", "r-deep")


async def test_error_replies_echo_bounded_fields() -> None:
    h = Harness()
    doc = {"type": "t" * 10_000, "requestId": "r-echo", "idempotencyKey": "i" * 5_000,
           "operatorId": "alice", "payload": {}, "extra" * 2_000: 1}
    outs = await h.send(orjson.dumps(doc), key=b"k")
    reply = orjson.loads(outs[0].value)
    assert reply["code"] == "INVALID_REQUEST" and reply["requestId"] == "r-echo"
    assert len(reply["type"]) <= 64 and "idempotencyKey" not in reply
    assert len(reply["message"]) <= 512 and len(outs[0].value) < 1024


# --------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------


async def test_no_pin_otp_or_token_in_replies_dead_letters_or_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    h = Harness(otps=["583920"])
    await h.transfer("alice", "acc-bob", 5_000)
    token = await h.transfer_token("alice", "acc-bob", 20_000)
    await h.confirm("alice", token, "k-otp", pin="44417290")  # wrong PIN
    await h.confirm("alice", token, "k-otp")
    await h.verify_otp("alice", "583929", "k-otp")  # wrong OTP
    await h.verify_otp("alice", "5839x", "k-otp")  # malformed OTP
    await h.verify_otp("alice", h.otp_for(tid("alice", "k-otp")), "k-otp")
    bad_pin = await h.transfer_token("alice", "acc-bob", 1_000)
    await h.confirm("alice", bad_pin, "k-bad", pin="98x76y54")  # malformed PIN
    await h.send(b"\x00pin=73910482 otp=583920")  # undecodable
    await h.send(orjson.dumps({"pin": PIN, "accessToken": h.access_token("alice")}))

    async def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug this record triggers")

    with monkeypatch.context() as patch:
        patch.setattr(h.store, "check_pin", bug)
        await h.confirm("alice", bad_pin, "k-internal")
    h.service.route_account_event(
        orjson.dumps({"commandId": "acct-cmd-1", "type": "debited", "accountId": "acc-bob",
                      "amountMinor": 1, "occurredAt": "2030-01-02T00:00:00Z"}), b"acc-bob", 0)

    secrets = {PIN, "44417290", "98x76y54", "583929", "5839x", *h.new_otp.issued}
    transfer_tokens = set()
    for item in h.history:
        try:
            doc = orjson.loads(item.value or b"null")
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("accessToken"), str):
            secrets.add(doc["accessToken"])
            transfer_tokens.add(doc.get("payload", {}).get("transferToken"))
    secrets |= {t for t in transfer_tokens if t}
    assert len(secrets) > 12
    assert h.new_otp.issued == ["583920"]  # the OTP that was sent is among the checked

    texts = []
    for reply in h.replies:
        if reply["type"] == "transferInit" and reply["status"] == "ok":
            reply = {**reply, "data": {k: v for k, v in reply["data"].items()
                                       if k != "transferToken"}}
        texts.append(orjson.dumps(reply).decode())
    texts += [orjson.dumps(letter).decode() for letter in h.dead_letters]
    assert len(h.dead_letters) == 3
    records = caplog.records
    assert any(r.exc_info for r in records) and any(r.levelno == logging.DEBUG for r in records)
    texts += [caplog.text] + [r.getMessage() for r in records]
    texts += [caplog.handler.format(r) for r in records]
    leaks = sorted({s for s in secrets for text in texts if s in text})
    assert leaks == []


# --------------------------------------------------------------------------------------
# the random mix
# --------------------------------------------------------------------------------------


def _double_click(h: Harness, raw: bytes) -> bytes:
    """The same command again from the user: a new request id, a fresh access token."""
    doc = orjson.loads(raw)
    doc["requestId"] = h.next_request_id()
    doc["accessToken"] = h.access_token(doc["operatorId"])
    return orjson.dumps(doc)


async def test_money_is_conserved_under_a_random_mix_with_duplicates() -> None:
    rng = random.Random(20300102)
    users = [SeedUser(f"u{i:02d}", f"acc-{i:02d}", rng.randrange(0, 100_000),
                      otp_threshold_minor=15_000) for i in range(20)]
    ghost = SeedUser("ghost", "acc-ghost", None)  # in the directory, not at the account center
    h = Harness((*users, ghost), otp_seed=2030)
    initial_total, initial = h.sim.total(), h.sim.balances()
    accounts = [u.account_id for u in (*users, ghost)]
    commands: list[bytes] = []
    confirm_rids: dict[str, list[str]] = {}  # idempotency key -> confirm request ids
    payer_of: dict[str, str] = {}
    awaiting_otp: set[str] = set()
    started = dropped = kept = 0

    def open_sagas() -> bool:
        return any(not saga.is_final for saga in h.sagas.scan())

    for _ in range(200_000):
        if started >= 200 and not h.outbox and not awaiting_otp and not open_sagas():
            break
        r = rng.random()
        if started < 200 and r < 0.2:
            payer = rng.choice(users)
            payee = rng.choice([a for a in accounts if a != payer.account_id])
            idem = f"k-{started:03d}"
            started += 1
            payer_of[idem] = payer.user_id
            token = await h.transfer_token(payer.user_id, payee, rng.randint(1, 20_000))
            if rng.random() < 0.1:
                rid = h.next_request_id()
                confirm_rids.setdefault(idem, []).append(rid)
                await h.confirm(payer.user_id, token, idem, pin=WRONG_PIN, request_id=rid,
                                run=False)
            rid = h.next_request_id()
            confirm_rids.setdefault(idem, []).append(rid)
            raw = h.command("transferConfirm", payer.user_id,
                            {"transferToken": token, "pin": payer.pin}, idem=idem,
                            request_id=rid)
            commands.append(raw)
            await h.send(raw)
            reply = h.reply(rid)
            if reply is not None and reply.get("code") == "OTP_REQUIRED":
                awaiting_otp.add(idem)
        elif r < 0.3 and commands:
            raw = rng.choice(commands)
            if rng.random() < 0.5:
                await h.send(raw)  # a redelivery: the same request id
            else:
                await h.send(_double_click(h, raw))
        elif r < 0.4 and awaiting_otp:
            idem = rng.choice(sorted(awaiting_otp))
            user = payer_of[idem]
            saga = h.saga(user, idem)
            assert saga is not None
            if saga.state is not State.AWAITING_OTP:
                awaiting_otp.discard(idem)
                continue
            right = h.otp_for(saga.transfer.transfer_id)
            otp = wrong_otp(right) if rng.random() < 0.2 else right
            raw = h.command("verifyOtp", user, {"otp": otp}, idem=idem)
            commands.append(raw)
            await h.send(raw)
        elif r < 0.95 and h.outbox:
            i = rng.randrange(len(h.outbox))
            x = rng.random()
            if x < 0.05:
                kept += 1
                await h.step(i, keep=True)  # delivered now and again later
            elif x < 0.08:
                dropped += 1
                await h.step(i, deliver=False)  # its consumer crashed before sending
            elif x < 0.1:
                dropped += 1
                del h.outbox[i]  # lost on the way
            else:
                await h.step(i)
        else:
            h.clock.advance(rng.uniform(0.1, 1.0))
            await h.tick()
    else:
        raise AssertionError("the random mix did not settle")

    sagas = list(h.sagas.scan())
    assert len(sagas) > 100 and started == 200 and dropped > 10 and kept > 10
    assert h.sim.deliveries > len(h.sim.processed)  # commands did arrive more than once
    final_states = {saga.state for saga in sagas}
    assert {State.COMPLETED, State.FAILED} <= final_states <= {State.COMPLETED, State.FAILED}
    # money: conserved, nothing left in clearing, and moved exactly by the completed ones
    assert h.sim.total() == initial_total
    assert set(h.sim.clearing.values()) == {0}
    expected = dict(initial)
    for saga in sagas:
        if saga.state is State.COMPLETED:
            expected[saga.transfer.from_account_id] -= saga.transfer.amount_minor
            expected[saga.transfer.to_account_id] += saga.transfer.amount_minor
    assert h.sim.balances() == expected
    assert min(expected.values()) >= 0
    # reservations: kept by the completed transfers only
    completed = {s.transfer.transfer_id for s in sagas if s.state is State.COMPLETED}
    assert set(h.store.reservations) == completed
    # every transfer ended: COMPLETED, or an error code, none stuck
    codes = {s.code for s in sagas if s.state is State.FAILED}
    assert codes <= {"INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "OTP_LOCKED", "OTP_EXPIRED"}
    for idem, rids in confirm_rids.items():
        if h.saga(payer_of[idem], idem) is None:
            last = [h.reply(rid) for rid in rids][-1]
            assert last is not None and last["status"] == "error", (idem, last)


async def test_a_confirm_delivered_again_after_a_crash_sends_the_same_otp_again() -> None:
    """The worker died after writing the saga and before the OTP notification reached the
    broker (its sends dropped); the confirm, never committed, is delivered again. The saga
    is found and its decision re-sent, and the OTP with it: the same code, unsealed from the
    saga (no plain OTP is stored), so the user is not stranded until OTP_EXPIRED."""
    h = Harness()
    init = await h.init("alice", "acc-bob", 20_000)
    await h.confirm("alice", init["data"]["transferToken"], "k1", request_id="r-c",
                    deliver=False)
    assert h.otp_messages == [] and h.replies_for("r-c") == []  # everything was lost
    confirm = h.history[-1]
    await h.process(confirm)  # delivered again
    [note] = h.otp_messages
    assert note["otp"] == h.new_otp.issued[-1] and note["phone"] == "+15550101"
    assert h.reply("r-c")["code"] == "OTP_REQUIRED"  # type: ignore[index]
    assert len(h.new_otp.issued) == 1  # the same code, not a new one
    done = await h.verify_otp("alice", note["otp"], "k1", request_id="r-otp")
    assert done is not None and done["data"]["state"] == "COMPLETED"
    assert (h.balance("alice"), h.balance("bob")) == (80_000, 70_000)


async def test_no_otp_is_sent_again_once_the_user_has_tried_one() -> None:
    h = Harness()
    init = await h.init("alice", "acc-bob", 20_000)
    await h.confirm("alice", init["data"]["transferToken"], "k1", request_id="r-c")
    confirm = next(d for d in h.history if d.topic == "business.commands"
                   and d.value is not None and b'"transferConfirm"' in d.value)
    wrong = await h.verify_otp("alice", "000000" if h.new_otp.issued[-1] != "000000"
                               else "111111", "k1", request_id="r-bad")
    assert wrong is not None and wrong["code"] == "INVALID_OTP"
    before = len(h.otp_messages)
    await h.process(confirm)
    assert len(h.otp_messages) == before
