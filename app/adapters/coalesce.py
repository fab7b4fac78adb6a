"""Group commit for the store's calls: the calls of one kind that are waiting together
become one batch, one PostgreSQL transaction or one pipelined statement (issue 13).

Why: the saga engine decides a cycle's records of different users at once (agents/
saga_engine.py, ``chain_of``), and each transferConfirm's checks were five round trips of
their own (BEGIN, the user's lock, the facts, the writes, COMMIT) on a connection of their
own: at 128 transfers in flight, ~19 ms of a ~78 ms cycle was spent waiting for a
connection and a round trip (docs/performance.md). Coalesced, a cycle's confirms share
those five round trips.

How: a call joins the batch that is forming; the batch starts at the next turn of the
event loop after its first call (every call that became ready in the same turn joins it),
or as soon as the batch before it ended: one batch runs at a time, and the calls that
arrive meanwhile form the next one (group commit: the batches grow with the load, and a
lone call waits one turn of the loop). Calls whose ``key`` is already in the forming batch
(two confirms of one user: the batch locks each user once) wait for the next one.

Failure is per call: when a batch of several calls raises, each of its calls runs again
alone (a batch of one), so a call that fails for its own sake (a ``ValueError``, a bug
tied to its data) fails alone and the others go on; an outage fails each alone too, and
each caller decides (app/record_failures.py waits it out). A caller cancelled before its
batch starts is left out; one cancelled while its batch runs leaves the batch's effects
in place, as a crash after the commit would (every effect is idempotent: a redelivery
decides again and finds them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from app import metrics

Req = TypeVar("Req")
Res = TypeVar("Res")

#: The most calls in one batch (bounds a statement's parameters and a transaction's locks).
MAX_BATCH = 256


class Coalescer(Generic[Req, Res]):
    """``await submit(request)`` → ``run_batch([..., request, ...])``'s result for it.

    ``run_batch`` returns one result per request, in order."""

    def __init__(self, run_batch: Callable[[Sequence[Req]], Awaitable[Sequence[Res]]], *,
                 key: Callable[[Req], Hashable] | None = None,
                 max_batch: int = MAX_BATCH, name: str | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._key = key
        self._max_batch = max_batch
        #: The call's name in the metrics (``bizcenter_store_batches_total{call}``).
        self._name = name
        self._waiting: list[tuple[Req, asyncio.Future[Res]]] = []
        self._runner: asyncio.Task[None] | None = None
        #: Batches run and calls answered (``batches``/``calls``: the mean batch size).
        self.batches = 0
        self.calls = 0

    async def submit(self, request: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # the calls that became ready in this turn join
            while self._waiting:
                batch = self._take()
                if batch:
                    await self._answer(batch)
        finally:
            self._runner = None
            if self._waiting:  # cancelled: the calls left would wait for ever
                for _, future in self._waiting:
                    if not future.done():
                        future.cancel()
                self._waiting.clear()

    def _take(self) -> list[tuple[Req, asyncio.Future[Res]]]:
        """The next batch: the waiting calls in order, at most one per key, at most
        ``max_batch``; cancelled calls are dropped."""
        batch: list[tuple[Req, asyncio.Future[Res]]] = []
        later: list[tuple[Req, asyncio.Future[Res]]] = []
        keys: set[Hashable] = set()
        for request, future in self._waiting:
            if future.done():
                continue
            key = None if self._key is None else self._key(request)
            if len(batch) >= self._max_batch or (key is not None and key in keys):
                later.append((request, future))
                continue
            if key is not None:
                keys.add(key)
            batch.append((request, future))
        self._waiting = later
        return batch

    async def _answer(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        if self._name is not None:
            metrics.store_batch(self._name, len(batch))
        try:
            results = await self._run_batch([request for request, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            # One call's failure must not fail the others: each alone, at once.
            await asyncio.gather(*(self._answer([one]) for one in batch))
            return
        except BaseException as exc:  # cancelled: the callers learn it, then it goes on
            for _, future in batch:
                _settle(future, exc)
            raise
        if len(results) != len(batch):  # a bug of run_batch: every caller learns it
            error = RuntimeError(f"a batch of {len(batch)} calls gave {len(results)} results")
            for _, future in batch:
                _settle(future, error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def _settle(future: asyncio.Future[Res], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
