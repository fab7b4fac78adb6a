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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

log = logging.getLogger(__name__)

#: Let other tasks run after this many records delivered in a row.
YIELD_EVERY = 100


class FetchTunedConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread with the fetch size and wait of the app's settings.

    Faust fixes ``fetch_max_wait_ms=1500`` and leaves ``fetch_min_bytes`` at 1, so the broker
    answers a fetch as soon as any one of the worker's partitions has one new record: under
    a steady trickle the consumer thread fetches as fast as the round trip allows, each
    response listing every assigned partition, and that loop cost the worker about the
    same CPU at 30 transfers/s as at 65 (docs/performance.md). With a minimum size the
    broker holds the fetch until that much data or ``fetch_max_wait_ms`` has passed, which
    bounds the fetch rate, for at most that wait of latency per hop."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        tuning = getattr(self.app, "fetch_tuning", None)
        if tuning is not None:
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
            consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = tuning
            log.info("consumer fetches: min %d bytes, max wait %d ms", *tuning)
        return consumer


class BatchDeliveringConsumer(AIOKafkaConsumer):
    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return FetchTunedConsumerThread(self, loop=self.loop, beacon=self.beacon)

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
        """The original per-record logic (read offset, gap), without a task per record."""
        callback = self.callback
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        since_yield = 0
        for tp, message in batch:
            since_yield += 1
            if since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
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
