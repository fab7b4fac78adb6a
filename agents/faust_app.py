"""The one ``faust.App`` module of the business worker: the app built from Settings and
:class:`Worker`, what the agents are given (and how they send). The app has no table: the
saga state and every query table are PostgreSQL's (app/adapters/saga_state.py,
app/adapters/query_tables.py); ``store=`` and ``datadir=`` are only Faust's own settings.

One app per process (so tests can run isolated copies with their own topic prefix and app
id). The bootstrap that builds the collaborators and registers the agents is
agents/worker.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from mode.utils.times import want_seconds

from agents.faust_consumer import BatchDeliveringConsumer
from app.record_failures import Outbound
from app.settings import Settings
from app.transfers.service import TransferService
from events.topics import Topics

log = logging.getLogger(__name__)

#: (fetch_min_bytes, fetch_max_wait_ms) of the Faust consumer, whose only stream is
#: business.queries: a query is answered as soon as it is there, and an idle topic costs one
#: fetch every half second. (The saga engine's and the account center's consumers batch
#: their fetches under load: events/fetching.py.) With the batched setting here, this
#: consumer's empty fetches every 10 ms cost the worker 0.05 core and the broker 0.03 with
#: no query at all (docs/performance.md).
QUERY_FETCH = (1, 500)


class BusinessApp(faust.App):
    """faust.App whose Kafka consumer delivers each fetched batch in one task
    (agents/faust_consumer.py)."""

    #: (fetch_min_bytes, fetch_max_wait_ms) of the app's consumer, or None for Faust's.
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
    #: The saga engine (agents/saga_engine.py), set by the bootstrap.
    engine: Any = None

    async def send_all(self, outbounds: Iterator[Outbound] | list[Outbound]) -> None:
        for out in outbounds:
            await self.channels[out.topic].send(key=out.key, value=out.value,
                                                partition=out.partition)


def build_app(settings: Settings) -> BusinessApp:
    """The worker's faust.App, configured from Settings: no agent yet (and no table)."""
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
    app.fetch_tuning = QUERY_FETCH
    return app
