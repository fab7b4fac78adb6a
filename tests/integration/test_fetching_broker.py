"""events/fetching.py on a real aiokafka consumer and the real broker: the setting lands on
the fetcher aiokafka builds its fetch requests from (an aiokafka that renamed those
attributes would leave every fetch batched, silently), and records flow in both settings."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from events.fetching import SPARSE_MAX_WAIT_MS, SPARSE_MIN_BYTES, WINDOW_SECONDS, AdaptiveFetch

pytestmark = pytest.mark.integration

BATCHED = (65536, 10)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _read(consumer: AIOKafkaConsumer, fetch: AdaptiveFetch, want: int) -> int:
    got = 0
    for _ in range(100):  # each getmany waits at most 200 ms: a 20 s deadline in all
        batch = await consumer.getmany(timeout_ms=200)
        n = sum(len(records) for records in batch.values())
        fetch.read(n)
        got += n
        if got >= want:
            break
    return got


async def test_the_setting_reaches_the_real_fetcher_and_records_flow_in_both(
        kafka_bootstrap: str, isolation_id: str) -> None:
    topic = f"{isolation_id}.fetching"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_min_bytes=BATCHED[0], fetch_max_wait_ms=BATCHED[1])
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        clock = Clock()
        fetch = AdaptiveFetch(consumer, *BATCHED, clock)
        fetcher: Any = consumer._fetcher  # what aiokafka builds each FetchRequest from
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (
            SPARSE_MIN_BYTES, SPARSE_MAX_WAIT_MS)

        async def send(n: int) -> None:
            for i in range(n):
                await producer.send(topic, b"r%d" % i)
            await producer.flush()

        await send(300)
        assert await _read(consumer, fetch, 300) == 300  # read at the first byte
        clock.now += WINDOW_SECONDS  # 300 records in a second: batched from now on
        fetch.read(0)
        assert fetch.batched
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == BATCHED
        await send(50)
        assert await _read(consumer, fetch, 50) == 50  # read batched
        clock.now += WINDOW_SECONDS
        fetch.read(0)  # 50 a second: sparse again
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (
            SPARSE_MIN_BYTES, SPARSE_MAX_WAIT_MS)
        assert fetch.switches == 2
    finally:
        await consumer.stop()
        await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
