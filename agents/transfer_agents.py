"""The body of the worker's plain Faust agents (agents/query_agents.py): each record through
the record guard, in order.

The transfer side has no Faust agent any more: ``business.commands``,
``business.saga-inputs``, ``account.events`` and ``funding.events`` are consumed in batches
by the saga engine (agents/saga_engine.py), which also relays an account or funding event
to a saga another worker owns.

No failure handling here either: every record goes through the service's
:class:`app.record_failures.RecordGuard` (``service.guard``), the one poison/outage rule of
every consumer (docs/architecture.md): a record that fails for its own sake gets its error
reply or dead letter and the partition moves on; an infrastructure failure is retried with
back-off, nothing skipped. Faust concurrency stays 1 (faust-streaming #606: higher
concurrency can commit offsets past in-flight messages).
"""

from __future__ import annotations

from typing import Any

from agents.faust_app import Worker
from app.record_failures import RecordHandler, SourceRecord


async def consume(worker: Worker, stream: Any, handler: RecordHandler) -> None:
    """The body of a plain agent: each record through the guard, in order."""
    guard = worker.service.guard
    async for event in stream.events():
        await guard.process(SourceRecord.of(event.message), handler, worker.send_all)
