"""Process the records of different partitions concurrently, those of one partition in order.

The saga agent runs with Faust concurrency 1 (faust-streaming #606: several actors on one
stream can commit offsets past records still in flight). With one record at a time every
PostgreSQL and Kafka wait of a transfer is waited for in series, so the worker's throughput
is 1 ÷ the sum of those waits however idle the CPU is (docs/performance.md). ``Lanes`` keeps
one agent and one stream but hands each record to a task of its *lane* (the partition
number: ``business.commands`` partition p and ``business.saga-inputs`` partition p hold the
same sagas, so they share a lane):

- records of one lane run one after the other, in the order the stream delivered them, so
  a saga (and the partition's tick, which visits every saga of the partition) is never
  handled twice at once and its read-modify-write of the table stays serial;
- records of different lanes overlap their waits;
- the agent acknowledges a record only when its job has finished (the stream is iterated
  with ``noack``), and Faust commits a partition's offset only up to the first record not
  yet acknowledged, so no offset passes a record in flight: after a crash every record not
  finished is delivered again, which the idempotent handlers absorb;
- a job that raises stops every lane: nothing after it runs (the agent crashes the worker,
  and the failed record and everything after it are redelivered on restart);
- at most ``max_in_flight`` records are taken from the stream and not finished.

Jobs run in tasks created while the stream's current event is set, so each task's context
carries its own record (Faust's ``current_event``: the partition its table writes land in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class LaneFailed(RuntimeError):
    """A job of some lane raised; the lanes take no more work."""


class Lanes:
    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def submit(self, lane: Hashable, job: Callable[[], Awaitable[None]]) -> None:
        """Queue ``job`` behind the lane's previous job; waits while ``max_in_flight`` jobs
        are unfinished. Raises :class:`LaneFailed` once any job has failed."""
        if self.failure is not None:
            raise LaneFailed("a previous job failed") from self.failure
        await self._slots.acquire()
        if self.failure is not None:
            self._slots.release()
            raise LaneFailed("a previous job failed") from self.failure
        previous = self._tails.get(lane)
        task = asyncio.create_task(self._run(previous, job))
        self._tails[lane] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(lane, t))

    async def _run(self, previous: asyncio.Task[None] | None,
                   job: Callable[[], Awaitable[None]]) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        if self.failure is not None:
            return  # an earlier job failed: run nothing after it
        try:
            await job()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def _done(self, lane: Hashable, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(lane) is task:
            del self._tails[lane]
        self._slots.release()
        if not task.cancelled():
            task.exception()  # retrieved: the failure is reported through ``failure``

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False if ``timeout`` passed first."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def cancel(self) -> None:
        """Cancel the jobs not finished (their records were not acknowledged)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
