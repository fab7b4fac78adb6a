"""The Faust application of the business worker: topics, tables and the service wiring.

One app per process, built from Settings (so tests can run isolated copies with their own
topic prefix and app id). The agents live in ``agents/`` and are registered here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import orjson
from mode.utils.times import want_seconds

from agents.faust_consumer import BatchDeliveringConsumer
from app.domain import transfer_saga as saga_core
from app.settings import Settings
from app.transfer_service import Outbound, Topics, TransferService

log = logging.getLogger(__name__)


class TableSagas:
    """The ``sagas`` table (key: transferId = the scoped idempotency key, hashed)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, transfer_id: str) -> saga_core.Saga | None:
        raw = self.table.get(transfer_id.encode())
        return None if raw is None else saga_core.saga_from_dict(orjson.loads(raw))

    def put(self, saga: saga_core.Saga) -> None:
        self.table[saga.transfer.transfer_id.encode()] = orjson.dumps(
            saga_core.saga_to_dict(saga)
        )

    def scan(self) -> Iterable[saga_core.Saga]:
        for _key, raw in list(self.table.items()):
            yield saga_core.saga_from_dict(orjson.loads(raw))

    def delete(self, transfer_id: str) -> None:
        del self.table[transfer_id.encode()]  # a tombstone in the changelog


class TableReplies:
    """The ``replies`` table: the reply sent to each request (``operatorId ␟ requestId``)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    # Stored as b"<partition>|<saved at>|<reply>" so that old replies can be purged from
    # the partition they belong to.

    def get(self, key: str) -> bytes | None:
        raw = self.table.get(key.encode())
        return None if raw is None else bytes(raw).split(b"|", 2)[2]

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None:
        self.table[key.encode()] = b"%d|%.3f|%s" % (partition, at, reply)

    def expired(self, partition: int, older_than: float) -> list[str]:
        keys = []
        for key, raw in list(self.table.items()):
            part, at, _reply = bytes(raw).split(b"|", 2)
            if int(part) == partition and float(at) < older_than:
                keys.append(bytes(key).decode())
        return keys

    def delete(self, key: str) -> None:
        del self.table[key.encode()]


class BusinessApp(faust.App):
    """faust.App whose Kafka consumer delivers each fetched batch in one task
    (app/faust_consumer.py)."""

    #: (fetch_min_bytes, fetch_max_wait_ms) of the worker's consumer, or None for Faust's.
    fetch_tuning: tuple[int, int] | None = None

    def _new_transport(self) -> Any:
        transport = super()._new_transport()
        transport.Consumer = BatchDeliveringConsumer  # type: ignore[misc]
        return transport


@dataclass
class Worker:
    """What the agents need: the app, its channels and the service."""

    app: faust.App
    settings: Settings
    topics: Topics
    channels: dict[str, Any]
    service: TransferService
    queries: Any = None  # agents.query_agents.QueryRuntime: query tables and projections

    async def send_all(self, outbounds: Iterator[Outbound] | list[Outbound]) -> None:
        for out in outbounds:
            await self.channels[out.topic].send(key=out.key, value=out.value,
                                                partition=out.partition)


def create_app(settings: Settings, *, store: Any = None) -> Worker:
    """Build the Faust app, its topics and tables, and register the agents."""
    from app.adapters.postgres_store import PostgresBusinessStore

    datadir = Path(settings.data_dir) / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = BusinessApp(
        settings.app_id,
        broker=[f"kafka://{s.strip()}" for s in settings.kafka_bootstrap_servers.split(",")],
        store=settings.table_store,
        datadir=str(datadir),
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_linger=want_seconds(settings.producer_linger_ms / 1000),
        consumer_auto_offset_reset="earliest",
        # A worker that dies without leaving holds its partitions until its session
        # times out: Faust's 60 s default made a restarted worker wait ~90 s.
        broker_session_timeout=settings.consumer_session_timeout_seconds,
        broker_heartbeat_interval=settings.consumer_heartbeat_interval_seconds,
        broker_commit_every=500,
        broker_commit_interval=0.5,
        stream_buffer_maxsize=1024,
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.web_host,  # canonical URL http://web_host:web_port, advertised
        # Faust's raw /table and /router endpoints stay off (they would show any table's
        # data and the cluster layout); our own views are explicit (app/web.py).
        web_router_enabled=False,
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        web_in_thread=False,
        table_cleanup_interval=60.0,
        logging_config=None,
    )
    app.fetch_tuning = (settings.consumer_fetch_min_bytes, settings.consumer_fetch_max_wait_ms)
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
    )
    worker = Worker(app, settings, topics, channels, service)

    from agents import query_agents, transfer_agents

    query_agents.register(worker)  # query tables first: the relay writes them
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
    from app import metrics

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
        metrics.register_metrics_view(app)
