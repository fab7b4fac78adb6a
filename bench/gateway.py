"""The load generator's side of Kafka: what a gateway does, lean enough for thousands of
requests a second.

``reference.gateway_client.GatewayClient`` keeps every message it ever read (and finds OTPs by
scanning them), which is right for tests and demos but quadratic under load. This client
keeps one future per request in flight and forgets it once answered. Like the gateway
client it reads ``business.replies`` without a consumer group from positions fixed before
the first send, so no reply can slip past.

What a transfer costs the generator is kept small (``python -m bench.loadgen_alone``
measures it against a trivial responder, at 1,000 transfers/s and more):

- **produce in batches, without a wait per request**: a request is appended to its
  partition's pending list (the partition the producer's default partitioner would choose
  for its key: murmur2, as the gateway's); one sender task puts everything pending into one
  batch per partition (``send_batch``) as soon as the requests made in the same turn of the
  event loop are in (a batch of replies read wakes many virtual users, whose next requests
  leave together). No future or callback per record in the producer; the producer keeps one
  produce request in flight and lingers ``linger_ms`` as the gateway's. A failed delivery
  fails its requests at once (their futures get the error), so nothing is lost silently.
- **two consumers, fetches sized to amortise**: a fetch round costs the generator ~0.3-0.7 ms
  of CPU whatever it carries (aiokafka, the event loop, the socket; more with more
  partitions), so the number of fetches is what counts. One consumer reads
  ``business.replies`` and ``notifications.otp`` (the latencies depend on them), with the
  worker's adaptive fetch (events/fetching.py): while fewer than 1000 /
  ``FETCH_MAX_WAIT_MS`` records a second come, every fetch is answered as soon as one
  record is there (one fetch per reply, nothing added to the latencies); above, the broker
  answers when ``FETCH_MIN_BYTES`` are there or after ``FETCH_MAX_WAIT_MS``, whichever comes
  first (at most 1000 / ``FETCH_MAX_WAIT_MS`` fetches a second, whatever the rate).
  ``business.transfer-events`` (3 records a transfer, more than half of what the
  generator would read) is needed only by the checks after the load: it is read from its
  beginning once the load has stopped (``read_transfer_events()``), in large fetches
  (``EVENTS_FETCH_*``), and ``events_caught_up()`` says when every record written until
  then has been read.
- **the time a reply arrived is the moment its fetched batch is handed to the generator**
  (one clock reading per batch): what a gateway would see, the fetch wait included, so the
  latencies are never flattered; that wait adds at most ``FETCH_MAX_WAIT_MS`` to a reply
  (less as soon as the rate fills ``FETCH_MIN_BYTES`` sooner). The age of each reply when
  read (now minus its producer's CreateTime) is kept to show how much that is (``stats()``).
  (The record's CreateTime itself would leave out the replier's linger, the broker and the
  fetch: flattering. The clock is the event loop's, as everywhere in the bench: under uvloop
  it counts whole milliseconds.)
- **no task, timer or ``wait_for`` per request**: a future in a dict; one sweeper task fails
  the futures whose deadline passed (a timeout fires up to ``SWEEP_SECONDS`` late).
- replies are looked up by their key (the requestId) before being parsed; orjson, no
  pydantic; request ids from a counter under a random prefix instead of ``uuid4()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from events.fetching import AdaptiveFetch

#: Settings of the gateway's producer (the same as ``reference.gateway_client.GatewayClient``).
PRODUCER_OPTIONS: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 1}

#: The fetches of replies and OTPs under load: answered with at least this much data or
#: after this wait. At 1,000 transfers/s they carry ~0.9 MB/s, so 16 KiB is there in
#: ~18 ms and the wait decides: ~100 fetches/s at most, each carrying what came in 10 ms. The wait
#: bounds what a reply can sit in the broker on the generator's account (the latencies
#: include it).
FETCH_MIN_BYTES = 16 * 1024
FETCH_MAX_WAIT_MS = 10
#: The fetches of business.transfer-events, read after the load for the checks (every saga
#: final), which poll every 0.5 s.
EVENTS_FETCH_MIN_BYTES = 512 * 1024
EVENTS_FETCH_MAX_WAIT_MS = 250
#: How often the deadlines of the requests in flight are checked.
SWEEP_SECONDS = 0.25

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "MANUAL_REVIEW"})


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Clock:
    """``iso_now()`` at most once per millisecond (many requests leave in the same one)."""

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def iso(self) -> str:
        now = time.time()
        ms = int(now * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = datetime.fromtimestamp(now, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
        return self._text


#: A record handler: (record, loop time the batch was read, wall-clock ms then).
Handler = Callable[[Any, float, int], None]


class Reader:
    """One consumer, no group, over every partition of several topics: each from its end
    when started (nothing sent after ``start()`` is missed), or from its beginning."""

    def __init__(self, bootstrap: str, handlers: dict[str, Handler], *,
                 from_beginning: frozenset[str] = frozenset(),
                 adaptive: bool = False, **consumer_options: Any) -> None:
        """``consumer_options``: the fetch settings; ``adaptive``: used only while the
        records read come faster than a fetch every ``fetch_max_wait_ms``, fetches at the
        first byte otherwise (events/fetching.py)."""
        self.bootstrap = bootstrap
        self.handlers = handlers
        self.from_beginning = from_beginning
        self.consumer_options = consumer_options
        self.adaptive = adaptive
        self._fetch: AdaptiveFetch | None = None
        self.records = 0
        self.batches = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                    enable_auto_commit=False, **self.consumer_options)
        await consumer.start()
        if self.adaptive:
            self._fetch = AdaptiveFetch(
                consumer, self.consumer_options["fetch_min_bytes"],
                self.consumer_options["fetch_max_wait_ms"], asyncio.get_running_loop().time)
        tps: list[TopicPartition] = []
        for topic in self.handlers:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                await consumer.stop()
                raise RuntimeError(f"topic {topic} has no partitions (does it exist?)")
            tps += [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        begin = [tp for tp in tps if tp.topic in self.from_beginning]
        end = [tp for tp in tps if tp.topic not in self.from_beginning]
        if begin:
            await consumer.seek_to_beginning(*begin)
        if end:
            await consumer.seek_to_end(*end)
        for tp in tps:  # resolve the positions now: nothing sent after start() is missed
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="reader")

    async def _run(self) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        handlers, fetch = self.handlers, self._fetch
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            if fetch is not None:
                fetch.read(sum(len(records) for records in batches.values()))
            if not batches:
                continue
            read_at, read_ms = loop.time(), int(time.time() * 1000)
            self.batches += 1
            for tp, records in batches.items():
                handler = handlers[tp.topic]
                self.records += len(records)
                for record in records:
                    handler(record, read_at, read_ms)

    async def caught_up(self) -> bool:
        """Whether the positions reached the ends the partitions have now."""
        assert self._consumer is not None, "start() first"
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        for tp in tps:
            if await self._consumer.position(tp) < ends[tp]:
                return False
        return True

    def stats(self) -> dict[str, Any]:
        return {"records": self.records, "batches": self.batches,
                "batchedFetches": self._fetch.batched if self._fetch is not None else True,
                "modeSwitches": self._fetch.switches if self._fetch is not None else 0,
                "recordsPerBatch": round(self.records / self.batches, 2) if self.batches
                else None}

    def check(self) -> None:
        """Raise what stopped the reader, if it stopped."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


