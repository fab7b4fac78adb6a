"""Agents of the business worker: thin adapters between Kafka and the TransferService.

No business decision is taken here. Each agent decodes nothing itself: it hands the raw
bytes, key and position to the service and sends what the service returns. Faust concurrency
stays 1 (faust-streaming #606: higher concurrency can commit offsets past in-flight
messages); the saga agent overlaps partitions itself, acking each record when it is done
(agents/lanes.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from agents.lanes import LaneFailed, Lanes
from app.faust_app import Worker

log = logging.getLogger(__name__)


def register(worker: Worker) -> None:
    app, topics, service = worker.app, worker.topics, worker.service
    saga_channel = app.topic(
        topics.commands, topics.saga_inputs, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    lanes = Lanes(worker.settings.saga_max_in_flight)

    async def run_saga_record(event: Any) -> None:
        msg = event.message
        try:
            if msg.topic == topics.commands:
                outs = await service.handle_command(msg.value, msg.key, msg.partition,
                                                    msg.offset)
            else:
                outs = await service.handle_saga_input(msg.value, msg.key, msg.partition,
                                                       msg.offset)
            await worker.send_all(outs)
        except Exception as exc:  # the service turns every business error into a reply
            # Only infrastructure failures reach here (e.g. the producer is gone). Crash
            # the worker before this record is acked: it is redelivered after restart.
            log.exception("cannot process %s[%s]@%s", msg.topic, msg.partition, msg.offset)
            await app.crash(exc)
            raise
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
                    return  # the worker is crashing; the record stays unacked
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
        partition: the saga's final reply comes after the relay, so a query sent after it
        finds them updated (read your writes, docs/architecture.md)."""
        async for event in stream.events():
            msg = event.message
            try:
                worker.queries.accounts.apply_raw(msg.value)
                await worker.send_all(
                    service.route_account_event(msg.value, msg.key, msg.partition, msg.offset)
                )
            except Exception as exc:
                log.exception("cannot relay %s[%s]@%s", msg.topic, msg.partition, msg.offset)
                await app.crash(exc)
                return

    @app.agent(worker.channels[topics.funding_events], name="relay_funding_events",
               concurrency=1)
    async def relay_funding_events(stream: Any) -> None:
        """funding.events (keyed by charge) → business.saga-inputs, to the top-up's
        partition."""
        async for event in stream.events():
            msg = event.message
            try:
                await worker.send_all(
                    service.route_funding_event(msg.value, msg.key, msg.partition, msg.offset)
                )
            except Exception as exc:
                log.exception("cannot relay %s[%s]@%s", msg.topic, msg.partition, msg.offset)
                await app.crash(exc)
                return

    @app.timer(interval=worker.settings.tick_interval_seconds, name="tick_sagas")  # type: ignore[untyped-decorator]
    async def tick_sagas() -> None:
        """Wake the sagas of the partitions this worker owns (deadlines, re-sends)."""
        for tp in app.consumer.assignment():
            if tp.topic == topics.saga_inputs:
                out = service.tick(tp.partition)
                await worker.send_all([out])

    @app.on_partitions_revoked.connect
    def forget_deadlines(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        service.forget_partitions()
