"""The reference account center process: account.commands in, account.events out.

Why one module: it is one process, a stand-in for another team's system (not product code),
and its correctness is one argument read top to bottom: the batch loop's order (ledger, then
events, then offsets), how a failing command is isolated and dead-lettered, the start-up and
shutdown, and what runs beside the loop in the same process and stops with it (the live
reconciliation, the health and metrics probes, which read the loop's consumer and state).

At-least-once with exactly-once effects: for each batch the ledger commits first, then the
events are produced (acks=all, idempotent producer) and only then are the offsets committed.
A crash anywhere before the offset commit means redelivery; the ledger then returns the
stored events, which are produced again unchanged (consumers deduplicate on commandId).

Failures follow the poison/outage rule of every consumer (app/record_failures.py,
docs/architecture.md). Records that cannot be decoded (over 64 KiB, not JSON, nested too
deep, invalid) go to business.dlq: never a crash, never a silent skip. Infrastructure
failures (the database or the broker unreachable) are retried with back-off and nothing is
committed meanwhile. A command that fails for its own sake (the database refuses its data,
SQLSTATE class 22/23, or any failure that is not the infrastructure's), after isolating it
from its batch and trying it three times, is dead-lettered so that it cannot stall its
partition; so is one whose event cannot be produced (too large). Dead letters hold the
record's coordinates and digest, never its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from app.record_failures import (
    MAX_OUTPUT_BYTES,
    Poison,
    Refused,
    SourceRecord,
    check_size,
    dead_letter,
    decode_json_object,
    describe,
    is_outage,
    validation_reason,
)
from app.settings import Settings
from events.fetching import AdaptiveFetch
from events.producing import Record, send_batched
from events.topics import cached_partitioner
from reference.account_center.ledger import Ledger
from schemas.wire import AccountCommand, AccountEvent, AccountEventType, DeadLetter

log = logging.getLogger(__name__)

COMMANDS_TOPIC = "account.commands"
EVENTS_TOPIC = "account.events"
DLQ_TOPIC = "business.dlq"

MAX_RECORDS = 500
POLL_TIMEOUT_MS = 200
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
#: Attempts of one isolated command before a data error dead-letters it.
POISON_ATTEMPTS = 3


class _Stopped(Exception):
    """Raised inside the batch pipeline when ``stop`` is set during a retry."""


@dataclass(frozen=True, slots=True)
class _Item:
    record: Any  # aiokafka ConsumerRecord
    command: AccountCommand


@dataclass(frozen=True, slots=True)
class _Out:
    topic: str
    key: bytes | None
    value: bytes
    source: Any = None  # the consumed record it answers: dead-lettered if it cannot be sent


def decode_command(record: Any) -> AccountCommand:
    """The AccountCommand of a record, or :class:`Refused` with the reason (no value in
    it): over 64 KiB, not JSON, nested too deep, or invalid."""
    check_size(SourceRecord.of(record))
    data = decode_json_object(record.value)
    try:
        return AccountCommand.model_validate(data)
    except ValidationError as exc:
        raise Refused("invalid AccountCommand: "
                      + validation_reason(exc, name_unknown=True)) from None


def _is_data_error(exc: BaseException) -> bool:
    """A failure of the command itself (poison): retrying it elsewhere can never succeed."""
    return not is_outage(exc)


class AccountCenter:
    """One consumer/producer pair over a Ledger. ``run`` loops until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        consumer: Any,
        producer: Any,
        stop: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._consumer = consumer
        self._producer = producer
        self._stop = stop
        self._events_topic = settings.topic(EVENTS_TOPIC)
        self._dlq_topic = settings.topic(DLQ_TOPIC)
        #: The next offset of each partition this process committed (consumer lag).
        self.committed: dict[Any, int] = {}
        #: When the loop last asked for records (monotonic): /readyz's ``consuming``.
        self.last_poll: float | None = None
        #: The consumer's fetch setting, following its traffic (events/fetching.py).
        self.fetch: AdaptiveFetch | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.last_poll = loop.time()
            batches = await self._consumer.getmany(
                timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS
            )
            if self.fetch is not None:
                self.fetch.read(sum(len(records) for records in batches.values()))
            if not batches:
                continue
            try:
                await self.process(batches)
            except _Stopped:
                log.info("account center stopping: batch left uncommitted (redelivered)")
                return

    async def process(self, batches: dict[Any, list[Any]]) -> None:
        """Decide, produce, then commit one getmany() result."""
        items: list[_Item] = []
        out: list[_Out] = []
        dead = 0
        for records in batches.values():
            for record in records:
                try:
                    items.append(_Item(record, decode_command(record)))
                except Poison as exc:
                    dead += 1
                    log.warning("dead-lettering %s[%d]@%d: %s", record.topic,
                                record.partition, record.offset, exc.reason)
                    out.append(self._dlq_out(dead_letter(SourceRecord.of(record), exc.reason)))

        results = await self._decide(items)
        rejected = 0
        for item, result in zip(items, results, strict=True):
            if isinstance(result, AccountEvent):
                rejected += result.type is AccountEventType.REJECTED
                out.append(
                    _Out(self._events_topic, result.account_id.encode(),
                         orjson.dumps(result.to_wire()), item.record)
                )
            else:
                dead += 1
                out.append(self._dlq_out(result))

        await self._produce(out)
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        try:
            await self._consumer.commit(offsets)
            self.committed.update(offsets)
        except KafkaError as exc:
            # Typically a rebalance: the new owner re-processes, the ledger deduplicates.
            log.warning("offset commit failed (%s): batch will be redelivered", exc)
        log.info(
            "batch: %d records, %d commands, %d rejected, %d dead-lettered",
            sum(len(r) for r in batches.values()), len(items), rejected, dead,
        )

    def _dlq_out(self, letter: DeadLetter) -> _Out:
        return _Out(self._dlq_topic, None, orjson.dumps(letter.to_wire()))

    # ----------------------------------------------------------------------------------

    async def _decide(self, items: Sequence[_Item]) -> list[AccountEvent | DeadLetter]:
        if not items:
            return []
        commands = [i.command for i in items]
        backoff = BACKOFF_INITIAL
        while True:
            try:
                return list(await self._ledger.apply_batch(commands))
            except Exception as exc:
                if _is_data_error(exc):
                    if len(items) > 1:
                        log.warning("batch refused for one of its commands (%s): isolating them",
                                    describe(exc))
                        return [await self._decide_one(i) for i in items]
                    # A single command: _decide_one counts its attempts.
                    return [await self._decide_one(items[0])]
                log.error("ledger unavailable (%s: %s), batch of %d retried in %.1fs",
                          type(exc).__name__, exc, len(items), backoff,
                          exc_info=backoff == BACKOFF_INITIAL)
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _decide_one(self, item: _Item) -> AccountEvent | DeadLetter:
        backoff = BACKOFF_INITIAL
        data_errors = 0
        while True:
            try:
                return await self._ledger.apply(item.command)
            except Exception as exc:
                if _is_data_error(exc):
                    data_errors += 1
                    if data_errors >= POISON_ATTEMPTS:
                        log.error("command %s failed for its own sake (%s): dead-lettered",
                                  item.command.command_id, describe(exc))
                        return dead_letter(
                            SourceRecord.of(item.record),
                            f"ledger refused the command: {describe(exc)}",
                        )
                else:
                    log.error("ledger unavailable (%s: %s), command retried in %.1fs",
                              type(exc).__name__, exc, backoff,
                              exc_info=backoff == BACKOFF_INITIAL)
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _produce(self, out: Sequence[_Out]) -> None:
        """Send every output, then wait for all. An outage (the broker away) re-sends them
        all after a back-off (consumers deduplicate on commandId); an output refused for its
        own sake (too large, say) is replaced by the dead letter of the command it answers,
        so that it can never stall the partition. A batch is refused whole, so the refused
        outputs are first tried again each in a batch of its own: only one refused alone is
        dead-lettered, never a batch mate of it."""
        pending = [self._sendable(o) for o in out]
        backoff = BACKOFF_INITIAL
        alone = False
        while True:
            try:
                # One batch per topic-partition (events/producing.py); a record refused
                # before it left has a failed future like one the broker refused.
                records = [Record(o.topic, o.key, o.value) for o in pending]
                if alone:
                    futures = [f for r in records
                               for f in await send_batched(self._producer, [r])]
                else:
                    futures = await send_batched(self._producer, records)
                results = await asyncio.gather(*futures, return_exceptions=True)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                results = [exc]
            failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
            if not failed:
                return
            if any(is_outage(r) for _i, r in failed):
                log.warning("produce failed (%s), %d messages re-sent in %.1fs",
                            describe(failed[0][1]), len(pending), backoff)
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            errors = dict(failed)
            if not alone:
                # Refused for some output's own sake: the others are acknowledged; the
                # refused ones again, each alone.
                pending = [o for i, o in enumerate(pending) if i in errors]
                alone = True
                continue
            # Refused alone: replaced by dead letters (sent alone too).
            kept: list[_Out] = []
            for i, o in enumerate(pending):
                err = errors.get(i)
                if err is None:
                    continue  # acknowledged
                if o.source is not None:
                    kept.append(self._refused(o, err))
                else:
                    log.error("a dead letter was refused (%s); dropped", describe(err))
            pending = kept
            if not pending:
                return

    def _sendable(self, o: _Out) -> _Out:
        size = len(o.key or b"") + len(o.value)
        if size > MAX_OUTPUT_BYTES and o.source is not None:
            return self._refused(o, Poison(f"event of {size} bytes over the limit"))
        return o

    def _refused(self, o: _Out, exc: BaseException) -> _Out:
        log.error("output for %s[%s]@%s refused (%s): dead-lettered", o.source.topic,
                  o.source.partition, o.source.offset, describe(exc))
        letter = dead_letter(SourceRecord.of(o.source), f"its event was refused: "
                             f"{describe(exc)}")
        return replace(self._dlq_out(letter), source=None)

    async def _backoff(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise _Stopped


async def _migrate(ledger: Ledger, stop: asyncio.Event) -> bool:
    backoff = BACKOFF_INITIAL
    while not stop.is_set():
        try:
            await ledger.migrate()
            return True
        except Exception:
            log.exception("account center: migration failed, retried in %.1fs", backoff)
            try:
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, BACKOFF_MAX)
    return False


