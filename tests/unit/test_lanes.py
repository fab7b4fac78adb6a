"""agents/lanes.py: one lane per partition, in order inside a lane, overlapped across lanes."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from agents.lanes import LaneFailed, Lanes

DEADLINE = 5.0


async def test_records_of_one_lane_run_in_order_even_when_earlier_ones_wait() -> None:
    lanes = Lanes(max_in_flight=16)
    done: list[int] = []
    gate = asyncio.Event()

    def job(i: int) -> object:
        async def run() -> None:
            if i == 0:
                await gate.wait()  # the first record is slow
            done.append(i)
        return run

    for i in range(5):
        await lanes.submit(0, job(i))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert done == []  # nothing passes the slow first record
    gate.set()
    assert await lanes.join(timeout=DEADLINE)
    assert done == [0, 1, 2, 3, 4]


async def test_other_lanes_overlap_a_waiting_lane() -> None:
    lanes = Lanes(max_in_flight=16)
    gate = asyncio.Event()
    finished: list[str] = []
    fast_done = asyncio.Event()

    async def slow() -> None:
        await gate.wait()
        finished.append("lane0")

    async def fast() -> None:
        finished.append("lane1")
        fast_done.set()

    await lanes.submit(0, slow)
    await lanes.submit(1, fast)
    await asyncio.wait_for(fast_done.wait(), DEADLINE)
    assert finished == ["lane1"]  # lane 1 finished while lane 0 still waits
    assert lanes.in_flight == 1
    gate.set()
    assert await lanes.join(timeout=DEADLINE)
    assert finished == ["lane1", "lane0"]
    assert lanes.in_flight == 0


async def test_submit_waits_while_max_in_flight_jobs_are_unfinished() -> None:
    lanes = Lanes(max_in_flight=2)
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    await lanes.submit(0, blocked)
    await lanes.submit(1, blocked)
    third = asyncio.create_task(lanes.submit(2, blocked))
    await asyncio.sleep(0.01)
    assert not third.done()  # the third record is not taken while two are in flight
    gate.set()
    await asyncio.wait_for(third, DEADLINE)
    assert await lanes.join(timeout=DEADLINE)


async def test_a_failed_job_stops_every_lane_and_refuses_new_work() -> None:
    lanes = Lanes(max_in_flight=16)
    gate = asyncio.Event()
    ran: list[str] = []

    async def boom() -> None:
        await gate.wait()
        raise RuntimeError("producer gone")

    def record(name: str) -> object:
        async def run() -> None:
            ran.append(name)
        return run

    await lanes.submit(0, boom)
    await lanes.submit(0, record("after-in-lane"))  # type: ignore[arg-type]
    gate.set()
    assert await lanes.join(timeout=DEADLINE)
    assert isinstance(lanes.failure, RuntimeError)
    assert ran == []  # the record behind the failed one never ran
    with pytest.raises(LaneFailed):
        await lanes.submit(1, record("other-lane"))  # type: ignore[arg-type]
    assert ran == []


async def test_each_job_sees_the_context_of_its_submit() -> None:
    """Faust's current event is a context variable set by the stream before each record:
    a job must see its own record's, not the one current when it happens to run."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var")
    lanes = Lanes(max_in_flight=16)
    gate = asyncio.Event()
    seen: list[tuple[int, int]] = []

    def job(i: int) -> object:
        async def run() -> None:
            await gate.wait()
            seen.append((i, var.get()))
        return run

    for i in range(4):
        var.set(i)
        await lanes.submit(i % 2, job(i))  # type: ignore[arg-type]
    var.set(99)
    gate.set()
    assert await lanes.join(timeout=DEADLINE)
    assert sorted(seen) == [(0, 0), (1, 1), (2, 2), (3, 3)]


async def test_join_times_out_and_cancel_stops_unfinished_jobs() -> None:
    lanes = Lanes(max_in_flight=4)
    never = asyncio.Event()
    ran_after: list[int] = []

    async def stuck() -> None:
        await never.wait()

    async def after() -> None:
        ran_after.append(1)

    await lanes.submit(0, stuck)
    await lanes.submit(0, after)
    assert not await lanes.join(timeout=0.05)
    await lanes.cancel()
    assert lanes.in_flight == 0
    assert ran_after == []
    assert lanes.failure is None  # cancelling is a stop, not a failure


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Lanes(max_in_flight=0)