class Tail:
    """Reads every partition of one topic from the positions it has when started, one
    callback per record (the echo client's reader; the consumer's default fetch settings)."""

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
        events = topic("business.transfer-events")
        self.reader = Reader(
            bootstrap, {topic("business.replies"): self._on_reply,
                        topic("notifications.otp"): self._on_otp},
            adaptive=True,
            fetch_min_bytes=FETCH_MIN_BYTES, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        self.events_reader = Reader(
            bootstrap, {events: self._on_event}, from_beginning=frozenset({events}),
            fetch_min_bytes=EVENTS_FETCH_MIN_BYTES, fetch_max_wait_ms=EVENTS_FETCH_MAX_WAIT_MS)
        self._producer: AIOKafkaProducer | None = None
        #: requestId → (future of (reply, loop time read), deadline).
        self._waiting: dict[str, tuple[asyncio.Future[tuple[dict[str, Any], float]],
                                       float]] = {}
        self._otp_waiting: dict[str, tuple[asyncio.Future[str], float]] = {}
        self._otps: dict[str, str] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        #: partition → (key, value, requestId) of the requests not yet handed to the producer.
        self._pending: dict[int, list[tuple[bytes, bytes, str]]] = {}
        self._wake = asyncio.Event()
        self._partitions: list[int] = []
        self._clock = _Clock()
        self._id_prefix = str(uuid.uuid4())[:24]  # 8-4-4-4- of a UUID; 12 hex digits follow
        self._next_id = 0
        #: transferId → (seq, state) of its latest business.transfer-events record.
        self.transfer_states: dict[str, tuple[int, str]] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests_sent = 0
        self.replies_matched = 0
        self.other_replies = 0
        self.produce_requests = 0
        #: Milliseconds from each matched reply's CreateTime to the moment it was read.
        self.reply_age_ms: list[int] = []

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **PRODUCER_OPTIONS)
        await self._producer.start()
        self._count_produce_requests(self._producer)
        self._partitions = sorted(await self._producer.partitions_for(self.commands_topic))
        await self.reader.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="gateway deadlines")
        self._sender = asyncio.create_task(self._send_pending(), name="gateway sender")

    async def read_transfer_events(self) -> None:
        """Start reading business.transfer-events from its beginning (after the load)."""
        if self.events_reader._task is None:
            await self.events_reader.start()

    async def events_caught_up(self) -> bool:
        """Whether every transfer event written until now has been read."""
        await self.read_transfer_events()
        return await self.events_reader.caught_up()

    def _count_produce_requests(self, producer: AIOKafkaProducer) -> None:
        """A measurement only (requests per produce request): counts the sender's produce
        requests through aiokafka's internal hook, if this version has it."""
        sender = getattr(producer, "_sender", None)
        send = getattr(sender, "_send_produce_req", None)
        if send is None:
            return

        def counted(node_id: int, batches: Any) -> Any:
            self.produce_requests += 1
            return send(node_id, batches)

        sender._send_produce_req = counted  # type: ignore[union-attr]

    async def stop(self) -> None:
        for task in (self._sweeper, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.reader.stop()
        await self.events_reader.stop()
        if self._producer is not None:
            await self._producer.stop()

    def check(self) -> None:
        if self._sender is not None and self._sender.done() and not self._sender.cancelled():
            self._sender.result()
        self.reader.check()
        self.events_reader.check()

    def stats(self) -> dict[str, Any]:
        """How much the generator batched: records per batch read (at most one fetch's),
        requests per produce request, and how old a reply was when read (its CreateTime to
        the batch's read)."""
        ages = sorted(self.reply_age_ms)

        def q(p: float) -> int | None:
            return ages[min(len(ages) - 1, int(p * len(ages)))] if ages else None

        return {
            "repliesReader": self.reader.stats(), "eventsReader": self.events_reader.stats(),
            "produceRequests": self.produce_requests,
            "requestsPerProduceRequest": round(self.requests_sent / self.produce_requests, 2)
            if self.produce_requests else None,
            "replyAgeAtReadMs": {"p50": q(0.5), "p99": q(0.99), "max": ages[-1] if ages
                                 else None},
        }

    async def _sweep(self) -> None:
        """Fail the requests (and OTP waits) whose deadline passed."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = loop.time()
            for waiting in (self._waiting, self._otp_waiting):
                late = [k for k, (_fut, deadline) in waiting.items() if deadline <= now]
                for k in late:
                    fut = waiting.pop(k)[0]
                    if not fut.done():
                        fut.set_exception(TimeoutError())

    # ---------------------------------------------------------------- records in

    def _on_reply(self, record: Any, read_at: float, read_ms: int) -> None:
        key, value = record.key, record.value
        if not value:
            return
        # The key is the requestId (the worker keys replies so): an answer to nobody waiting
        # is not parsed. A reply keyed otherwise is parsed and found by its requestId.
        rid = key.decode() if key else None
        entry = self._waiting.get(rid) if rid is not None else None
        if entry is None:
            reply = orjson.loads(value)
            rid = reply.get("requestId")
            entry = self._waiting.get(rid)
            if entry is None:
                self.other_replies += 1  # a duplicate, or a reply to a request answered
                return
        else:
            reply = orjson.loads(value)
            if reply.get("requestId") != rid:
                entry = self._waiting.get(reply.get("requestId"))
                if entry is None:
                    self.other_replies += 1
                    return
                rid = reply.get("requestId")
        if reply.get("status") == "pending" and reply.get("code") == "IN_PROGRESS":
            return  # not an answer: wait for the next reply to this request
        self.bytes_received += len(value)
        self.replies_matched += 1
        self.reply_age_ms.append(read_ms - record.timestamp)
        del self._waiting[rid]
        fut = entry[0]
        if not fut.done():
            fut.set_result((reply, read_at))

    def _on_otp(self, record: Any, read_at: float, read_ms: int) -> None:
        if not record.value:
            return
        note = orjson.loads(record.value)
        transfer_id, otp = note.get("transferId"), note.get("otp")
        entry = self._otp_waiting.pop(transfer_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(otp)
        else:
            self._otps[transfer_id] = otp

    def _on_event(self, record: Any, read_at: float, read_ms: int) -> None:
        if not record.value:
            return
        event = orjson.loads(record.value)
        transfer_id, seq = event.get("transferId"), int(event.get("seq", 0))
        known = self.transfer_states.get(transfer_id)
        if known is None or seq >= known[0]:
            self.transfer_states[transfer_id] = (seq, str(event.get("state")))

    # ---------------------------------------------------------------- requests out

    def envelope(self, command_type: str, operator_id: str, access_token: str,
                 payload: dict[str, Any], idempotency_key: str | None = None
                 ) -> dict[str, Any]:
        self._next_id += 1
        env: dict[str, Any] = {
            "type": command_type, "requestId": f"{self._id_prefix}{self._next_id:012x}",
            "operatorId": operator_id, "accessToken": access_token,
            "sentAt": self._clock.iso(), "payload": payload,
        }
        if idempotency_key is not None:
            env["idempotencyKey"] = idempotency_key
        return env

    def partition_for(self, key: bytes) -> int:
        """The partition the producer's default partitioner chooses for ``key``."""
        parts = self._partitions
        return parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]

    async def _send_pending(self) -> None:
        """Hand what is pending to the producer: one batch per partition (more when one is
        full). Runs after the requests made in the same turn of the event loop."""
        producer = self._producer
        assert producer is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            for partition, items in pending.items():
                batch, ids = producer.create_batch(), []
                for key, value, request_id in items:
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        await self._submit(batch, partition, ids)  # full: send, start another
                        batch, ids = producer.create_batch(), []
                        batch.append(key=key, value=value, timestamp=None)
                    ids.append(request_id)
                await self._submit(batch, partition, ids)

    async def _submit(self, batch: Any, partition: int, request_ids: list[str]) -> None:
        assert self._producer is not None
        try:
            delivery = await self._producer.send_batch(batch, self.commands_topic,
                                                       partition=partition)
        except Exception as exc:  # the requests fail with it, the run goes on
            self._fail(request_ids, exc)
            return
        delivery.add_done_callback(functools.partial(self._delivered, request_ids))

    def _delivered(self, request_ids: list[str], delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            self._fail(request_ids, RuntimeError("delivery cancelled"))
        elif delivery.exception() is not None:
            self._fail(request_ids, delivery.exception())  # type: ignore[arg-type]

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            entry = self._waiting.pop(request_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(exc)

    async def request(self, envelope: dict[str, Any], timeout: float, *,
                      partition: int | None = None) -> tuple[dict[str, Any], float, float]:
        """Send and wait for the answer: (reply, sent at, answered at), loop time. Raises
        TimeoutError when no answer comes in ``timeout`` seconds (checked every
        ``SWEEP_SECONDS``), or the producer's error if the request was not delivered."""
        assert self._producer is not None, "start() first"
        loop = asyncio.get_running_loop()
        request_id = envelope["requestId"]
        fut: asyncio.Future[tuple[dict[str, Any], float]] = loop.create_future()
        key = (envelope.get("idempotencyKey") or request_id).encode()
        value = orjson.dumps(envelope)
        if partition is None:
            partition = self.partition_for(key)
        sent_at = loop.time()
        self._waiting[request_id] = (fut, sent_at + timeout)
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = []
        pending.append((key, value, request_id))
        self._wake.set()
        self.bytes_sent += len(value)
        self.requests_sent += 1
        try:
            reply, answered_at = await fut
        finally:
            self._waiting.pop(request_id, None)
        return reply, sent_at, answered_at

    async def otp_for(self, transfer_id: str, timeout: float) -> str:
        known = self._otps.pop(transfer_id, None)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self._otp_waiting[transfer_id] = (fut, loop.time() + timeout)
        try:
            return await fut
        finally:
            self._otp_waiting.pop(transfer_id, None)
