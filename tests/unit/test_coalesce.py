"""The group commit of the store's calls (app/adapters/coalesce.py), on a plain function."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app.adapters.coalesce import Coalescer


class Recorder:
    """A batch function that records its batches; ``gate`` holds a batch until set."""

    def __init__(self, *, fail_when: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_when = fail_when
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, calls: Sequence[int]) -> list[int]:
        self.batches.append(list(calls))
        self.started.set()
        await self.gate.wait()
        if self.fail_when is not None and self.fail_when in calls:
            raise ValueError(f"{self.fail_when} fails")
        return [c * 10 for c in calls]


async def test_the_calls_of_one_turn_are_one_batch() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run)
    assert await asyncio.gather(*(coalescer.submit(i) for i in range(5))) == [
        0, 10, 20, 30, 40]
    assert run.batches == [[0, 1, 2, 3, 4]]
    assert (coalescer.batches, coalescer.calls) == (1, 5)


async def test_calls_arriving_while_a_batch_runs_form_the_next_one() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run)
    run.gate.clear()
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.wait_for(run.started.wait(), 5)
    later = [asyncio.ensure_future(coalescer.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert run.batches == [[1]]  # one batch at a time
    run.gate.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30]
    assert run.batches == [[1], [2, 3]]


async def test_one_call_per_key_in_a_batch() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run, key=lambda c: c % 3)
    assert await asyncio.gather(*(coalescer.submit(i) for i in (1, 4, 2, 7, 3))) == [
        10, 40, 20, 70, 30]
    assert run.batches == [[1, 2, 3], [4], [7]]


async def test_a_batch_is_bounded() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=2)
    await asyncio.gather(*(coalescer.submit(i) for i in range(5)))
    assert run.batches == [[0, 1], [2, 3], [4]]


async def test_a_failing_call_fails_alone() -> None:
    run = Recorder(fail_when=2)
    coalescer: Coalescer[int, int] = Coalescer(run)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(4)),
                                   return_exceptions=True)
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], ValueError)
    assert run.batches[0] == [0, 1, 2, 3]
    assert sorted(run.batches[1:]) == [[0], [1], [2], [3]]  # then each alone


async def test_a_call_cancelled_before_its_batch_is_left_out() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run)
    run.gate.clear()
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.wait_for(run.started.wait(), 5)
    gone = asyncio.ensure_future(coalescer.submit(2))
    kept = asyncio.ensure_future(coalescer.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    run.gate.set()
    assert await first == 10 and await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert run.batches == [[1], [3]]


async def test_a_wrong_number_of_results_fails_every_call() -> None:
    async def short(calls: Sequence[int]) -> list[int]:
        return list(calls)[:-1]

    coalescer: Coalescer[int, int] = Coalescer(short)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_it_goes_on_after_a_batch() -> None:
    run = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(run)
    assert await coalescer.submit(1) == 10
    assert await coalescer.submit(2) == 20
    assert run.batches == [[1], [2]]


async def test_a_named_coalescer_counts_its_batches_and_calls() -> None:
    """Operators read the mean batch size from two counters (docs/operations.md)."""
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"call": "unit_test_call"}) or 0.0

    before = (sample("bizcenter_store_batches_total"),
              sample("bizcenter_store_batched_calls_total"))
    coalescer: Coalescer[int, int] = Coalescer(Recorder(), name="unit_test_call")
    await asyncio.gather(*(coalescer.submit(i) for i in range(3)))
    await coalescer.submit(9)
    assert sample("bizcenter_store_batches_total") == before[0] + 2
    assert sample("bizcenter_store_batched_calls_total") == before[1] + 4
