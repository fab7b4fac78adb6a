"""The load generator's side of Kafka: what a gateway does, lean enough for thousands of
requests a second.

``reference.gateway_client.GatewayClient`` keeps every message it ever read (and finds OTPs by
scanning them), which is right for tests and demos but quadratic under load. This client
keeps one future per request in flight and forgets it once answered. Like the gateway
client it reads ``business.replies`` without a consumer group from positions fixed before
the first send, so no reply can slip past.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

#: Settings of the gateway's producer (the same as ``reference.gateway_client.GatewayClient``).
PRODUCER_OPTIONS: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 1}

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "MANUAL_REVIEW"})


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Tail:
    """Reads every partition of one topic from the positions it has when started."""

    def __init__(self, bootstrap: str, topic: str,
                 on_record: Callable[[bytes | None, bytes | None], None]) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.on_record = on_record
        self.records = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, from_beginning: bool = False) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False)
        await consumer.start()
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            await consumer.stop()
            raise RuntimeError(f"topic {self.topic} has no partitions (does it exist?)")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now: nothing sent after start() is missed
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name=f"tail {self.topic}")

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    self.records += 1
                    self.on_record(record.key, record.value)

    def check(self) -> None:
        """Raise what stopped the tail, if it stopped."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


class BenchGateway:
    """Sends commands to ``business.commands`` and resolves each request's reply; collects
    OTPs from ``notifications.otp`` and the last state of every transfer from
    ``business.transfer-events``."""

    def __init__(self, bootstrap: str, topic: Callable[[str], str]) -> None:
        self.bootstrap = bootstrap
        self.commands_topic = topic("business.commands")
        self.replies = Tail(bootstrap, topic("business.replies"), self._on_reply)
        self.otps = Tail(bootstrap, topic("notifications.otp"), self._on_otp)
        self.events = Tail(bootstrap, topic("business.transfer-events"), self._on_event)
        self._producer: AIOKafkaProducer | None = None
        self._waiting: dict[str, asyncio.Future[tuple[dict[str, Any], float]]] = {}
        self._otp_waiting: dict[str, asyncio.Future[str]] = {}
        self._otps: dict[str, str] = {}
        #: transferId → (seq, state) of its latest business.transfer-events record.
        self.transfer_states: dict[str, tuple[int, str]] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests_sent = 0
        self.replies_matched = 0
        self.other_replies = 0

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **PRODUCER_OPTIONS)
        await self._producer.start()
        await self.replies.start()
        await self.otps.start()
        await self.events.start(from_beginning=True)

    async def stop(self) -> None:
        for tail in (self.replies, self.otps, self.events):
            await tail.stop()
        if self._producer is not None:
            await self._producer.stop()

    def check(self) -> None:
        for tail in (self.replies, self.otps, self.events):
            tail.check()

    # ---------------------------------------------------------------- records in

    def _on_reply(self, key: bytes | None, value: bytes | None) -> None:
        if not value:
            return
        reply = orjson.loads(value)
        fut = self._waiting.get(reply.get("requestId"))
        if fut is None:
            self.other_replies += 1  # a duplicate, or a reply to a request already answered
            return
        if reply.get("status") == "pending" and reply.get("code") == "IN_PROGRESS":
            return  # not an answer: wait for the next reply to this request
        self.bytes_received += len(value)
        self.replies_matched += 1
        del self._waiting[reply["requestId"]]
        if not fut.done():
            fut.set_result((reply, asyncio.get_running_loop().time()))

    def _on_otp(self, key: bytes | None, value: bytes | None) -> None:
        if not value:
            return
        note = orjson.loads(value)
        transfer_id, otp = note.get("transferId"), note.get("otp")
        fut = self._otp_waiting.pop(transfer_id, None)
        if fut is not None and not fut.done():
            fut.set_result(otp)
        else:
            self._otps[transfer_id] = otp

    def _on_event(self, key: bytes | None, value: bytes | None) -> None:
        if not value:
            return
        event = orjson.loads(value)
        transfer_id, seq = event.get("transferId"), int(event.get("seq", 0))
        known = self.transfer_states.get(transfer_id)
        if known is None or seq >= known[0]:
            self.transfer_states[transfer_id] = (seq, str(event.get("state")))

    # ---------------------------------------------------------------- requests out

    @staticmethod
    def envelope(command_type: str, operator_id: str, access_token: str,
                 payload: dict[str, Any], idempotency_key: str | None = None
                 ) -> dict[str, Any]:
        env: dict[str, Any] = {
            "type": command_type, "requestId": str(uuid.uuid4()), "operatorId": operator_id,
            "accessToken": access_token, "sentAt": iso_now(), "payload": payload,
        }
        if idempotency_key is not None:
            env["idempotencyKey"] = idempotency_key
        return env

    async def request(self, envelope: dict[str, Any], timeout: float, *,
                      partition: int | None = None) -> tuple[dict[str, Any], float, float]:
        """Send and wait for the answer: (reply, sent at, answered at), loop time. Raises
        TimeoutError when no answer comes in ``timeout`` seconds."""
        assert self._producer is not None, "start() first"
        loop = asyncio.get_running_loop()
        request_id = envelope["requestId"]
        fut: asyncio.Future[tuple[dict[str, Any], float]] = loop.create_future()
        self._waiting[request_id] = fut
        key = (envelope.get("idempotencyKey") or request_id).encode()
        value = orjson.dumps(envelope)
        sent_at = loop.time()
        try:
            await self._producer.send_and_wait(self.commands_topic, value, key=key,
                                               partition=partition)
            self.bytes_sent += len(value)
            self.requests_sent += 1
            reply, answered_at = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(request_id, None)
        return reply, sent_at, answered_at

    async def otp_for(self, transfer_id: str, timeout: float) -> str:
        known = self._otps.pop(transfer_id, None)
        if known is not None:
            return known
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._otp_waiting[transfer_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._otp_waiting.pop(transfer_id, None)
