"""A small gateway client: publish a command on business.commands and await its reply.

Used by the tests, the benchmark and ``bizcenter transfer``. It reads business.replies
without a consumer group from the end of every partition (positions are fixed before the
first send, so no reply can slip past) and routes each reply to its requestId.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import Settings


class TopicTail:
    """Collects every message of a topic from now on (or from the beginning)."""

    def __init__(self, settings: Settings, topic: str, *, from_beginning: bool = False) -> None:
        self.settings = settings
        self.topic = topic
        self.from_beginning = from_beginning
        self.messages: list[tuple[bytes | None, dict[str, Any]]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, group_id=None,
            enable_auto_commit=False,
        )
        await consumer.start()
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if self.from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now: nothing sent after start() is missed
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    try:
                        value = orjson.loads(record.value or b"null")
                    except orjson.JSONDecodeError:
                        value = {"_raw": (record.value or b"").decode("latin-1")}
                    self.messages.append((record.key, value))
                    self.on_message(record.key, value)
            if batches:
                self._changed.set()
                self._changed = asyncio.Event()

    def on_message(self, key: bytes | None, value: Any) -> None:
        """Hook for subclasses."""

    async def wait(self, predicate: Any, timeout: float = 30.0) -> Any:
        """Wait until ``predicate(messages)`` is truthy; return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate(self.messages)
            if result:
                return result
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"condition on {self.topic} not met in {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


class GatewayClient(TopicTail):
    """Publishes commands as the upstream gateway does and awaits replies by requestId."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.topic("business.replies"))
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = defaultdict(list)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await super().start()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all",
            enable_idempotence=True, linger_ms=1,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await super().stop()

    def on_message(self, key: bytes | None, value: Any) -> None:
        request_id = value.get("requestId") if isinstance(value, dict) else None
        if not isinstance(request_id, str):
            return
        self.replies[request_id].append(value)
        for fut in self._waiters.pop(request_id, []):
            if not fut.done():
                fut.set_result(value)

    @staticmethod
    def envelope(
        command_type: str, operator_id: str, access_token: str, payload: dict[str, Any], *,
        idempotency_key: str | None = None, request_id: str | None = None,
    ) -> dict[str, Any]:
        env: dict[str, Any] = {
            "type": command_type, "requestId": request_id or str(uuid.uuid4()),
            "operatorId": operator_id, "accessToken": access_token,
            "sentAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "payload": payload,
        }
        if idempotency_key is not None:
            env["idempotencyKey"] = idempotency_key
        return env

    @classmethod
    def top_up_envelope(
        cls, operator_id: str, access_token: str, *, funding_source_id: str,
        amount_minor: int, currency: str, pin: str, idempotency_key: str,
    ) -> dict[str, Any]:
        """A ``topUp``: confirmed with the user's PIN like a transfer (contract v2)."""
        return cls.envelope("topUp", operator_id, access_token, {
            "fundingSourceId": funding_source_id, "amountMinor": amount_minor,
            "currency": currency, "pin": pin}, idempotency_key=idempotency_key)

    async def send(self, envelope: dict[str, Any] | bytes, *, key: bytes | None = None) -> None:
        assert self._producer is not None, "start() first"
        if isinstance(envelope, dict):
            if key is None:
                key = (envelope.get("idempotencyKey") or envelope["requestId"]).encode()
            envelope = orjson.dumps(envelope)
        await self._producer.send_and_wait(self.settings.topic("business.commands"), envelope,
                                           key=key)

    async def request(self, envelope: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send and return the first reply to this requestId."""
        request_id = envelope["requestId"]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.replies.get(request_id):
            return self.replies[request_id][0]
        self._waiters[request_id].append(fut)
        await self.send(envelope)
        return await asyncio.wait_for(fut, timeout)

    async def next_reply(self, request_id: str, after: int = 0, timeout: float = 30.0
                         ) -> dict[str, Any]:
        """The reply number ``after`` (0-based) to ``request_id``, waiting for it."""
        return await self.wait(  # type: ignore[no-any-return]
            lambda _: len(self.replies.get(request_id, [])) > after
            and self.replies[request_id][after], timeout)
