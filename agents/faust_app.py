"""The one ``faust.App`` module of the business worker: the app built from Settings, the
Faust table adapters of the service's ports, and :class:`Worker`, what the agents are given.

One app per process (so tests can run isolated copies with their own topic prefix and app
id). The bootstrap that builds the collaborators and registers the agents is
agents/worker.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import orjson
from mode.utils.times import want_seconds

from agents.faust_consumer import BatchDeliveringConsumer
from app.domain import transfer_saga as saga_core
from app.record_failures import Outbound
from app.settings import Settings
from app.transfers.service import TransferService
from events.topics import Topics

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
    (agents/faust_consumer.py)."""

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

    async def send_all(self, outbounds: Iterator[Outbound] | list[Outbound]) -> None:
        for out in outbounds:
            await self.channels[out.topic].send(key=out.key, value=out.value,
                                                partition=out.partition)


def build_app(settings: Settings) -> BusinessApp:
    """The worker's faust.App, configured from Settings: no agent, no table yet."""
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
        # data and the cluster layout); our own views are explicit (agents/web.py).
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
    return app
