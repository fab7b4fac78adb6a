"""Agents and tables of the queries: thin adapters between Kafka, the tables and the
QueryService (app/query_service.py).

Tables (all keyed and written in the partition of the key, see docs/architecture.md):

- ``balances``             accountId → balance, as-of, last history seq  (account.events)
- ``history``              accountId ␟ seq → one applied account event   (account.events)
- ``account_events_seen``  accountId ␟ commandId → seq (deduplication)    (account.events)
- ``transfers``            transferId → parties, amount, state, times     (transfer events)

The account tables are written by ``relay_account_events`` (agents/transfer_agents.py)
through :attr:`QueryRuntime.accounts`, before each event is relayed to its saga; the
``transfers`` table by ``track_transfers``. ``answer_queries`` answers
``business.queries``. Concurrency stays 1 (faust-streaming #606).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import UTC, datetime
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2
from faust.types import TP
from pydantic import ValidationError

from app.faust_app import Worker
from app.query_service import (
    AccountProjection,
    Answer,
    PartitionProgress,
    QueryService,
    TransferProjection,
    reply_value,
)
from schemas.wire import CommandType, DeadLetter, ErrorCode, QueryRequest

log = logging.getLogger(__name__)

#: How long a details query waits for transfer events still on their way (read your
#: writes); after that it answers with what the table holds.
DETAILS_CATCH_UP_SECONDS = 2.0


class TableKeyValue:
    """A Faust table as a :class:`app.query_service.KeyValue` (str keys, bytes values)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, key: str) -> bytes | None:
        raw = self.table.get(key.encode())
        return None if raw is None else bytes(raw)

    def put(self, key: str, value: bytes) -> None:
        self.table[key.encode()] = value


#: The query side's tables (their changelogs are created by events.topics.ensure_topics).
QUERY_TABLES = ("balances", "history", "account_events_seen", "transfers")


class QueryRuntime:
    """The query side of one worker: tables, projections, the service, and where each key
    lives."""

    def __init__(self, worker: Worker) -> None:
        app, settings = worker.app, worker.settings
        raw: Any = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                                value_serializer="raw")

        def table(name: str) -> Any:
            # key_type/value_type pick the store's serializer, the schema the changelog's.
            return app.Table(name, schema=raw, key_type=bytes, value_type=bytes,
                             partitions=settings.topic_partitions)

        self.tables = {name: table(name) for name in QUERY_TABLES}
        kv = {name: TableKeyValue(t) for name, t in self.tables.items()}
        self.app = app
        self.settings = settings
        self.topics = worker.topics
        self.accounts = AccountProjection(kv["balances"], kv["history"],
                                          kv["account_events_seen"])
        self.transfers = TransferProjection(kv["transfers"])
        self.service = QueryService(kv["balances"], kv["history"], kv["transfers"])
        self.progress = PartitionProgress(baseline=self._committed_transfer_events)
        self.access = worker.service.access  # the verifier of business.commands
        self.store = worker.service.store

    # ---------------------------------------------------------------- placement

    def partition_of(self, key: bytes) -> int:
        """The partition of ``key`` in every co-partitioned topic and table (Kafka's
        default partitioner: murmur2, as aiokafka and the Java client)."""
        return int(murmur2(key) & 0x7FFFFFFF) % self.settings.topic_partitions

    def owner_url(self, table: str, key: bytes) -> str | None:
        """The canonical URL of the worker that owns ``key`` of ``table``, from the
        assignment the group agreed on; None while unknown (rebalancing)."""
        partition = self.partition_of(key)
        topic = self.tables[table].changelog_topic.get_topic_name()
        for url, topics in self.app.router.table_metadata(table).items():
            if partition in topics.get(topic, ()):
                return str(url)
        return None

    # ---------------------------------------------------------------- answers

    async def answer(self, request: QueryRequest) -> Answer:
        """Answer from the local tables. Details of a transfer not known as final wait
        until the transfer events already on the broker are in the table (bounded)."""
        answer = self.service.answer(request)
        if request.type == CommandType.QUERY_TRANSACTION_DETAILS.value:
            transfer_id = str(request.params.get("transferId", ""))
            if transfer_id and not self.service.transfer_settled(transfer_id):
                await self._catch_up_transfer_events(self.partition_of(transfer_id.encode()))
                answer = self.service.answer(request)
        return answer

    async def _catch_up_transfer_events(self, partition: int) -> None:
        tp = TP(self.topics.transfer_events, partition)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETAILS_CATCH_UP_SECONDS
        try:
            # Bounded: the consumer thread that answers may be busy with a rebalance, which
            # itself waits for this agent to finish its record.
            ends = await asyncio.wait_for(self.app.consumer.highwaters(tp),
                                          DETAILS_CATCH_UP_SECONDS)
        except Exception:  # the answer is still correct, only maybe not the newest
            log.warning("cannot read the end offset of %s", tp, exc_info=True)
            return
        end = int(ends.get(tp, 0))
        remaining = max(0.0, deadline - loop.time())
        if not await self.progress.wait_for(partition, end - 1, remaining):
            log.warning("transfer events %s not caught up to %d within %ss", tp, end,
                        DETAILS_CATCH_UP_SECONDS)

    def _committed_transfer_events(self, partition: int) -> int:
        committed = getattr(self.app.consumer, "_committed_offset", {}).get(
            TP(self.topics.transfer_events, partition))
        return int(committed) - 1 if committed else -1

    def dead_letter(self, msg: Any, reason: str) -> tuple[bytes | None, bytes]:
        record = DeadLetter(
            source_topic=msg.topic, source_partition=msg.partition, source_offset=msg.offset,
            key_b64=base64.b64encode(msg.key).decode() if msg.key is not None else None,
            value_b64=base64.b64encode(msg.value).decode() if msg.value is not None else None,
            reason=reason, failed_at=datetime.fromtimestamp(time.time(), UTC),
        )
        return msg.key, orjson.dumps(record.to_wire())


