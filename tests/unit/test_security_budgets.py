"""Issue 11, points 2, 3, 6, 7, 10 and the saga's side of 4, on the fakes: per-user PIN and
OTP budgets that hold across requests, keys and partitions; the payee's currency at init;
top-ups confirmed with the PIN under their own daily limit; identifiers that could forge a
derived id refused; an account event refusing a command id sent with other content is
never taken as the answer. The PostgreSQL side is in tests/integration/test_postgres_store.py, the
whole system in tests/integration/test_security_e2e.py.

Over 400 lines: one issue's points, a section each, on the same fakes.
"""

from __future__ import annotations

from typing import Any

import jwt
import orjson
from fakes import DEFAULT_USERS, PIN, Harness, SeedUser

from app.domain.ports import FundingSource, UserStatus
from app.domain.transfer_saga import State
from schemas.wire import ErrorCode

WRONG_PIN = "00000000"
HOUR = 3600.0


async def _confirm_on(h: Harness, partition: int, token: str, idem: str, pin: str,
                      request_id: str | None = None) -> dict[str, Any]:
    rid = request_id or h.next_request_id()
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": pin},
                    idem=idem, request_id=rid)
    await h.send(raw, partition=partition)
    await h.run_until_quiet()
    reply = h.reply(rid)
    assert reply is not None
    return reply


# --- point 2: the PIN budget ---------------------------------------------------------


async def test_twelve_wrong_pins_spread_over_keys_and_partitions_lock_at_the_fifth() -> None:
    h = Harness()
    codes, left = [], []
    for i in range(12):
        token = await h.transfer_token("alice", "acc-bob", 1_000)
        reply = await _confirm_on(h, i % 6, token, f"k-{i}", WRONG_PIN)
        codes.append(reply["code"])
        left.append((reply.get("data") or {}).get("attemptsLeft"))
    assert codes == [ErrorCode.INVALID_PIN] * 4 + [ErrorCode.PIN_LOCKED] * 8
    assert left[:4] == [4, 3, 2, 1]
    # Even the right PIN is refused while locked, under yet another key and partition.
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    reply = await _confirm_on(h, 5, token, "k-right", PIN)
    assert reply["code"] == ErrorCode.PIN_LOCKED
    assert h.account_commands == [] and h.balance("alice") == 100_000


async def test_one_request_id_under_many_keys_counts_every_time() -> None:
    """Before issue 11 a failure counted once per requestId, per partition."""
    h = Harness()
    for i in range(5):
        token = await h.transfer_token("alice", "acc-bob", 1_000)
        await _confirm_on(h, i, token, f"k-same-rid-{i}", WRONG_PIN, request_id=f"r-{i}")
    assert h.store.pin_failures("alice") == 5
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    assert (await _confirm_on(h, 0, token, "k-after", PIN))["code"] == ErrorCode.PIN_LOCKED


async def test_a_kafka_redelivery_of_a_wrong_pin_counts_once() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    await _confirm_on(h, 2, token, "k-redelivered", WRONG_PIN)
    record = h.history[-1]
    for _ in range(6):
        h.reply_cache.rows.clear()  # nothing saved survived: the record is decided again
        await h.process(record)
    assert h.store.pin_failures("alice") == 1


async def test_the_lock_ends_after_its_time_and_a_right_pin_resets_the_count() -> None:
    h = Harness(pin_lock_seconds=HOUR)
    for i in range(5):
        token = await h.transfer_token("alice", "acc-bob", 1_000)
        await _confirm_on(h, i, token, f"k-lock-{i}", WRONG_PIN)
    h.clock.advance(HOUR - 5)
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    assert (await _confirm_on(h, 0, token, "k-early", PIN))["code"] == ErrorCode.PIN_LOCKED
    h.clock.advance(10)
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    wrong = await _confirm_on(h, 0, token, "k-after-1", WRONG_PIN)
    assert (wrong["code"], wrong["data"]) == (ErrorCode.INVALID_PIN, {"attemptsLeft": 4})
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    ok = await _confirm_on(h, 0, token, "k-after-2", PIN)
    assert ok["status"] == "ok"
    assert h.store.pin_failures("alice") == 0


