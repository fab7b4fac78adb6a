"""The relay agents of the business worker: thin adapters between Kafka and the
TransferService. The saga topics themselves (business.commands, business.saga-inputs) are
consumed in batches by the saga engine (agents/saga_engine.py), not by a Faust agent.

No business decision is taken here, and no failure handling either: every record goes
through the service's :class:`app.record_failures.RecordGuard` (``service.guard``), the one
poison/outage rule of every consumer (docs/architecture.md): a record that fails for its own
sake gets its error reply or dead letter and the partition moves on; an infrastructure
failure is retried with back-off, nothing skipped. Faust concurrency stays 1
(faust-streaming #606: higher concurrency can commit offsets past in-flight messages).
"""

from __future__ import annotations

import logging
from typing import Any

from agents.faust_app import Worker
from app.record_failures import RecordHandler, SourceRecord

log = logging.getLogger(__name__)


async def consume(worker: Worker, stream: Any, handler: RecordHandler) -> None:
    """The body of a plain agent: each record through the guard, in order."""
    guard = worker.service.guard
    async for event in stream.events():
        await guard.process(SourceRecord.of(event.message), handler, worker.send_all)


def register(worker: Worker) -> None:
    app, topics, service = worker.app, worker.topics, worker.service

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
