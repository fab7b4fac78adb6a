"""Records handed to the producer one partition's batch at a time (issue 13).

``AIOKafkaProducer.send`` costs ~14-19 µs of CPU per record on this machine (a coroutine,
the metadata check, the partitioner, a future per record, the accumulator's bookkeeping);
a ``BatchBuilder`` filled by :func:`send_batched` and handed over with ``send_batch``
costs ~5 µs per record (records of 400 bytes, 300 at a time, idempotent producer:
docs/performance.md, session 23). The saga engine hands over a cycle's outputs this way,
several hundred at once.

What stays as ``send`` gives it: the records of one topic-partition keep their order
(one batch after the other, in the order given); each record gets a future that is done
when its batch is acknowledged (the same future for every record of a batch: a batch
fails or succeeds whole, and its records with it); a record too large to be sent at all
gets a future failed with ``MessageSizeTooLargeError`` of its own, before anything is
sent, and does not fail its neighbours; a failure to hand a batch over (the producer
closed, its buffer full past the request timeout) fails that batch's records' futures
and none other, and a topic whose partitions cannot be learnt (the broker away, no such
topic) fails the futures of its records that name no partition. Nothing raises: every
failure is a failed future, for the caller to wait out (an outage) or dead-letter. The
partition of a record that names none is the producer's default partitioner's (murmur2 of
the key, ``events.topics.partition_of``). At DEBUG each record is logged before it is
handed over, as ``send`` does (the redaction filter masks its secrets, app/log_redaction.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

from aiokafka.errors import MessageSizeTooLargeError, UnknownTopicOrPartitionError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from events.topics import partition_of

log = logging.getLogger(__name__)

#: aiokafka's default ``max_request_size``: no record larger than this is ever sent.
MAX_REQUEST_BYTES = 1_048_576


class Record(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None


async def send_batched(producer: Any, records: Sequence[Record], *,
                       max_request_bytes: int = MAX_REQUEST_BYTES) -> list[asyncio.Future[Any]]:
    """Hand ``records`` to ``producer`` (an ``AIOKafkaProducer``) in one batch per
    topic-partition (more when one fills up), without waiting for acknowledgements; one
    future per record, in the order given (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    if log.isEnabledFor(logging.DEBUG):  # as ``send`` logs each record (redacted on output)
        for record in records:
            log.debug("Sending (key=%s value=%s) to %s[%s]", record.key, record.value,
                      record.topic, record.partition)
    futures: list[asyncio.Future[Any] | None] = [None] * len(records)
    partitions: dict[str, list[int] | BaseException] = {}
    groups: dict[tuple[str, int], list[int]] = {}
    for i, record in enumerate(records):
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, [])
        if size > max_request_bytes:
            futures[i] = _failed(loop, MessageSizeTooLargeError(
                f"The message is {size} bytes when serialized which is larger than the "
                "maximum request size"))
            continue
        partition = record.partition
        if partition is None:
            known = partitions.get(record.topic)
            if known is None:
                # The topic's metadata (a wait only the first time): a broker away or an
                # unknown topic fails the topic's records' futures, as ``send`` raises.
                try:
                    known = sorted(await producer.partitions_for(record.topic)) or \
                        UnknownTopicOrPartitionError(record.topic)
                except Exception as exc:
                    known = exc
                partitions[record.topic] = known
            if isinstance(known, BaseException):
                futures[i] = _failed(loop, known)
                continue
            partition = (known[partition_of(record.key, len(known))] if record.key is not None
                         else random.choice(known))
        groups.setdefault((record.topic, partition), []).append(i)
    for (topic, partition), indexes in groups.items():
        batch = producer.create_batch()
        members: list[int] = []
        for i in indexes:
            record = records[i]
            if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                await _hand_over(producer, batch, topic, partition, members, futures, loop)
                batch, members = producer.create_batch(), []
                # Never refused by an empty batch: a batch takes its first record whatever
                # its size (the size was checked above).
                batch.append(key=record.key, value=record.value, timestamp=None)
            members.append(i)
        await _hand_over(producer, batch, topic, partition, members, futures, loop)
    return [f if f is not None else _failed(loop, RuntimeError("record not handed over"))
            for f in futures]


async def _hand_over(producer: Any, batch: Any, topic: str, partition: int,
                     members: list[int], futures: list[asyncio.Future[Any] | None],
                     loop: asyncio.AbstractEventLoop) -> None:
    if not members:
        return
    batch.close()  # nothing else may join it (a later ``send`` starts a batch of its own)
    try:
        future: asyncio.Future[Any] = await producer.send_batch(batch, topic,
                                                                partition=partition)
    except Exception as exc:
        future = _failed(loop, exc)
    for i in members:
        futures[i] = future


def _failed(loop: asyncio.AbstractEventLoop, exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = loop.create_future()
    future.set_exception(exc)
    return future