async def test_an_operator_unlock_ends_the_lock() -> None:
    h = Harness()
    for i in range(5):
        token = await h.transfer_token("alice", "acc-bob", 1_000)
        await _confirm_on(h, i, token, f"k-u-{i}", WRONG_PIN)
    assert await h.store.unlock_user("alice")
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    assert (await _confirm_on(h, 0, token, "k-unlocked", PIN))["status"] == "ok"


# --- point 3: the OTP budgets --------------------------------------------------------


async def _pending(h: Harness, idem: str, amount: int = 50_000) -> dict[str, Any]:
    token = await h.transfer_token("alice", "acc-bob", amount)
    reply = await h.confirm("alice", token, idem)
    assert reply is not None
    return reply


async def test_otp_guessing_across_transfers_is_locked_at_the_budget() -> None:
    h = Harness()  # 5 wrong OTPs per transfer, 10 per user in 24 h
    for n in range(2):
        assert (await _pending(h, f"k-guess-{n}"))["code"] == "OTP_REQUIRED"
        for _ in range(5):
            last = await h.verify_otp("alice", "000000", f"k-guess-{n}")
        assert last is not None and last["code"] == ErrorCode.OTP_LOCKED
    sent = len(h.otp_messages)
    refused = await _pending(h, "k-guess-2")
    assert (refused["status"], refused["code"]) == ("error", ErrorCode.OTP_LOCKED)
    assert len(h.otp_messages) == sent  # no SMS for a refused step-up
    assert h.saga("alice", "k-guess-2") is None and h.reserved_today("alice") == 0
    small = await h.transfer("alice", "acc-bob", 1_000)  # below the threshold: no step-up
    assert small["status"] == "ok"
    h.clock.advance(24 * HOUR + 1)  # the window passes
    assert (await _pending(h, "k-guess-3"))["code"] == "OTP_REQUIRED"


async def test_the_budget_reached_during_a_transfer_refuses_even_the_right_otp() -> None:
    h = Harness(otp_user_max_failures=6)
    assert (await _pending(h, "k-a"))["code"] == "OTP_REQUIRED"
    assert (await _pending(h, "k-b"))["code"] == "OTP_REQUIRED"
    for _ in range(5):
        await h.verify_otp("alice", "000000", "k-a")
    await h.verify_otp("alice", "000000", "k-b")  # the 6th wrong OTP of the user
    right = h.otp_for(h.saga("alice", "k-b").transfer.transfer_id)  # type: ignore[union-attr]
    reply = await h.verify_otp("alice", right, "k-b")
    assert reply is not None and reply["code"] == ErrorCode.OTP_LOCKED
    saga = h.saga("alice", "k-b")
    assert saga is not None and saga.state is State.FAILED
    assert h.account_commands == []


async def test_a_redelivered_wrong_otp_counts_once() -> None:
    h = Harness()
    assert (await _pending(h, "k-r"))["code"] == "OTP_REQUIRED"
    await h.verify_otp("alice", "000000", "k-r")
    for _ in range(3):
        await h.process(h.history[-1])
    assert len(h.store.otp_failures) == 1


async def test_unlock_also_ends_the_otp_lock() -> None:
    h = Harness(otp_user_max_failures=5)
    await _pending(h, "k-1")
    for _ in range(5):
        await h.verify_otp("alice", "000000", "k-1")
    assert (await _pending(h, "k-2"))["code"] == ErrorCode.OTP_LOCKED
    await h.store.unlock_user("alice")
    assert (await _pending(h, "k-3"))["code"] == "OTP_REQUIRED"


