"""Faust's Kafka consumer with one delivery task per fetched batch instead of per record.

faust-streaming's ``Consumer._drain_messages`` (0.15.x) hands every fetched record to the
streams through ``Service.wait_first(callback(message), suspend_flow.wait())``, which
creates four tasks and an ``asyncio.wait`` for each record, then cancels three of them. On a
busy event loop each record thus waits several loop iterations before its stream sees it,
and the whole worker consumes records one by one at the pace of the loop (measured under
the benchmark: ~2 ms per record, 37-83 ms per fetched batch of ~20 records, so every Kafka
hop into the worker cost ~80 ms while a plain aiokafka consumer on the same broker saw the
same records 5 ms after they were produced; docs/performance.md).

This subclass keeps everything else of the original (fetching through the consumer thread,
read offsets, gap detection, commits, flow control) and changes only the delivery: the
records of one ``getmany`` are delivered in order by one task, raced once against
``suspend_flow`` (a rebalance) exactly as the original races each record. When a rebalance
interrupts a batch, the records not yet delivered are dropped with their read offsets
untouched; after the rebalance Faust seeks every partition to its committed offset
(``perform_seek``), so they are fetched again, and records of the old generation that did
reach a stream are skipped by the stream itself. Offsets are committed between batches
(``broker_commit_every``) and by Faust's commit timer, never past an unacknowledged record.

It also keeps records from being lost at a rebalance (docs/architecture.md, "Rebalances"):

- While the app is rebalancing (from the revocation until Faust's recovery has sought the
  stream partitions to their committed offsets *and* cleared the stream buffers), only
  changelog partitions are fetched; and whatever ``app.rebalancing`` says, no stream
  partition is fetched from a revocation until this generation's seek is done (the end of a
  rebalance cut short by the next one clears the flag while the next seek is under way:
  seen with two rebalances in a row under load). faust-streaming 0.15.3 resumes the stream
  partitions, seeks them (one round trip per partition) and only then clears every stream buffer
  (``faust/tables/recovery.py``, ``on_recovery_completed``): records fetched during the seek
  were put in a buffer, cleared, and never seen by an agent.
- On the input topics (every non-changelog topic: none is compacted and no producer of them
  is transactional) a record whose offset is past the next one expected is a *jump*, not a
  gap to acknowledge: it is logged as an error, not delivered, and the partition is sought
  back to the offset expected, so the records in between are fetched again. Only when those
  records no longer exist (deleted by retention) is the jump accepted, loudly.
- The committable offset never passes an offset that was not acknowledged: Faust's head
  check (``min(acked) - committed > 1``, ``Consumer._new_offset``) lets a commit skip the
  one record right at the committed offset, and is skipped when the committed offset is 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

log = logging.getLogger(__name__)

#: Let other tasks run after this many records delivered in a row.
YIELD_EVERY = 100


class FetchTunedConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread with the fetch size and wait of the app (``fetch_tuning``;
    agents/faust_app.py: the queries are fetched at their first byte, or every half
    second when there is none).

    Faust fixes ``fetch_max_wait_ms=1500`` and leaves ``fetch_min_bytes`` at 1. When this
    consumer read the saga topics too, a steady trickle made it fetch as fast as the round
    trip allowed (30 transfers/s cost the worker nearly the CPU of 65), so it waited for 64
    KiB or 10 ms; with only the queries left on it, those empty fetches every 10 ms were
    the cost (docs/performance.md): a query now costs about one fetch, no query one fetch
    per half second."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        tuning = getattr(self.app, "fetch_tuning", None)
        if tuning is not None:
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
            consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = tuning
            log.info("consumer fetches: min %d bytes, max wait %d ms", *tuning)
        return consumer


class BatchDeliveringConsumer(AIOKafkaConsumer):
    #: Partition -> the next offset this consumer expects to deliver (input topics only).
    _next_expected: dict[TP, int]
    #: Partition -> the offset processing (re)started from, when Faust knows no commit.
    _floor: dict[TP, int]
    #: Partition -> the expected offset it was last sought back to after a jump.
    _sought_back_to: dict[TP, int]
    #: Partition -> accepted holes [start, end): offsets that hold no record to process
    #: (deleted by retention, or transaction markers and aborted records the broker never
    #: returns); the committed offset may pass them.
    _holes: dict[TP, list[tuple[int, int]]]
    #: Jumps seen (each was sought back, or accepted as a hole).
    jumps_detected: int = 0
    #: The consumer generation whose stream partitions ``perform_seek`` last sought to their
    #: committed offsets (None: since a revocation, or while a seek is under way).
    _streams_sought: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._next_expected = {}
        self._floor = {}
        self._sought_back_to = {}
        self._holes = {}
        self._streams_sought = None

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return FetchTunedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _is_input_tp(self, tp: TP) -> bool:
        """A stream partition whose offsets have no holes (not a table changelog)."""
        return not self._is_changelog_tp(tp)

    # -- no stream records fetched while rebalancing --------------------------------------

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> Any:
        if active_partitions is not None and (
                self.app.rebalancing
                or self._streams_sought != self.app.consumer_generation_id):
            # A copy, never the live set; and never an empty set: aiokafka reads an empty
            # set as "every partition".
            active_partitions = {tp for tp in active_partitions if self._is_changelog_tp(tp)}
            if not active_partitions:
                # Nothing may be fetched until the rebalance ends: poll for its end.
                await asyncio.sleep(min(timeout, REBALANCE_POLL_SECONDS))
                return {}
        return await super()._getmany(active_partitions, timeout)

    # -- where each partition (re)starts ---------------------------------------------------

    async def perform_seek(self) -> None:
        """Faust's seek of every assigned partition to its committed offset, plus: an input
        partition without a committed offset (or committed at 0) is sought to where the
        group starts (earliest, ``consumer_auto_offset_reset``), which aiokafka's
        ``seek_to_committed`` skips (it seeks only to offsets above 0), so that records
        fetched before the rebalance but never processed are fetched again; and the offset
        each input partition must deliver next is remembered."""
        # Until this seek is done, no stream record is fetched (``_getmany``): the end of
        # a rebalance cut short by the next one can clear ``app.rebalancing`` while the
        # next one's seek is still under way (its records would then reach the stream
        # buffers that the next resume clears).
        self._streams_sought = None
        generation = self.app.consumer_generation_id
        committed = await self.seek_to_committed()
        self._read_offset.update({
            tp: offset if offset is not None and offset >= 0 else None
            for tp, offset in committed.items()
        })
        self._committed_offset.update({
            TP(tp.topic, tp.partition): offset if offset else None
            for tp, offset in committed.items() if offset is not None
        })
        inputs = {TP(tp.topic, tp.partition): offset for tp, offset in committed.items()
                  if self._is_input_tp(TP(tp.topic, tp.partition))}
        unstarted = [tp for tp, offset in inputs.items() if offset is None or offset <= 0]
        earliest = dict(await self.earliest_offsets(*unstarted)) if unstarted else {}
        for tp, offset in inputs.items():
            if offset is None or offset < 0:
                start = int(earliest.get(tp) or 0)
            else:
                start = offset
            if offset is None or offset <= 0:
                await self._seek(tp, start)
            self._next_expected[tp] = start
            self._floor[tp] = start
            self._sought_back_to.pop(tp, None)
        if self.app.consumer_generation_id == generation:
            self._streams_sought = generation

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        if self._is_input_tp(partition):
            self._next_expected[partition] = offset

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._streams_sought = None
        for tp in revoked:
            self._next_expected.pop(tp, None)
            self._floor.pop(tp, None)
            self._sought_back_to.pop(tp, None)
            self._holes.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    # -- delivery ---------------------------------------------------------------------------

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - live broker
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                batch = [item async for item in self.getmany(timeout=1.0)]
                await self.sleep(0)
                if batch and not self.should_stop:
                    await self.wait_first(self._deliver(batch), self.suspend_flow.wait())
                commit_every = self._commit_every
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _deliver(self, batch: list[tuple[Any, Any]]) -> None:
        """Faust's per-record logic without a task per record; on input topics, a record
        past the next expected offset is not delivered and its partition is sought back."""
        callback = self.callback
        read_offset = self._read_offset
        expected_of = self._next_expected
        acks_enabled_for = self.app.topics.acks_enabled_for
        sought_back: set[TP] = set()
        since_yield = 0
        for tp, message in batch:
            since_yield += 1
            if since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            if tp in sought_back:
                continue
            offset = message.offset
            if self._is_input_tp(tp):
                expected = expected_of.get(tp)
                if expected is not None and offset < expected:
                    # Fetched before a seek to an earlier position: it comes again.
                    self.log.dev("DROPPED STALE MESSAGE %r@%r (expected %r)", tp, offset,
                                 expected)
                    continue
                if expected is not None and offset > expected:
                    if not await self._jump_is_a_hole(tp, expected, offset):
                        sought_back.add(tp)
                        await self.seek(tp, expected)
                        continue
                if expected is None:
                    self._floor.setdefault(tp, offset)
                await callback(message)
                expected_of[tp] = offset + 1
                read_offset[tp] = offset
                continue
            r_offset = read_offset[tp]
            if r_offset is None or offset >= r_offset:
                gap = offset - (r_offset or 0)
                if gap > 1 and r_offset and acks_enabled_for(message.topic):
                    await self._add_gap(tp, r_offset + 1, offset)
                await callback(message)
                read_offset[tp] = offset
            else:
                self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key,
                             message.value)

    async def _jump_is_a_hole(self, tp: TP, expected: int, offset: int) -> bool:
        """A record past the expected offset: either records were dropped before any agent
        saw them (seek back: False), or the offsets in between hold nothing to process
        (accept the hole: True). The first time, the partition is sought back; if the fetch
        from there again starts past ``expected``, the broker has no record for those
        offsets (transaction markers, aborted transactions of another team's producer)."""
        self.jumps_detected += 1
        try:
            earliest = (await self.earliest_offsets(tp)).get(tp)
        except Exception:  # cannot tell: keep the records safe, seek back once more
            earliest = None
        if earliest is not None and earliest > expected:
            log.error(
                "%s[%s]: records %d..%d were deleted by retention before this group "
                "processed them; going on from %d", tp.topic, tp.partition, expected,
                earliest - 1, offset,
            )
            self._accept_hole(tp, expected, offset)
            return True
        if self._sought_back_to.get(tp) == expected:
            log.warning(
                "%s[%s]: offsets %d..%d hold no record even when fetched again "
                "(transaction markers or aborted records): going on from %d",
                tp.topic, tp.partition, expected, offset - 1, offset,
            )
            self._accept_hole(tp, expected, offset)
            return True
        self._sought_back_to[tp] = expected
        log.error(
            "offset jump on %s[%s]: expected offset %d, fetched %d; the %d records between "
            "were never delivered (a fetch during a rebalance?). Seeking back to %d; no "
            "offset is committed past them.", tp.topic, tp.partition, expected, offset,
            offset - expected, expected,
        )
        return False

    def _accept_hole(self, tp: TP, start: int, end: int) -> None:
        self._holes.setdefault(tp, []).append((start, end))

    def _past_holes(self, tp: TP, committed: int) -> int:
        """``committed`` moved past the accepted holes that start at it."""
        holes = self._holes.get(tp)
        if not holes:
            return committed
        moved = True
        while moved:
            moved = False
            for start, end in holes:
                if start <= committed < end:
                    committed, moved = end, True
        self._holes[tp] = [(start, end) for start, end in holes if end > committed]
        return committed

    # -- commits -------------------------------------------------------------------------

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: one past the longest run of acknowledged records
        that starts right at the committed offset (None when the record at the committed
        offset is not acknowledged yet)."""
        if not self._is_input_tp(tp):
            return super()._new_offset(tp)
        acked = self._acked[tp]
        acked.sort()
        committed = self._committed_offset.get(tp)
        if committed is None:
            committed = self._floor.get(tp)
        if committed is not None:
            past = self._past_holes(tp, committed)
            # Already committed (a redelivered record acknowledged twice): not again.
            while acked and acked[0] < past:
                self._acked_index[tp].discard(acked.pop(0))
            if not acked or acked[0] != past:
                # The record at the committed offset is not done yet (or nothing is acked
                # beyond a hole that starts there: commit past the hole alone).
                return past if past > committed else None
        elif not acked:
            return None
        run = 1
        while run < len(acked) and acked[run] == acked[run - 1] + 1:
            run += 1
        batch = acked[:run]
        del acked[:run]
        self._acked_index[tp].difference_update(batch)
        return batch[-1] + 1


#: While rebalancing and nothing may be fetched, how often to look whether it has ended.
REBALANCE_POLL_SECONDS = 0.01
