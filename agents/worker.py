"""The bootstrap of the business worker: the one place where its collaborators are built
and wired (cosmicpython's ``bootstrap.py``): the Faust app (agents/faust_app.py), the
PostgreSQL store, the tables, the TransferService, the agents, the web views and metrics;
then Faust's worker runs it (``bizcenter worker``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from agents import query_agents, transfer_agents
from agents.faust_app import Worker, build_app
from agents.health import register_health_views, register_metrics_view
from agents.tables import TableReplies, TableSagas
from app import log_format, log_redaction, metrics
from app.adapters.postgres_store import PostgresBusinessStore
from app.domain import transfer_saga as saga_core
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TransferTokens
from app.transfers.service import TransferService
from events.topics import Topics


def create_app(settings: Settings, *, store: Any = None) -> Worker:
    """Build the Faust app, its topics and tables, and register the agents."""
    app = build_app(settings)
    topics = Topics.from_settings(settings)

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=settings.topic_partitions,
                         replicas=settings.topic_replication_factor)

    channels = {
        getattr(topics, f): raw_topic(getattr(topics, f)) for f in topics.__slots__
    }
    raw: Any = faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    # key_type/value_type pick the store's serializer, the schema the changelog's.
    sagas_table = app.Table("sagas", schema=raw, key_type=bytes, value_type=bytes,
                            partitions=settings.topic_partitions)
    replies_table = app.Table("replies", schema=raw, key_type=bytes, value_type=bytes,
                              partitions=settings.topic_partitions)
    service = TransferService(
        settings,
        store if store is not None else PostgresBusinessStore.from_settings(settings),
        TableSagas(sagas_table),
        TableReplies(replies_table),
        clock=time.time,
        access=AccessTokenVerifier.from_settings(settings),
        transfer_tokens=TransferTokens.from_settings(settings),
    )
    worker = Worker(app, settings, topics, channels, service)
    queries = query_agents.register(worker)  # query tables first: the relay writes them
    # The relay of account.events applies each valid event to the account tables before
    # relaying it (read your writes, docs/architecture.md).
    service.account_event_listeners.append(queries.accounts.apply)
    transfer_agents.register(worker)
    register_worker_metrics(worker, sagas_table)
    return worker


#: States counted by ``bizcenter_open_sagas``: every non-final one, and MANUAL_REVIEW (final
#: for the saga, open for operators).
OPEN_STATES = (*(s.value for s in saga_core.State if s not in saga_core.FINAL_STATES),
               saga_core.State.MANUAL_REVIEW.value)


def register_worker_metrics(worker: Worker, sagas_table: Any) -> None:
    """The worker's scrape-time gauges (open sagas by state, consumer lag) and, with the
    web server on, ``/metrics``. Both gauges are computed only when scraped (at most every
    5 s): nothing on the path of a record."""
    app, topics = worker.app, worker.topics
    inputs = {topics.commands, topics.saga_inputs, topics.account_events,
              topics.funding_events, topics.transfer_events, topics.queries}

    def assigned() -> set[Any]:
        try:
            return set(app.consumer.assignment())
        except Exception:  # not started yet
            return set()

    def open_sagas() -> list[tuple[tuple[str, ...], float]]:
        mine = {tp.partition for tp in assigned() if tp.topic == topics.saga_inputs}
        counts = dict.fromkeys(OPEN_STATES, 0)
        if mine:
            for _key, raw in list(sagas_table.items()):
                found = metrics.saga_state_and_home(bytes(raw))
                if found is not None and found[0] in counts and found[1] in mine:
                    counts[found[0]] += 1
        return [((state,), float(n)) for state, n in counts.items()]

    def consumer_lag() -> list[tuple[tuple[str, ...], float]]:
        consumer = app.consumer
        committed = getattr(consumer, "_committed_offset", {})
        rows: list[tuple[tuple[str, ...], float]] = []
        for tp in sorted(assigned()):
            if tp.topic not in inputs:
                continue
            end = consumer.highwater(tp)
            done = committed.get(tp)
            if end is None or end < 0:
                continue
            rows.append(((tp.topic, str(tp.partition)),
                         float(max(0, end - (done if done is not None else 0)))))
        return rows

    metrics.register_collector(metrics.CallbackCollector(
        "bizcenter_open_sagas", "Sagas of this worker's partitions by state (non-final, and "
        "MANUAL_REVIEW)", ["state"], open_sagas))
    metrics.register_collector(metrics.CallbackCollector(
        "bizcenter_consumer_lag", "Records of each assigned input partition not yet "
        "committed (log end offset - committed offset)", ["topic", "partition"],
        consumer_lag, ttl=0.0))
    if worker.settings.web_enabled:
        register_metrics_view(app)


def run_worker(settings: Settings) -> int:
    """Build the worker and run it under Faust's worker until it is stopped."""
    from faust.worker import Worker as FaustWorker

    class RedactingWorker(FaustWorker):
        """Faust's worker replaces the root logger's handlers when it starts: the
        redaction filter goes onto the new ones before any record reaches them."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            log_redaction.install()
            log_format.install(settings.log_format)

    worker = create_app(settings)
    if settings.web_enabled:
        register_health_views(worker.app, settings.database_url, settings.db_schema)
    faust_worker = RedactingWorker(worker.app, loglevel=settings.log_level.lower(),
                                   quiet=True)
    faust_worker.execute_from_commandline()
    return 0