async def test_six_otp_sends_in_fifteen_minutes_the_sixth_is_rate_limited() -> None:
    h = Harness()
    codes = []
    for n in range(6):
        codes.append((await _pending(h, f"k-send-{n}"))["code"])
        h.clock.advance(60)
    assert codes == ["OTP_REQUIRED"] * 5 + [ErrorCode.RATE_LIMITED]
    assert len(h.otp_messages) == 5
    h.clock.advance(15 * 60 - 6 * 60 + 1)  # the first send left the window
    assert (await _pending(h, "k-send-6"))["code"] == "OTP_REQUIRED"


async def test_a_duplicate_confirm_sends_no_second_otp_and_spends_no_budget() -> None:
    h = Harness(otp_max_sends=1)
    token = await h.transfer_token("alice", "acc-bob", 50_000)
    first = await h.confirm("alice", token, "k-dup")
    again = await h.confirm("alice", token, "k-dup")
    assert first is not None and again is not None
    assert (first["code"], again["code"]) == ("OTP_REQUIRED", "OTP_REQUIRED")
    assert len(h.otp_messages) == 1


# --- point 6: the payee at init ------------------------------------------------------


async def test_init_refuses_a_payee_in_another_currency() -> None:
    h = Harness([*DEFAULT_USERS, SeedUser("dave", "acc-dave", 0, currency="USD")])
    reply = await h.init("alice", "acc-dave", 1_000)
    assert (reply["status"], reply["code"]) == ("error", ErrorCode.CURRENCY_MISMATCH)
    assert "data" not in reply and h.account_commands == []


async def test_init_refuses_a_transfer_to_oneself() -> None:
    h = Harness()
    reply = await h.init("alice", "acc-alice", 1_000)
    assert (reply["status"], reply["code"]) == ("error", ErrorCode.INVALID_REQUEST)


# --- point 7: top-ups ----------------------------------------------------------------


def _with_card(h: Harness, user: str = "alice") -> str:
    source = f"card-{user}"
    h.store.funding_sources[source] = FundingSource(source, user, "card", "Visa", UserStatus.ACTIVE)
    return source


async def _top_up(h: Harness, idem: str, amount: int, pin: str = PIN,
                  partition: int = 0) -> dict[str, Any]:
    source = _with_card(h)
    rid = h.next_request_id()
    raw = h.command("topUp", "alice", {"fundingSourceId": source, "amountMinor": amount,
                                       "currency": "EUR", "pin": pin}, idem=idem,
                    request_id=rid)
    await h.send(raw, partition=partition)
    reply = h.reply(rid)
    return reply if reply is not None else {}


async def test_a_top_up_needs_the_right_pin() -> None:
    h = Harness()
    reply = await _top_up(h, "t-wrong", 1_000, pin=WRONG_PIN)
    assert (reply["code"], reply["data"]) == (ErrorCode.INVALID_PIN, {"attemptsLeft": 4})
    assert h.emitted_on(h.topics.funding_commands) == []
    await _top_up(h, "t-right", 1_000)
    charges = h.emitted_on(h.topics.funding_commands)
    assert [c["amountMinor"] for c in charges] == [1_000]


async def test_top_ups_and_transfers_spend_one_pin_budget() -> None:
    h = Harness()
    for i in range(3):
        await _top_up(h, f"t-{i}", 1_000, pin=WRONG_PIN, partition=i)
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    assert (await _confirm_on(h, 4, token, "k-x", WRONG_PIN))["data"] == {"attemptsLeft": 1}
    assert (await _top_up(h, "t-last", 1_000, pin=WRONG_PIN))["code"] == ErrorCode.PIN_LOCKED
    assert (await _top_up(h, "t-right", 1_000))["code"] == ErrorCode.PIN_LOCKED


async def test_top_ups_count_against_the_daily_top_up_limit() -> None:
    h = Harness(topup_daily_limit_minor=5_000)
    await _top_up(h, "t-1", 3_000)
    over = await _top_up(h, "t-2", 2_001)
    assert (over["status"], over["code"]) == ("error", ErrorCode.LIMIT_EXCEEDED)
    await _top_up(h, "t-3", 2_000)
    assert [c["amountMinor"] for c in h.emitted_on(h.topics.funding_commands)] == [3_000, 2_000]
    assert h.reserved_today("alice") == 0  # the transfers' limit is apart
    h.clock.advance(24 * HOUR)  # a new UTC day
    await _top_up(h, "t-4", 5_000)
    assert len(h.emitted_on(h.topics.funding_commands)) == 3


