"""The ceiling: a plain aiokafka request→reply echo on the same broker.

The server is one process with one consumer (a consumer group, like the worker) and one
producer (``acks=all``, idempotent, ``linger_ms=2``, like the worker's and the account
center's): it answers every request record with a reply record of the configured size,
keyed like the request. The client is the benchmark process itself, with the gateway's
producer settings and K concurrent loops of send → await reply, exactly as the virtual
users do. Message sizes are the mean sizes of the requests and replies of the transfer run.

``python -m bench.echo --bootstrap ... --requests T --replies T --group G --reply-size N``
runs the server until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app import collector
from app.event_loop import install_event_loop
from bench.gateway import PRODUCER_OPTIONS, Tail

#: The worker's Faust producer: acks=-1, linger 2 ms (agents/faust_app.py).
SERVER_PRODUCER_OPTIONS: dict[str, Any] = {"acks": "all", "enable_idempotence": True,
                                           "linger_ms": 2}
_ID = struct.Struct(">Q")


async def serve(bootstrap: str, requests: str, replies: str, group: str, reply_size: int,
                stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(requests, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **SERVER_PRODUCER_OPTIONS)
    await producer.start()
    await consumer.start()
    padding = b"x" * max(0, reply_size - _ID.size)

    def delivered(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            print(f"echo: reply not delivered: {fut.exception()!r}", file=sys.stderr)

    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    # Enqueued, not awaited: the producer batches (as Faust's does).
                    reply = (record.value or b"")[:_ID.size] + padding
                    fut = await producer.send(replies, reply, key=record.key)
                    fut.add_done_callback(delivered)
        await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--replies", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--reply-size", type=int, required=True)
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args(argv)
    install_event_loop(args.event_loop)
    collector.settle(collector.DEFAULT_GEN0)  # as the business center's processes do

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.bootstrap, args.requests, args.replies, args.group,
                    args.reply_size, stop)

    asyncio.run(run())
    return 0


@dataclass
class EchoResult:
    round_trips: int = 0
    window: float = 0.0
    latencies: list[float] = field(default_factory=list)
    per_second: list[int] = field(default_factory=list)
    timeouts: int = 0
    #: Cores used while measuring (see bench.machine.CpuMeter.between).
    cpu: dict[str, Any] | None = None

    @property
    def rate(self) -> float:
        return self.round_trips / self.window if self.window else 0.0


class EchoClient:
    """K loops of send → await the reply, keyed by a random id like the gateway's."""

    def __init__(self, bootstrap: str, requests: str, replies: str, request_size: int) -> None:
        self.bootstrap = bootstrap
        self.requests = requests
        self.request_size = request_size
        self.tail = Tail(bootstrap, replies, self._on_reply)
        self._producer: AIOKafkaProducer | None = None
        self._waiting: dict[int, asyncio.Future[float]] = {}
        self._next_id = 0
        self._padding = b"x" * max(0, request_size - _ID.size)

    def _on_reply(self, key: bytes | None, value: bytes | None) -> None:
        if not value or len(value) < _ID.size:
            return
        fut = self._waiting.pop(_ID.unpack_from(value)[0], None)
        if fut is not None and not fut.done():
            fut.set_result(asyncio.get_running_loop().time())

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **PRODUCER_OPTIONS)
        await self._producer.start()
        await self.tail.start()

    async def stop(self) -> None:
        await self.tail.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def round_trip(self, timeout: float) -> float:
        """One request and its reply; returns the latency in seconds."""
        assert self._producer is not None
        loop = asyncio.get_running_loop()
        self._next_id += 1
        request_id = self._next_id
        fut: asyncio.Future[float] = loop.create_future()
        self._waiting[request_id] = fut
        value = _ID.pack(request_id) + self._padding
        sent = loop.time()
        try:
            await self._producer.send_and_wait(self.requests, value,
                                               key=os.urandom(16).hex().encode())
            answered = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(request_id, None)
        return answered - sent

    async def ready(self, timeout: float) -> None:
        """Wait until the server answers (its consumer group has formed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.round_trip(2.0)
                return
            except TimeoutError:
                if loop.time() > deadline:
                    raise

    async def run(self, concurrency: int, warmup: float, duration: float,
                  timeout: float = 30.0) -> EchoResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from, measure_to = start + warmup, start + warmup + duration
        result = EchoResult(window=duration, per_second=[0] * (int(duration) + 1))

        async def user() -> None:
            while loop.time() < measure_to:
                try:
                    latency = await self.round_trip(timeout)
                except TimeoutError:
                    result.timeouts += 1
                    continue
                done = loop.time()
                if measure_from <= done < measure_to:
                    result.round_trips += 1
                    result.latencies.append(latency)
                    result.per_second[int(done - measure_from)] += 1

        await asyncio.gather(*(user() for _ in range(concurrency)))
        return result


def server_command(bootstrap: str, requests: str, replies: str, group: str,
                   reply_size: int, event_loop: str = "uvloop") -> list[str]:
    return [sys.executable, "-m", "bench.echo", "--bootstrap", bootstrap, "--requests",
            requests, "--replies", replies, "--group", group, "--reply-size", str(reply_size),
            "--event-loop", event_loop]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
