"""The bootstrap of the business worker: the one place where its collaborators are built
and wired (cosmicpython's ``bootstrap.py``): the Faust app (agents/faust_app.py), the
PostgreSQL store and saga state, the TransferService, the query agent, the saga engine
(agents/saga_engine.py, a service of the app: the saga topics, the account and funding
events, every query table), the web views and metrics; then Faust's worker runs it
(``bizcenter worker``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mode

from agents import query_agents
from agents.faust_app import Worker, build_app
from agents.health import register_health_views, register_metrics_view
from agents.saga_engine import SagaEngine
from app import collector, log_format, log_redaction, metrics
from app.adapters.postgres_store import PostgresBusinessStore
from app.adapters.saga_state import PostgresSagaState
from app.domain import transfer_saga as saga_core
from app.query_service import SEP, AccountProjection
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TransferTokens
from app.transfers.service import TransferService
from events.topics import Topics, partition_of

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, store: Any = None) -> Worker:
    """Build the Faust app and its topics (no table), and register the agents."""
    app = build_app(settings)
    topics = Topics.from_settings(settings)

    def raw_topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=settings.topic_partitions,
                         replicas=settings.topic_replication_factor)

    channels = {
        getattr(topics, f): raw_topic(getattr(topics, f)) for f in topics.__slots__
    }
    store = store if store is not None else PostgresBusinessStore.from_settings(settings)
    partitions = settings.topic_partitions
    state = PostgresSagaState(
        store.engine, settings.db_schema,
        home_of=lambda key: partition_of(key.split(SEP, 1)[0].encode(), partitions))
    service = TransferService(
        settings,
        store,
        state.sagas,
        state.replies,
        clock=time.time,
        access=AccessTokenVerifier.from_settings(settings),
        transfer_tokens=TransferTokens.from_settings(settings),
    )
    worker = Worker(app, settings, topics, channels, service)
    query_agents.register(worker)
    # The saga engine applies each valid account event to the account query tables before
    # it moves the event's saga, in the same transaction (read your writes,
    # docs/architecture.md).
    rows = state.rows
    service.account_event_listeners.append(AccountProjection(
        rows["query_balances"], rows["query_history"], rows["query_events_seen"]).apply)
    engine = SagaEngine(settings, service, state, crash=app.crash)
    worker.engine = engine
    # Started once the app is up (Faust instantiates a class, and takes an instance as is).
    app._extra_services.append(EngineService(engine))  # type: ignore[arg-type]
    register_worker_metrics(worker, engine, state)
    return worker


class EngineService(mode.Service):
    """The saga engine as a service of the Faust app: started after the app, stopped with
    it."""

    def __init__(self, engine: SagaEngine) -> None:
        super().__init__()
        self.engine = engine

    async def on_start(self) -> None:
        await self.engine.start()

    async def on_stop(self) -> None:
        await self.engine.stop()


#: States counted by ``bizcenter_open_sagas``: every non-final one, and MANUAL_REVIEW (final
#: for the saga, open for operators).
OPEN_STATES = (*(s.value for s in saga_core.State if s not in saga_core.FINAL_STATES),
               saga_core.State.MANUAL_REVIEW.value)


def register_worker_metrics(worker: Worker, engine: SagaEngine,
                            state: PostgresSagaState) -> None:
    """The worker's scrape-time gauges (open sagas by state, consumer lag) and, with the
    web server on, ``/metrics``. Consumer lag is computed when scraped; the open sagas are
    counted in PostgreSQL every 15 s by a timer: nothing on the path of a record."""
    app, topics = worker.app, worker.topics
    inputs = {topics.queries}  # Faust's; the engine has the rest
    open_counts: dict[str, int] = dict.fromkeys(OPEN_STATES, 0)

    @app.timer(interval=15.0, name="count_open_sagas")  # type: ignore[untyped-decorator]
    async def count_open_sagas() -> None:
        mine = sorted({tp.partition for tp in engine.assignment()
                       if tp.topic == topics.saga_inputs})
        try:
            counts = await state.count_by_state(mine, OPEN_STATES) if mine else {}
        except Exception as exc:
            log.warning("open sagas not counted (%s)", type(exc).__name__)
            return
        for name in OPEN_STATES:
            open_counts[name] = counts.get(name, 0)

    def open_sagas() -> list[tuple[tuple[str, ...], float]]:
        return [((name,), float(n)) for name, n in open_counts.items()]

    def faust_assigned() -> set[Any]:
        try:
            return set(app.consumer.assignment())
        except Exception:  # not started yet
            return set()

    def consumer_lag() -> list[tuple[tuple[str, ...], float]]:
        rows: list[tuple[tuple[str, ...], float]] = []
        consumer = app.consumer
        committed = getattr(consumer, "_committed_offset", {})
        for tp in sorted(faust_assigned()):
            if tp.topic not in inputs:
                continue
            end = consumer.highwater(tp)
            done = committed.get(tp)
            if end is None or end < 0:
                continue
            rows.append(((tp.topic, str(tp.partition)),
                         float(max(0, end - (done if done is not None else 0)))))
        if engine.consumer is not None:
            for tp in sorted(engine.assignment()):
                end = engine.consumer.highwater(tp)
                if end is None or end < 0:
                    continue
                done = engine.committed.get(tp)
                if done is None:  # the group's committed offset not read yet
                    continue
                rows.append(((tp.topic, str(tp.partition)), float(max(0, end - done))))
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
        register_health_views(worker.app, settings.database_url, settings.db_schema,
                              engine=worker.engine)
    faust_worker = RedactingWorker(worker.app, loglevel=settings.log_level.lower(),
                                   quiet=True)
    collector.settle(settings.gc_gen0_threshold)  # the worker is built: its heap stays
    faust_worker.execute_from_commandline()
    return 0
