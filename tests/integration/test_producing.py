"""events/producing.py on the real broker: records handed over one batch per
topic-partition arrive where ``send`` would put them, in order per partition, each with a
future of its own batch; a record too large fails alone; a closed producer fails every
future and raises nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError, ProducerClosed

from events.producing import Record, send_batched
from events.topics import partition_of

pytestmark = pytest.mark.integration

PARTITIONS = 3


@pytest.fixture
async def topics(kafka_bootstrap: str, isolation_id: str,
                 request: pytest.FixtureRequest) -> AsyncIterator[list[str]]:
    names = [f"{isolation_id}.producing.{request.node.name[-20:]}.{n}" for n in ("a", "b")]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=PARTITIONS,
                                            replication_factor=1) for n in names])
        yield names
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def _read_all(kafka_bootstrap: str, topics: list[str], want: int
                    ) -> dict[tuple[str, int], list[tuple[bytes | None, bytes]]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    got: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
    try:
        consumer.assign([TopicPartition(t, p) for t in topics for p in range(PARTITIONS)])
        deadline = asyncio.get_running_loop().time() + 30
        n = 0
        while n < want and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                got.setdefault((tp.topic, tp.partition), []).extend(
                    (r.key, r.value) for r in records)
                n += len(records)
    finally:
        await consumer.stop()
    return got


async def test_records_arrive_where_send_puts_them_in_order_per_partition(
        kafka_bootstrap: str, topics: list[str]) -> None:
    # A small batch size: the 300 records need several batches per partition.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True, max_batch_size=2048)
    await producer.start()
    try:
        records = [Record(topics[i % 2], f"key-{i % 17}".encode(),
                          f"value-{i}".encode().ljust(100, b"."),
                          (i % PARTITIONS) if i % 5 == 0 else None) for i in range(300)]
        futures = await send_batched(producer, records)
        assert len(futures) == len(records)
        metadata = await asyncio.gather(*futures)
        assert len({id(f) for f in futures}) > 2 * PARTITIONS  # several batches each
    finally:
        await producer.stop()
    expected: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
    for record, meta in zip(records, metadata, strict=True):
        assert record.key is not None
        partition = (record.partition if record.partition is not None
                     else partition_of(record.key, PARTITIONS))
        assert (meta.topic, meta.partition) == (record.topic, partition)
        expected.setdefault((record.topic, partition), []).append((record.key, record.value))
    assert await _read_all(kafka_bootstrap, topics, len(records)) == expected


async def test_a_record_too_large_fails_alone(kafka_bootstrap: str, topics: list[str]
                                              ) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        records = [Record(topics[0], b"k", b"before", 0),
                   Record(topics[0], b"k", b"x" * 4096, 0),
                   Record(topics[0], b"k", b"after", 0)]
        futures = await send_batched(producer, records, max_request_bytes=1024)
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await producer.stop()
    assert isinstance(results[1], MessageSizeTooLargeError)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    got = await _read_all(kafka_bootstrap, topics[:1], 2)
    assert got == {(topics[0], 0): [(b"k", b"before"), (b"k", b"after")]}


async def test_a_closed_producer_fails_every_future_and_raises_nothing(
        kafka_bootstrap: str, topics: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True)
    await producer.start()
    await producer.partitions_for(topics[0])  # metadata known: the batches reach the check
    await producer.stop()
    futures = await send_batched(producer, [Record(topics[0], b"k", b"v", p)
                                            for p in range(PARTITIONS)])
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert len(results) == PARTITIONS
    assert all(isinstance(r, ProducerClosed) for r in results)


async def test_a_topic_without_partitions_fails_its_futures_and_raises_nothing(
        kafka_bootstrap: str, topics: list[str], isolation_id: str) -> None:
    """No such topic (the broker creates none here): its records that name no partition
    fail with the metadata error, the others are delivered, and nothing raises."""
    from aiokafka.errors import UnknownTopicOrPartitionError

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all",
                                enable_idempotence=True, request_timeout_ms=1500)
    await producer.start()
    try:
        futures = await send_batched(producer, [
            Record(f"{isolation_id}.producing.no-such-topic", b"k", b"lost"),
            Record(topics[0], b"k", b"kept", 0)])
        results = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await producer.stop()
    assert isinstance(results[0], UnknownTopicOrPartitionError)
    assert not isinstance(results[1], BaseException)
    assert await _read_all(kafka_bootstrap, topics[:1], 1) == {(topics[0], 0): [(b"k", b"kept")]}