# --- point 10: identifiers that go into derived ids ----------------------------------


async def test_identifiers_with_the_separator_or_control_characters_are_refused() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    for field, value in (("idempotencyKey", "k\x1fx"), ("idempotencyKey", "k\x00"),
                         ("idempotencyKey", "k\x85"), ("operatorId", "alice\x1f")):
        rid = h.next_request_id()
        doc = orjson.loads(h.command("transferConfirm", "alice",
                                     {"transferToken": token, "pin": PIN}, idem="k-ok",
                                     request_id=rid))
        doc[field] = value
        await h.send(orjson.dumps(doc), key=doc["idempotencyKey"].encode())
        reply = h.reply(rid)
        assert reply is not None and reply["code"] == ErrorCode.INVALID_REQUEST, (field, reply)
        assert field in reply["message"]
    assert h.account_commands == [] and h.store.token_uses == {}


# --- point 4, the saga's side: a command id sent again with other content ------------


async def test_an_account_command_replayed_with_another_amount_is_refused_and_ignored() -> None:
    h = Harness()
    reply = await h.transfer("alice", "acc-bob", 5_000, idem="k-cid")
    assert reply["status"] == "ok"
    debit = next(c for c in h.account_commands if c["type"] == "debit")
    forged = orjson.dumps({**debit, "amountMinor": 50_000})
    event = orjson.loads(h.sim.apply(forged))
    assert (event["type"], event["reason"]) == ("rejected", "COMMAND_ID_CONFLICT")
    assert h.balance("alice") == 95_000  # applied once, at its first amount
    routed = h.service.route_account_event(orjson.dumps(event), b"acc-alice", 0)
    outs = await h.service.handle_saga_input(routed[0].value, routed[0].key,
                                             routed[0].partition or 0)
    assert outs == []
    saga = h.saga("alice", "k-cid")
    assert saga is not None and saga.state is State.COMPLETED
    assert h.service.counters["command_id_conflicts"] == 1


async def test_every_attempt_has_its_own_command_ids() -> None:
    h = Harness()
    await h.transfer("alice", "acc-bob", 1_000, idem="k-1")
    await h.transfer("alice", "acc-bob", 1_000, idem="k-2")
    ids = [c["commandId"] for c in h.account_commands]
    assert len(ids) == len(set(ids)) == 4
    attempts = {cid.split(":")[1] for cid in ids}
    assert len(attempts) == 2 and all(len(a) == 16 for a in attempts)