async def run_account_center(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the reference account center until ``stop`` is set or the task is cancelled."""
    stop = stop or asyncio.Event()
    ledger = Ledger.from_settings(settings)
    consumer: Any = None
    producer: Any = None
    web: Any = None
    background: list[asyncio.Task[None]] = []
    try:
        if not await _migrate(ledger, stop):
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id="account-center",
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.producer_linger_ms,
            partitioner=cached_partitioner,
        )
        await producer.start()
        consumer = AIOKafkaConsumer(
            settings.topic(COMMANDS_TOPIC),
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id="account-center",
            group_id=settings.account_center_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_min_bytes=settings.consumer_fetch_min_bytes,
            fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        )
        await consumer.start()
        log.info("account center consuming %s as group %s",
                 settings.topic(COMMANDS_TOPIC), settings.account_center_group)
        center = AccountCenter(settings, ledger, consumer, producer, stop)
        center.fetch = AdaptiveFetch(consumer, settings.consumer_fetch_min_bytes,
                                     settings.consumer_fetch_max_wait_ms, time.monotonic)
        if settings.reconcile_interval_seconds > 0:
            background.append(asyncio.create_task(
                live_reconciliation(ledger, settings.reconcile_interval_seconds, stop),
                name="live-reconciliation"))
        if settings.account_center_web_port:
            web = await start_web(settings, center, consumer)
        await center.run()
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if web is not None:
            await _quietly(web.cleanup())
        if consumer is not None:
            await _quietly(consumer.stop())
        if producer is not None:
            await _quietly(producer.stop())
        await _quietly(ledger.close())
        log.info("account center stopped")


# --------------------------------------------------------------------------------------
# operating it: live reconciliation, /metrics, /healthz, /readyz
# --------------------------------------------------------------------------------------

#: A drift still there is logged again (ERROR) at most this often.
ALARM_REPEAT_SECONDS = 600.0
RECONCILE_TIMEOUT_SECONDS = 60.0


class LiveReconciliation:
    """One run of app/reconciliation.py's checks at a time: sets the reconciliation metrics
    and logs an alarm (ERROR) naming what differs (accounts, currencies, commands) when a
    drift appears or changes, again every :data:`ALARM_REPEAT_SECONDS` while it stays, and
    one INFO line when the ledger is balanced again."""

    def __init__(self, engine: Any, *, clock: Any = None) -> None:
        import time

        self.engine = engine
        self.clock = clock or time.monotonic
        self._alarm: tuple[Any, ...] | None = None
        self._alarmed_at = 0.0

    async def run_once(self) -> Any:
        from app import metrics
        from app.reconciliation import reconcile

        try:
            report = await asyncio.wait_for(reconcile(self.engine), RECONCILE_TIMEOUT_SECONDS)
        except Exception as exc:
            metrics.RECONCILIATIONS.labels("error").inc()
            log.warning("live reconciliation: the ledger could not be read (%s)",
                        describe(exc))
            return None
        for currency, totals in report.totals.items():
            metrics.DRIFT.labels(currency).set(
                totals["balances"] - (totals["entered"] - totals["clearing"]))
            metrics.CLEARING.labels(currency).set(totals["clearing"])
        for check in report.checks:
            metrics.CHECK_OK.labels(check.name).set(1 if check.ok else 0)
        # Money in clearing is normal while transfers are in flight: not an alarm by itself.
        drifts = tuple(d for d in report.drifts if d.check != "clearing account zero")
        if not drifts:
            metrics.RECONCILIATIONS.labels("balanced").inc()
            if self._alarm is not None:
                log.info("live reconciliation: the ledger is balanced again")
            self._alarm = None
            return report
        metrics.RECONCILIATIONS.labels("drift").inc()
        now = self.clock()
        if drifts != self._alarm or now - self._alarmed_at >= ALARM_REPEAT_SECONDS:
            self._alarm, self._alarmed_at = drifts, now
            involved = sorted({d.subject for d in drifts})
            log.error(
                "RECONCILIATION DRIFT: %s; involved: %s (docs/operations.md, Reconcile)",
                "; ".join(f"{d.check} {d.subject}: expected {d.expected}, actual "
                          f"{d.actual} ({d.difference:+d})" for d in drifts[:20]),
                ", ".join(involved[:50]))
        return report


async def live_reconciliation(ledger: Ledger, interval: float, stop: asyncio.Event) -> None:
    """Reconcile every ``interval`` seconds until ``stop`` (the first run at once)."""
    checker = LiveReconciliation(ledger.engine)
    while not stop.is_set():
        await checker.run_once()
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass


async def start_web(settings: Settings, center: AccountCenter, consumer: Any) -> Any:
    """The account center's web server on ``BIZ_WEB_BIND:BIZ_ACCOUNT_CENTER_WEB_PORT``:
    ``/metrics``, ``/healthz`` (alive), ``/readyz`` (partitions assigned, the loop polling,
    PostgreSQL answering; 503 otherwise). A port it cannot bind is logged (ERROR) and the
    account center runs without it. Returns the aiohttp runner (None when not started)."""
    from aiohttp import web

    from app import metrics
    from app.adapters.db import PostgresProbe, make_engine

    probe = PostgresProbe(make_engine(settings.database_url,
                                      settings.account_center_db_schema, pool_size=1))
    loop = asyncio.get_running_loop()

    def consumer_lag() -> list[tuple[tuple[str, ...], float]]:
        rows: list[tuple[tuple[str, ...], float]] = []
        for tp in sorted(consumer.assignment()):
            end = consumer.highwater(tp)
            done = center.committed.get(tp)
            if end is not None and done is not None:
                rows.append(((tp.topic, str(tp.partition)), float(max(0, end - done))))
        return rows

    metrics.register_collector(metrics.CallbackCollector(
        "bizcenter_consumer_lag", "Records of each assigned partition not yet committed "
        "(log end offset - committed offset)", ["topic", "partition"], consumer_lag,
        ttl=0.0))

    async def metrics_view(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        polled = center.last_poll
        checks = {
            "assigned": bool(consumer.assignment()),
            "consuming": polled is not None and loop.time() - polled < 10.0,
            "postgres": await probe.ok(),
        }
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks},
                                 status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def close_probe(_app: web.Application) -> None:
        await probe.close()

    app.on_cleanup.append(close_probe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.web_bind, settings.account_center_web_port).start()
    except OSError as exc:
        log.error("account center web server not started on %s:%s (%s): no /metrics, "
                  "/healthz or /readyz", settings.web_bind, settings.account_center_web_port,
                  describe(exc))
        await runner.cleanup()
        return None
    log.info("account center web server on http://%s:%s (/metrics, /healthz, /readyz)",
             settings.web_bind, settings.account_center_web_port)
    return runner


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except Exception:
        log.exception("error during account center shutdown")


async def announce_openings(
    settings: Settings, ledger: Ledger, account_ids: Sequence[str],
    producer: AIOKafkaProducer | None = None,
) -> int:
    """Publish the opening balances of ``account_ids`` on ``account.events`` (as credits
    ``open:<accountId>``), so that whoever follows the accounts from their events — the
    worker's balance and history tables — knows them before their first movement. Safe to
    repeat: the event is the same each time and consumers recognise its commandId."""
    own = producer is None
    if producer is None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    acks="all", enable_idempotence=True)
        await producer.start()
    try:
        sent = 0
        for account_id in account_ids:
            event = await ledger.opening_event(account_id)
            if event is not None:
                await producer.send_and_wait(settings.topic("account.events"),
                                             orjson.dumps(event.to_wire()),
                                             key=account_id.encode())
                sent += 1
        return sent
    finally:
        if own:
            await producer.stop()
