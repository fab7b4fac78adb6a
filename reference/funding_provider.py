"""Reference funding provider (``bizcenter funding-provider``): charges linked bank accounts
and cards for top-ups.

In production this is a payment processor behind an adapter; this one is the test double the
tests and demos run against. It consumes ``funding.commands`` and answers on
``funding.events``, idempotently per chargeId (a retried charge is answered the same way and
captured once; a refund is applied once). It can be told to misbehave for given sources:

- ``BIZ_FUNDING_DECLINE_SOURCES``: decline every charge;
- ``BIZ_FUNDING_SILENT_SOURCES``: never answer;
- ``BIZ_FUNDING_LATE_SOURCES``: capture, but answer only ``BIZ_FUNDING_LATE_CAPTURE_SECONDS``
  after the first charge (a capture that arrives after the business center gave up).

Its memory of charges lives in the process: a restart forgets them (a real provider keeps
them; for the test double this is enough, and the business center never relies on it).

Its records follow the poison/outage rule of every consumer (app/record_failures.py): a
command that cannot be decoded is dead-lettered on ``business.dlq`` (coordinates only), an
unreachable broker is waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from app.record_failures import (
    Handler,
    Outbound,
    Poison,
    RecordGuard,
    Refused,
    SourceRecord,
    dead_letter_out,
    decode_json_object,
    validation_reason,
)
from app.settings import Settings
from schemas.wire import FundingCommand

log = logging.getLogger(__name__)


class _Stopped(BaseException):
    """Stop asked while an outage is waited out: the record stays uncommitted (a
    BaseException, so that the guard does not take it for the record's failure)."""


@dataclass
class Charge:
    source: str
    amount_minor: int
    status: str  # pending | captured | declined | refunded


@dataclass
class FundingProvider:
    settings: Settings
    charges: dict[str, Charge] = field(default_factory=dict)
    captured_minor: int = 0
    refunded_minor: int = 0

    def decide(self, cmd: FundingCommand) -> str | None:
        """The status to answer (None: stay silent for now)."""
        s = self.settings
        known = self.charges.get(cmd.charge_id)
        if cmd.type == "refund":
            if known is None or known.status not in ("captured", "refunded"):
                return None  # nothing captured under this id: nothing to give back
            if known.status == "captured":
                known.status = "refunded"
                self.refunded_minor += known.amount_minor
            return "refunded"
        if known is not None:
            return None if known.status == "pending" else (
                "captured" if known.status == "refunded" else known.status)
        if cmd.funding_source_id in s.funding_silent_sources:
            return None
        if cmd.funding_source_id in s.funding_decline_sources:
            self.charges[cmd.charge_id] = Charge(cmd.funding_source_id, cmd.amount_minor,
                                                 "declined")
            return "declined"
        if cmd.funding_source_id in s.funding_late_sources:
            self.charges[cmd.charge_id] = Charge(cmd.funding_source_id, cmd.amount_minor,
                                                 "pending")
            return None
        self.charges[cmd.charge_id] = Charge(cmd.funding_source_id, cmd.amount_minor,
                                             "captured")
        self.captured_minor += cmd.amount_minor
        return "captured"

    def capture_late(self, charge_id: str) -> bool:
        charge = self.charges.get(charge_id)
        if charge is None or charge.status != "pending":
            return False
        charge.status = "captured"
        self.captured_minor += charge.amount_minor
        return True


async def run_funding_provider(settings: Settings, *, stop: asyncio.Event | None = None
                               ) -> None:
    provider = FundingProvider(settings)
    commands = settings.topic("funding.commands")
    events = settings.topic("funding.events")
    consumer = AIOKafkaConsumer(
        commands, bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.funding_provider_group, enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                acks="all", enable_idempotence=True,
                                linger_ms=settings.producer_linger_ms)
    await consumer.start()
    await producer.start()
    late: set[asyncio.Task[None]] = set()

    dlq = settings.topic("business.dlq")

    async def pause(seconds: float) -> None:
        """The guard's back-off, cut short by a stop."""
        if stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        if stop.is_set():
            raise _Stopped

    guard = RecordGuard(dlq_topic=dlq, partitions=settings.topic_partitions, pause=pause)

    def event_of(charge_id: str, status: str, reason: str | None = None) -> Outbound:
        event: dict[str, str] = {"chargeId": charge_id, "status": status}
        if reason is not None:
            event["reason"] = reason
        return Outbound(events, charge_id.encode(), orjson.dumps(event))

    async def send(outs: list[Outbound]) -> None:
        for out in outs:
            await producer.send_and_wait(out.topic, out.value, key=out.key)

    async def answer_later(charge_id: str) -> None:
        await asyncio.sleep(settings.funding_late_capture_seconds)
        if provider.capture_late(charge_id):
            await send([event_of(charge_id, "captured")])

    async def decide(record: SourceRecord) -> list[Outbound]:
        doc = decode_json_object(record.value)
        try:
            cmd = FundingCommand.model_validate(doc)
        except ValidationError as exc:
            raise Refused("invalid funding command: "
                          + validation_reason(exc, name_unknown=True)) from None
        status = provider.decide(cmd)
        if status is not None:
            return [event_of(cmd.charge_id, status,
                             "declined by the issuer" if status == "declined" else None)]
        if (cmd.type == "charge"
                and cmd.funding_source_id in settings.funding_late_sources
                and provider.charges[cmd.charge_id].status == "pending"
                and not any(t.get_name() == cmd.charge_id for t in late)):
            task = asyncio.create_task(answer_later(cmd.charge_id), name=cmd.charge_id)
            late.add(task)
            task.add_done_callback(late.discard)
        return []

    def poison(record: SourceRecord, exc: BaseException) -> list[Outbound]:
        reason = exc.reason if isinstance(exc, Poison) else "internal error"
        return [dead_letter_out(dlq, record, reason)]

    handler = Handler(decide, poison)

    log.info("funding provider consuming %s as group %s", commands,
             settings.funding_provider_group)
    try:
        while stop is None or not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            try:
                for records in batches.values():
                    for record in records:
                        await guard.process(SourceRecord.of(record), handler, send)
            except _Stopped:
                log.info("funding provider stopping during an outage: batch uncommitted")
                break
            if batches:
                await consumer.commit()
    finally:
        for task in late:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await consumer.stop()
        await producer.stop()
        log.info("funding provider stopped (captured %d, refunded %d minor units)",
                 provider.captured_minor, provider.refunded_minor)
