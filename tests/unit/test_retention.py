"""Finished sagas and saved replies are kept for the retention window, then forgotten."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fakes import Harness

from app.domain.ports import KeptOutcome
from app.domain.transfer_saga import State
from app.transfers.ids import transfer_id_for
from schemas.wire import ErrorCode

DAY = 24 * 3600


async def _completed(h: Harness, idem: str) -> str:
    """A completed transfer under ``idem``; returns its transfer token."""
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    reply = await h.confirm("alice", token, idem)
    assert reply is not None and reply["status"] == "ok"
    return token


async def test_nothing_is_forgotten_inside_the_window() -> None:
    h = Harness(purge_interval_seconds=60)
    await _completed(h, "k-keep")
    h.clock.advance(DAY - 300)  # three purges run, all inside the window
    for _ in range(3):
        h.clock.advance(61)
        await h.tick(0)
    assert h.saga("alice", "k-keep") is not None
    assert h.reply_cache.rows


async def test_finished_sagas_and_replies_are_purged_after_the_window() -> None:
    h = Harness(purge_interval_seconds=60)
    token = await _completed(h, "k-old")
    balance = h.balance("alice")
    h.clock.advance(DAY + 61)
    await h.tick(0)  # schedules the first purge of partition 0
    h.clock.advance(61)
    await h.tick(0)
    assert h.saga("alice", "k-old") is None
    assert not h.reply_cache.rows
    # The same confirm after the window: no saga, no saved reply, the transfer token has
    # long expired; the kept idempotency record answers with the transfer's own outcome
    # (before issue 11 point 4: TOKEN_EXPIRED), and no money moves.
    commands = len(h.account_commands)
    again = await h.confirm("alice", token, "k-old")
    assert again is not None and again["status"] == "ok", again
    assert again["data"] == {"transferId": transfer_id_for("alice", "k-old"),
                             "state": "COMPLETED"}
    assert h.balance("alice") == balance and len(h.account_commands) == commands


async def test_a_key_reused_after_the_purge_is_refused_never_answered_with_the_old_outcome(
) -> None:
    h = Harness(purge_interval_seconds=60)
    await _completed(h, "k-reuse")
    events_before = {e["eventId"] for e in h.transfer_events}
    await _purge(h)
    assert h.saga("alice", "k-reuse") is None
    # A new transfer token (another payee and amount) under the old key.
    token = await h.transfer_token("alice", "acc-carol", 2_500)
    commands = len(h.account_commands)
    reply = await h.confirm("alice", token, "k-reuse")
    assert reply is not None and reply["code"] == ErrorCode.IDEMPOTENCY_KEY_REUSED, reply
    assert reply["status"] == "error" and "transferId" not in (reply.get("data") or {})
    assert len(h.account_commands) == commands  # no command, so no old event answers it
    assert {e["eventId"] for e in h.transfer_events} == events_before  # no eventId reused
    assert h.balance("carol") == 0


async def test_a_replay_after_the_purge_is_not_answered_differently() -> None:
    """An operator replays business.commands after the purge: the access tokens have
    expired and the saved replies are gone; a request is answered as before or not at all
    (before issue 11 point 4: UNAUTHENTICATED where COMPLETED was answered). The confirm
    is answered from its kept idempotency record (its own outcome, the same reply); the
    init, which leaves nothing but its purged reply, is not answered."""
    h = Harness(purge_interval_seconds=60)
    await _completed(h, "k-replay")
    originals = list(h.history)
    await _purge(h)
    replies_before = len(h.replies)
    for delivery in originals:
        if delivery.topic == h.topics.commands:
            await h.process(delivery)
    for reply in h.replies[replies_before:]:
        first = [r for r in h.replies[:replies_before]
                 if r["requestId"] == reply["requestId"]]
        assert first and reply == first[-1], (reply, first)
    replayed = sum(1 for d in originals if d.topic == h.topics.commands)
    assert replayed == 2  # the init and the confirm
    assert h.service.counters["stale_requests_unanswered"] == 1  # the init
    # the confirm answered once more, with its first reply (checked above); the init not
    answered = [r["type"] for r in h.replies[replies_before:]]
    assert answered == ["transferConfirm"], answered


async def _purge(h: Harness) -> None:
    h.clock.advance(DAY + 61)
    await h.tick(0)  # schedules the first purge of partition 0
    h.clock.advance(61)
    await h.tick(0)
    assert not h.reply_cache.rows


async def test_purge_spares_open_sagas_and_other_partitions() -> None:
    h = Harness(purge_interval_seconds=60, otp_ttl_seconds=10 * DAY)
    token = await h.transfer_token("alice", "acc-bob", 50_000)  # above the OTP threshold
    pending = await h.confirm("alice", token, "k-open")
    assert pending is not None and pending["code"] == "OTP_REQUIRED"
    h.clock.advance(2 * DAY)
    await h.tick(0)
    h.clock.advance(61)
    await h.tick(1)  # another partition's purge leaves partition 0 alone
    h.clock.advance(61)
    await h.tick(0)
    saga = h.saga("alice", "k-open")
    assert saga is not None and saga.state is State.AWAITING_OTP


async def test_a_capture_for_a_forgotten_top_up_goes_to_operators() -> None:
    h = Harness()
    event = orjson.dumps({"chargeId": "0b2d7a52-aaaa-5bbb-8ccc-000000000000:charge:0",
                          "status": "captured"})
    routed = h.service.route_funding_event(event, b"k", 0)
    outs = await h.service.handle_saga_input(routed[0].value, routed[0].key, 0)
    letters = [orjson.loads(o.value) for o in outs if o.topic == h.topics.dlq]
    assert len(letters) == 1 and "unknown top-up" in letters[0]["reason"]
    assert not [o for o in outs if o.topic == h.topics.replies]


TOPUP_ID = "0b2d7a52-aaaa-5bbb-8ccc-000000000001"
TOPUP_ATTEMPT = "0123456789abcdef"


async def _capture_of(h: Harness, charge_id: str) -> list[Any]:
    """The outputs of a capture for ``charge_id``, routed then decided (no saga known)."""
    event = orjson.dumps({"chargeId": charge_id, "status": "captured"})
    routed = h.service.route_funding_event(event, b"k", 0)
    return await h.service.handle_saga_input(routed[0].value, routed[0].key, 0)


def _kept_top_up(h: Harness, state: str | None, code: str | None = None) -> None:
    h.store.kept[("alice", "k-top")] = KeptOutcome(TOPUP_ID, "fp", TOPUP_ATTEMPT, state, code)


async def test_a_replayed_capture_of_a_completed_purged_top_up_is_ignored() -> None:
    """Its idempotency record, kept beyond the purge, says the top-up COMPLETED under this
    very charge (attempt included): the capture was credited. Telling operators to give
    it back would take the money twice from the source's point of view."""
    h = Harness()
    _kept_top_up(h, "COMPLETED")
    assert await _capture_of(h, f"{TOPUP_ID}:{TOPUP_ATTEMPT}:charge:0") == []
    assert h.service.counters["captures_of_finished_top_ups"] == 1


@pytest.mark.parametrize(("state", "code", "charge", "says"), [
    ("FAILED", "FUNDING_TIMEOUT", f"{TOPUP_ID}:{TOPUP_ATTEMPT}:charge:0",
     "ended FAILED (FUNDING_TIMEOUT)"),
    (None, None, f"{TOPUP_ID}:{TOPUP_ATTEMPT}:charge:0", "ended unfinished"),
    ("COMPLETED", None, f"{TOPUP_ID}:fedcba9876543210:charge:0", "under another attempt"),
    ("COMPLETED", None, f"{TOPUP_ID}:charge:0", "under another attempt"),
])
async def test_a_capture_of_a_purged_top_up_not_known_credited_goes_to_operators(
        state: str | None, code: str | None, charge: str, says: str) -> None:
    h = Harness()
    _kept_top_up(h, state, code)
    outs = await _capture_of(h, charge)
    letters = [orjson.loads(o.value) for o in outs if o.topic == h.topics.dlq]
    assert len(letters) == 1 and says in letters[0]["reason"], letters
    assert "check with the provider" in letters[0]["reason"]
    assert h.service.counters.get("captures_of_finished_top_ups", 0) == 0
