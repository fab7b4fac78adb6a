"""Finished sagas and saved replies are kept for the retention window, then forgotten."""

from __future__ import annotations

import orjson
from fakes import Harness

from app.domain.transfer_saga import State
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
    # The same confirm after the window: no saga, no saved reply, and the transfer token
    # has long expired: refused, and no money moves.
    again = await h.confirm("alice", token, "k-old")
    assert again is not None and again["code"] == ErrorCode.TOKEN_EXPIRED
    assert h.balance("alice") == balance


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
