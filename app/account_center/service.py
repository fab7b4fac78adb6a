"""The reference account center process: account.commands in, account.events out.

At-least-once with exactly-once effects: for each batch the ledger commits first, then the
events are produced (acks=all, idempotent producer) and only then are the offsets committed.
A crash anywhere before the offset commit means redelivery; the ledger then returns the
stored events, which are produced again unchanged (consumers deduplicate on commandId).

Records that cannot be decoded go to business.dlq (never a crash, never a silent skip).
Database errors are retried with back-off and nothing is committed meanwhile; a command
whose data the database refuses outright (SQLSTATE class 22/23, after isolating it from its
batch) is dead-lettered so that it cannot stall its partition.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from app.account_center.ledger import Ledger, sqlstate
from app.settings import Settings
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


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def dead_letter(record: Any, reason: str, now: datetime | None = None) -> DeadLetter:
    return DeadLetter(
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key_b64=_b64(record.key),
        value_b64=_b64(record.value),
        reason=reason[:1000],
        failed_at=now or datetime.now(UTC),
    )


def decode_command(value: bytes | None) -> AccountCommand:
    """Raise ValueError (with a reason) when the record is not a valid AccountCommand."""
    if value is None:
        raise ValueError("empty record value")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from exc
    try:
        return AccountCommand.model_validate(data)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ValueError(f"invalid AccountCommand: {errors}") from exc


def _is_data_error(exc: BaseException) -> bool:
    """Errors caused by the command's data (retrying it can never succeed)."""
    state = sqlstate(exc)
    return state is not None and state[:2] in ("22", "23")


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

    async def run(self) -> None:
        while not self._stop.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS
            )
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
                    items.append(_Item(record, decode_command(record.value)))
                except ValueError as exc:
                    dead += 1
                    log.warning("dead-lettering %s[%d]@%d: %s", record.topic,
                                record.partition, record.offset, exc)
                    out.append(self._dlq_out(dead_letter(record, str(exc))))

        results = await self._decide(items)
        rejected = 0
        for result in results:
            if isinstance(result, AccountEvent):
                rejected += result.type is AccountEventType.REJECTED
                out.append(
                    _Out(self._events_topic, result.account_id.encode(),
                         orjson.dumps(result.to_wire()))
                )
            else:
                dead += 1
                out.append(self._dlq_out(result))

        await self._produce(out)
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        try:
            await self._consumer.commit(offsets)
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
                        log.warning("batch refused by the database (%s): isolating commands",
                                    sqlstate(exc))
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
                        log.error("command %s refused by the database (%s): dead-lettered",
                                  item.command.command_id, sqlstate(exc))
                        return dead_letter(
                            item.record,
                            f"ledger refused the command: sqlstate {sqlstate(exc)} "
                            f"({type(exc).__name__})",
                        )
                else:
                    log.error("ledger unavailable (%s: %s), command retried in %.1fs",
                              type(exc).__name__, exc, backoff,
                              exc_info=backoff == BACKOFF_INITIAL)
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _produce(self, out: Sequence[_Out]) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            try:
                futures = [
                    await self._producer.send(o.topic, value=o.value, key=o.key) for o in out
                ]
                await asyncio.gather(*futures)
                return
            except KafkaError as exc:
                # Re-sending may duplicate some events: consumers deduplicate on commandId.
                log.warning("produce failed (%s), %d messages re-sent in %.1fs",
                            exc, len(out), backoff)
                await self._backoff(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

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
    try:
        if not await _migrate(ledger, stop):
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id="account-center",
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.producer_linger_ms,
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
        await AccountCenter(settings, ledger, consumer, producer, stop).run()
    finally:
        if consumer is not None:
            await _quietly(consumer.stop())
        if producer is not None:
            await _quietly(producer.stop())
        await _quietly(ledger.close())
        log.info("account center stopped")


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
