"""Agents and tables of the queries: thin adapters between Kafka, the tables and the
QueryService (app/query_service.py).

Tables:

- ``query_balances``  accountId → balance, as-of, last history seq   (PostgreSQL)
- ``query_history``   accountId ␟ seq → one applied account event    (PostgreSQL)
- ``transfers``       transferId → parties, amount, state, times     (a Faust table, keyed
  and written in the partition of the key, see docs/architecture.md)

The account tables (and ``query_events_seen``, their deduplication) are written by the
saga engine from ``account.events``, in its cycle's transaction (agents/saga_engine.py):
every worker reads them (app/adapters/query_tables.py, no cache), whoever consumes the
account's partition. ``transfers`` is written by ``track_transfers``. ``answer_queries``
answers ``business.queries``: a balance or a history page from PostgreSQL, a transfer's
details from this worker's partitions of ``transfers`` (a details query is keyed by its
transfer). The HTTP views (agents/web.py) forward only details. The group ``BIZ_APP_ID``
consumes only ``business.queries`` and ``business.transfer-events`` (and the changelog of
``transfers``). Concurrency stays 1 (faust-streaming #606).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from faust.types import TP
from pydantic import ValidationError

from agents.faust_app import Worker
from agents.transfer_agents import consume
from app import metrics
from app.adapters.query_tables import PostgresQueryTables
from app.query_service import (
    Answer,
    KeyValueReads,
    PartitionProgress,
    QueryService,
    TransferProjection,
)
from app.query_service import (
    reply_value as answer_value,
)
from app.record_failures import (
    MAX_TYPE_CHARS,
    Handler,
    Outbound,
    Poison,
    Refused,
    SourceRecord,
    cut,
    dead_letter_out,
    decode_json_object,
    readable_fields,
    readable_id,
)
from app.replies import reply_value
from events.topics import partition_of
from schemas.wire import CommandType, ErrorCode, QueryRequest

log = logging.getLogger(__name__)

#: How long a details query waits for transfer events still on their way (read your
#: writes); after that it answers with what the table holds.
DETAILS_CATCH_UP_SECONDS = 2.0


class TableKeyValue:
    """A Faust table as a :class:`app.domain.ports.KeyValue` (str keys, bytes values)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, key: str) -> bytes | None:
        raw = self.table.get(key.encode())
        return None if raw is None else bytes(raw)

    def put(self, key: str, value: bytes) -> None:
        self.table[key.encode()] = value


#: The query side's Faust tables (their changelogs are created by
#: events.topics.ensure_topics); the account tables are PostgreSQL's.
QUERY_TABLES = ("transfers",)


