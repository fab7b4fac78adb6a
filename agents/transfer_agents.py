"""Agents of the business worker: thin adapters between Kafka and the TransferService.

No business decision is taken here, and no failure handling either: every record goes
through the service's :class:`app.record_failures.RecordGuard` (``service.guard``), the one
poison/outage rule of every consumer (docs/architecture.md): a record that fails for its own
sake gets its error reply or dead letter and the partition moves on; an infrastructure
failure is retried with back-off, nothing skipped. Faust concurrency stays 1
(faust-streaming #606: higher concurrency can commit offsets past in-flight messages); the
saga agent overlaps partitions itself, acking each record when it is done
(agents/lanes.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from agents.faust_app import Worker
from agents.lanes import LaneFailed, Lanes
from app.record_failures import RecordHandler, SourceRecord, describe

log = logging.getLogger(__name__)


async def consume(worker: Worker, stream: Any, handler: RecordHandler) -> None:
    """The body of a plain agent: each record through the guard, in order."""
    guard = worker.service.guard
    async for event in stream.events():
        await guard.process(SourceRecord.of(event.message), handler, worker.send_all)


def register(worker: Worker) -> None:
    app, topics, service = worker.app, worker.topics, worker.service
    saga_channel = app.topic(
        topics.commands, topics.saga_inputs, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    lanes = Lanes(worker.settings.saga_max_in_flight)

    async def run_saga_record(event: Any) -> None:
        msg = event.message
        handler = service.commands if msg.topic == topics.commands else service.saga_inputs
        await service.guard.process(SourceRecord.of(msg), handler, worker.send_all)
        event.ack()

    @app.agent(saga_channel, name="run_transfer_sagas", concurrency=1)
    async def run_transfer_sagas(stream: Any) -> None:
        """business.commands and business.saga-inputs, co-partitioned with the sagas table.

        One lane per partition number (agents/lanes.py): the records of a partition in
        order, different partitions overlapped; each record acked when it is done."""
        try:
            async for event in stream.noack().events():
                try:
                    await lanes.submit(event.message.partition,
                                       functools.partial(run_saga_record, event))
                except LaneFailed:
                    # A job raised past the guard (a bug in the guard itself): nothing after
                    # it may run out of order, so the worker crashes; every record not
                    # acknowledged is delivered again after the restart. Returning quietly
                    # would leave a "ready" worker with its saga partitions unprocessed.
                    log.critical("a saga lane failed: crashing the worker",
                                 exc_info=lanes.failure)
                    await app.crash(lanes.failure or RuntimeError("a saga lane failed"))
                    return  # the record stays unacked
        finally:
            # Stopping: let the records in flight finish briefly; the rest are not acked
            # and come again to whoever owns their partition next.
            if not await lanes.join(timeout=worker.settings.saga_stop_grace_seconds):
                await lanes.cancel()

    @app.agent(worker.channels[topics.account_events], name="relay_account_events",
               concurrency=1)
    async def relay_account_events(stream: Any) -> None:
        """account.events (keyed by account) → business.saga-inputs, to the saga's partition.

        The account's query tables (balance, history) are updated first, in this record's
        partition (``service.account_event_listeners``): the saga's final reply comes after
        the relay, so a query sent after it finds them updated (read your writes,
        docs/architecture.md)."""
        await consume(worker, stream, service.account_events)

    @app.agent(worker.channels[topics.funding_events], name="relay_funding_events",
               concurrency=1)
    async def relay_funding_events(stream: Any) -> None:
        """funding.events (keyed by charge) → business.saga-inputs, to the top-up's
        partition."""
        await consume(worker, stream, service.funding_events)

    @app.timer(interval=worker.settings.tick_interval_seconds, name="tick_sagas")  # type: ignore[untyped-decorator]
    async def tick_sagas() -> None:
        """Wake the sagas of the partitions this worker owns (deadlines, re-sends). A tick
        that cannot be sent (the broker is away) is not retried: the next one comes."""
        for tp in app.consumer.assignment():
            if tp.topic == topics.saga_inputs:
                try:
                    await worker.send_all([service.tick(tp.partition)])
                except Exception as exc:
                    log.warning("tick to %s not sent (%s)", tp, describe(exc))

    @app.on_partitions_revoked.connect
    def forget_deadlines(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        service.forget_partitions()
