"""The query agent: a thin adapter between Kafka, the query tables and the QueryService
(app/query_service.py).

Tables, all in PostgreSQL, written by the saga engine in its cycle's transaction
(agents/saga_engine.py) and read by every worker with no cache
(app/adapters/query_tables.py):

- ``query_balances``   accountId → balance, as-of, last history seq
- ``query_history``    accountId ␟ seq → one applied account event
- ``query_transfers``  transferId → parties, amount, state, times (``TransferProjection``
  over every transfer event the engine produces, committed with its saga)

No Faust table is left: ``answer_queries`` answers ``business.queries`` (a balance, a
history page or a transfer's details) from PostgreSQL, whichever worker consumes the
query's partition, and the HTTP views (agents/web.py) answer every request where it
arrives. The group ``BIZ_APP_ID`` consumes only ``business.queries``
(``business.transfer-events`` is still produced by the engine, for downstream readers; no
worker reads it back). Concurrency stays 1 (faust-streaming #606).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from agents.faust_app import Worker
from agents.transfer_agents import consume
from app import metrics
from app.adapters.query_tables import PostgresQueryTables
from app.query_service import QueryService
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
from schemas.wire import ErrorCode, QueryRequest

log = logging.getLogger(__name__)


class QueryRuntime:
    """The query side of one worker: the PostgreSQL query tables and the service over
    them."""

    def __init__(self, worker: Worker) -> None:
        settings = worker.settings
        self.topics = worker.topics
        # The query tables, on the engine of the PostgreSQL store (its search_path: the
        # business schema), as the bootstrap builds the saga state.
        store: Any = worker.service.store
        self.query_tables = PostgresQueryTables(store.engine, settings.db_schema)
        self.service = QueryService(self.query_tables.balances, self.query_tables.history,
                                    self.query_tables.transfers)
        self.access = worker.service.access  # the verifier of business.commands
        self.store = worker.service.store

    # ---------------------------------------------------------------- records

    async def decide_query(self, record: SourceRecord) -> list[Outbound]:
        """A ``business.queries`` record → its reply."""
        doc = decode_json_object(record.value)
        try:
            request = QueryRequest.model_validate(doc)
        except ValidationError:
            raise Refused("invalid query request") from None
        answer = await self.service.answer(request)  # as committed: nothing to wait for
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


def register(worker: Worker) -> QueryRuntime:
    """Create the query agent (and the HTTP views when the web server is on)."""
    app, topics = worker.app, worker.topics
    runtime = QueryRuntime(worker)
    queries = Handler(runtime.decide_query, runtime.query_poison)

    @app.agent(worker.channels[topics.queries], name="answer_queries", concurrency=1)
    async def answer_queries(stream: Any) -> None:
        """business.queries (key accountId or transferId) → business.replies."""
        await consume(worker, stream, queries)

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