class QueryRuntime:
    """The query side of one worker: the tables, the transfers' projection, the service,
    and where each key of a Faust table lives."""

    def __init__(self, worker: Worker) -> None:
        app, settings = worker.app, worker.settings
        raw: Any = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                                value_serializer="raw")

        def table(name: str) -> Any:
            # key_type/value_type pick the store's serializer, the schema the changelog's.
            return app.Table(name, schema=raw, key_type=bytes, value_type=bytes,
                             partitions=settings.topic_partitions)

        self.tables = {name: table(name) for name in QUERY_TABLES}
        transfers = TableKeyValue(self.tables["transfers"])
        self.app = app
        self.settings = settings
        self.topics = worker.topics
        # The account tables, on the engine of the PostgreSQL store (its search_path: the
        # business schema), as the bootstrap builds the saga state.
        store: Any = worker.service.store
        self.query_tables = PostgresQueryTables(store.engine, settings.db_schema)
        self.transfers = TransferProjection(transfers)
        self.service = QueryService(self.query_tables.balances, self.query_tables.history,
                                    KeyValueReads(transfers))
        self.progress = PartitionProgress(baseline=self._committed_transfer_events)
        self.access = worker.service.access  # the verifier of business.commands
        self.store = worker.service.store

    # ---------------------------------------------------------------- placement

    def partition_of(self, key: bytes) -> int:
        """The partition of ``key`` in every co-partitioned topic and table (Kafka's
        default partitioner: murmur2, as aiokafka and the Java client)."""
        return partition_of(key, self.settings.topic_partitions)

    def owner_url(self, table: str, key: bytes) -> str | None:
        """The canonical URL of the worker that owns ``key`` of the Faust ``table``, from
        the assignment the group agreed on; None while unknown (rebalancing)."""
        partition = self.partition_of(key)
        topic = self.tables[table].changelog_topic.get_topic_name()
        for url, topics in self.app.router.table_metadata(table).items():
            if partition in topics.get(topic, ()):
                return str(url)
        return None

    # ---------------------------------------------------------------- answers

    async def answer(self, request: QueryRequest) -> Answer:
        """Answer from the tables (the account tables: PostgreSQL; transfers: the local
        table). Details of a transfer not known as final wait until the transfer events
        already on the broker are in the table (bounded)."""
        answer = await self.service.answer(request)
        if request.type == CommandType.QUERY_TRANSACTION_DETAILS.value:
            transfer_id = str(request.params.get("transferId", ""))
            if transfer_id and await self.service.worth_waiting_for(request.account_id,
                                                                    transfer_id):
                await self._catch_up_transfer_events(self.partition_of(transfer_id.encode()))
                answer = await self.service.answer(request)
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

    # ---------------------------------------------------------------- records

    async def decide_query(self, record: SourceRecord) -> list[Outbound]:
        """A ``business.queries`` record → its reply."""
        doc = decode_json_object(record.value)
        try:
            request = QueryRequest.model_validate(doc)
        except ValidationError:
            raise Refused("invalid query request") from None
        answer = await self.answer(request)
        metrics.replied(request.type, "ok" if answer.ok else "error",
                        None if answer.code is None else answer.code.value)
        return [Outbound(self.topics.replies, request.request_id.encode(),
                         answer_value(request, answer))]

    def query_poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        """Dead-lettered; a query whose answering failed is also answered ``INTERNAL``."""
        reason = exc.reason if isinstance(exc, Poison) else "internal error"
        outputs = [dead_letter_out(self.topics.dlq, record, reason)]
        fields = readable_fields(record.value, ("requestId", "type", "idempotencyKey"))
        request_id = readable_id(fields, "requestId")
        if request_id is not None and not isinstance(exc, Refused):
            command_type = cut(fields.get("type", "unknown"), MAX_TYPE_CHARS)
            outputs.append(Outbound(self.topics.replies, request_id.encode(), reply_value(
                request_id, command_type, "error",
                idempotency_key=readable_id(fields, "idempotencyKey"),
                code=ErrorCode.INTERNAL.value, message="internal error; retry")))
            metrics.replied(command_type, "error", ErrorCode.INTERNAL.value)
        return outputs

    async def decide_transfer_event(self, record: SourceRecord) -> list[Outbound]:
        self.transfers.apply_raw(record.value)
        self.progress.advance(record.partition, record.offset)
        return []

    def transfer_event_poison(self, record: SourceRecord, exc: BaseException
                              ) -> list[Outbound]:
        self.progress.advance(record.partition, record.offset)
        reason = exc.reason if isinstance(exc, Poison) else "internal error"
        return [dead_letter_out(self.topics.dlq, record, reason)]


def register(worker: Worker) -> QueryRuntime:
    """Create the query tables and agents (and the HTTP views when the web server is on)."""
    app, topics = worker.app, worker.topics
    runtime = QueryRuntime(worker)
    queries = Handler(runtime.decide_query, runtime.query_poison)
    transfer_events = Handler(runtime.decide_transfer_event, runtime.transfer_event_poison)

    @app.agent(worker.channels[topics.queries], name="answer_queries", concurrency=1)
    async def answer_queries(stream: Any) -> None:
        """business.queries (key accountId or transferId) → business.replies."""
        await consume(worker, stream, queries)

    @app.agent(worker.channels[topics.transfer_events], name="track_transfers",
               concurrency=1)
    async def track_transfers(stream: Any) -> None:
        """business.transfer-events (key transferId) → the transfers table."""
        await consume(worker, stream, transfer_events)

    @app.on_partitions_revoked.connect
    def forget_progress(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        runtime.progress.forget()

    if worker.settings.web_enabled:
        from agents.web import register_views

        register_views(app, runtime)
    if worker.settings.reconcile_interval_seconds > 0:
        register_balance_check(worker, runtime)
    return runtime


def register_balance_check(worker: Worker, runtime: QueryRuntime) -> None:
    """Every ``BIZ_RECONCILE_INTERVAL_SECONDS``: the balances of ``query_balances`` against
    the ledger (app/query_reconciliation.py), for the accounts whose partitions of
    ``account.events`` this worker's saga engine consumes (it writes them): each account
    checked by one worker."""
    from app.adapters.db import make_engine
    from app.query_reconciliation import QueryBalanceCheck, ledger_reader

    app, settings, topics = worker.app, worker.settings, worker.topics
    engine = make_engine(settings.database_url, settings.account_center_db_schema,
                         pool_size=1)
    check = QueryBalanceCheck(ledger_reader(engine))

    @app.timer(interval=settings.reconcile_interval_seconds, name="check_query_balances")  # type: ignore[untyped-decorator]
    async def check_query_balances() -> None:
        # Read at each tick: the engine is set by the bootstrap after this registration.
        saga_engine = worker.engine
        if saga_engine is None:
            return
        mine = {tp.partition for tp in saga_engine.assignment()
                if tp.topic == topics.account_events}
        if mine:
            await check.run_stored(lambda: runtime.query_tables.balances_in(mine))

    async def close_engine(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await engine.dispose()

    app.on_before_shutdown.connect(close_engine)