def register(worker: Worker) -> QueryRuntime:
    """Create the query tables and agents (and the HTTP views when the web server is on)."""
    app, topics = worker.app, worker.topics
    runtime = QueryRuntime(worker)
    worker.queries = runtime
    replies = worker.channels[topics.replies]
    dlq = worker.channels[topics.dlq]

    @app.agent(worker.channels[topics.queries], name="answer_queries", concurrency=1)
    async def answer_queries(stream: Any) -> None:
        """business.queries (key accountId or transferId) → business.replies."""
        async for event in stream.events():
            msg = event.message
            try:
                try:
                    request = QueryRequest.model_validate_json(msg.value or b"")
                except ValidationError:
                    key, value = runtime.dead_letter(msg, "invalid query request")
                    await dlq.send(key=key, value=value)
                    continue
                try:
                    answer = await runtime.answer(request)
                except Exception:
                    log.exception("query %s failed", request.request_id)
                    answer = Answer.error(ErrorCode.INTERNAL, "internal error; retry")
                await replies.send(key=request.request_id.encode(),
                                   value=reply_value(request, answer))
            except Exception as exc:  # only infrastructure failures (the producer is gone)
                log.exception("cannot answer %s[%s]@%s", msg.topic, msg.partition, msg.offset)
                await app.crash(exc)
                return

    @app.agent(worker.channels[topics.transfer_events], name="track_transfers",
               concurrency=1)
    async def track_transfers(stream: Any) -> None:
        """business.transfer-events (key transferId) → the transfers table."""
        async for event in stream.events():
            msg = event.message
            try:
                runtime.transfers.apply_raw(msg.value)
                runtime.progress.advance(msg.partition, msg.offset)
            except Exception as exc:
                log.exception("cannot track %s[%s]@%s", msg.topic, msg.partition, msg.offset)
                await app.crash(exc)
                return

    @app.on_partitions_revoked.connect
    def forget_progress(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        runtime.progress.forget()

    if worker.settings.web_enabled:
        from app.web import register_views

        register_views(app, runtime)
    return runtime