async def test_a_confirm_refused_by_the_limit_leaves_its_key_and_token_free() -> None:
    """The claim and the reservation stand or fall together: with idempotency records a
    key bound to a token by a refused confirm would be refused for any other token."""
    alice = SeedUser("alice", "acc-alice", 100_000, daily_limit_minor=10_000)
    h = Harness((alice, *DEFAULT_USERS[1:]))
    assert (await h.transfer("alice", "acc-bob", 8_000))["status"] == "ok"
    big = await h.transfer_token("alice", "acc-bob", 2_000)
    small = await h.transfer_token("alice", "acc-bob", 1_000)
    assert (await h.transfer("alice", "acc-bob", 1_500))["status"] == "ok"  # 9,500 used
    refused = await h.confirm("alice", big, "k-limit")
    assert refused is not None and refused["code"] == ErrorCode.LIMIT_EXCEEDED
    assert h.store.token_uses.get(_jti(big)) is None
    retried = await h.confirm("alice", small, "k-limit")  # the same key, another token
    assert retried is not None and retried["code"] == ErrorCode.LIMIT_EXCEEDED  # 500 left
    assert h.store.token_uses.get(_jti(small)) is None
    tiny = await h.transfer_token("alice", "acc-bob", 500)
    done = await h.confirm("alice", tiny, "k-limit")  # the key was never consumed
    assert done is not None and done["status"] == "ok", done


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_a_request_older_than_the_retention_window_is_neither_acted_on_nor_answered(
) -> None:
    """Point 4: past the window its duplicates can no longer be recognised (replies and
    sagas are purged), so it could only be answered differently: it is not answered."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    doc = orjson.loads(h.command("transferConfirm", "alice",
                                 {"transferToken": token, "pin": PIN}, idem="k-old",
                                 request_id="r-old"))
    doc["sentAt"] = "2029-12-31T23:59:00Z"  # 24 h + 1 min before the harness's clock
    calls = len(h.store.calls)
    assert await h.send(orjson.dumps(doc)) == []
    # Nothing kept under the key (no saga, no idempotency record): nothing decided, nothing
    # answered; the only store call is the read of the key's idempotency record.
    assert h.reply("r-old") is None and h.store.calls[calls:] == ["kept_outcome"]
    assert h.service.counters["stale_requests_unanswered"] == 1
    doc["sentAt"] = "2030-01-01T00:01:00Z"  # inside the window: handled
    await h.send(orjson.dumps(doc))
    await h.run_until_quiet()
    assert h.reply("r-old") is not None and h.reply("r-old")["status"] == "ok"  # type: ignore[index]


DAY = 24 * 3600


async def test_a_stale_retry_of_a_manual_review_transfer_gets_its_outcome() -> None:
    """Finding F8: a MANUAL_REVIEW saga is never purged; a retry whose sentAt is older than
    the window (a gateway whose clock is a day behind) is answered from it, not ignored."""
    h = Harness()
    h.sim.close("acc-bob")
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    await h.confirm("alice", token, "k-review", run=False)
    await h.step()  # the debit
    h.sim.close("acc-alice")  # the refund refused too
    await h.run_until_quiet()
    saga = h.saga("alice", "k-review")
    assert saga is not None and saga.state is State.MANUAL_REVIEW
    h.clock.advance(DAY + 3600)
    doc = orjson.loads(h.command("transferConfirm", "alice",
                                 {"transferToken": token, "pin": PIN}, idem="k-review",
                                 request_id="r-late"))
    doc["sentAt"] = "2030-01-01T00:00:00Z"  # a day and more behind the harness's clock
    await h.send(orjson.dumps(doc))
    reply = h.reply("r-late")
    assert reply is not None, "a stale retry of a kept saga got no answer"
    assert (reply["status"], reply["code"]) == ("error", "INTERNAL")
    assert reply["data"] == {"transferId": saga.transfer.transfer_id,
                             "state": "MANUAL_REVIEW"}
    assert h.saga("alice", "k-review") == saga  # nothing decided
    assert h.service.counters["stale_requests_unanswered"] == 0


async def test_a_command_sent_in_the_future_is_refused_not_ignored() -> None:
    """Finding F8: a sentAt beyond the clock-skew bound (5 minutes) would keep the command
    inside the retention window for ever: INVALID_REQUEST, not saved, nothing decided;
    the same request with a right sentAt is then handled."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    doc = orjson.loads(h.command("transferConfirm", "alice",
                                 {"transferToken": token, "pin": PIN}, idem="k-future",
                                 request_id="r-future"))
    doc["sentAt"] = "2030-01-02T00:05:01Z"  # 301 s ahead of the harness's clock
    calls = len(h.store.calls)
    await h.send(orjson.dumps(doc))
    reply = h.reply("r-future")
    assert reply is not None and reply["code"] == ErrorCode.INVALID_REQUEST, reply
    assert "sentAt" in reply["message"]
    assert h.store.calls[calls:] == [] and h.saga("alice", "k-future") is None
    doc["sentAt"] = "2030-01-02T00:04:59Z"  # within the bound: handled
    await h.send(orjson.dumps(doc))
    await h.run_until_quiet()
    done = h.reply("r-future")
    assert done is not None and done["status"] == "ok", done
