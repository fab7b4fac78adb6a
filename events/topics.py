"""The topics of the product, their keys, and their explicit creation.

:data:`TOPIC_SPECS` is the one list of topics: :class:`Topics` (the full names a process
uses, prefix included) is derived from it.

The broker does not auto-create topics: the application creates every topic it uses with
an explicit partition count. ``business.commands`` and ``business.saga-inputs`` must have
the same count (a saga's home partition is the same number in both, and the saga engine's
range assignor gives both to one worker), as must every other topic marked
``copartitioned``; `ensure_topics` refuses to go on when an existing one disagrees.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)


class TopicSettings(Protocol):
    """The fields of ``app.settings.Settings`` the topology reads (events/ imports no app)."""

    @property
    def kafka_bootstrap_servers(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def topic_partitions(self) -> int: ...
    @property
    def topic_replication_factor(self) -> int: ...
    def topic(self, name: str) -> str: ...


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    key: str
    #: Its attribute in :class:`Topics`.
    field: str
    compacted: bool = False
    copartitioned: bool = False  # must have settings.topic_partitions partitions


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("business.commands", "idempotencyKey, else requestId", "commands",
              copartitioned=True),
    TopicSpec("business.saga-inputs", "transferId (explicit partition)", "saga_inputs",
              copartitioned=True),
    TopicSpec("business.replies", "requestId", "replies"),
    TopicSpec("business.transfer-events", "transferId", "transfer_events",
              copartitioned=True),  # produced by the saga engine; read by no worker
    TopicSpec("business.dlq", "the original key", "dlq"),
    TopicSpec("account.commands", "accountId", "account_commands"),
    TopicSpec("account.events", "accountId", "account_events",
              copartitioned=True),  # the saga engine's query_* tables (home_partition)
    TopicSpec("business.queries", "accountId, or transferId (details)", "queries",
              copartitioned=True),
    TopicSpec("notifications.otp", "userId", "otp"),
    TopicSpec("funding.commands", "chargeId", "funding_commands"),
    TopicSpec("funding.events", "chargeId", "funding_events"),
)


@dataclass(frozen=True, slots=True)
class Topics:
    """The full name (prefix included) of every topic of :data:`TOPIC_SPECS`, by its
    ``field``. The fields are spelled out for the type checker; the import-time check
    below keeps them equal to the list."""

    commands: str
    replies: str
    account_commands: str
    account_events: str
    otp: str
    transfer_events: str
    dlq: str
    saga_inputs: str
    funding_commands: str
    funding_events: str
    queries: str

    @classmethod
    def from_settings(cls, settings: TopicSettings) -> Topics:
        return cls(**{spec.field: settings.topic(spec.name) for spec in TOPIC_SPECS})


if {f.name for f in fields(Topics)} != {spec.field for spec in TOPIC_SPECS}:  # pragma: no cover
    raise RuntimeError("events.topics: the fields of Topics differ from TOPIC_SPECS")


#: The worker's Faust tables. Their changelog topics (``<app id>-<table>-changelog``) are
#: created here too, compacted, with the co-partitioned count: Faust would declare them at
#: start, but a table written before its new changelog's metadata is visible makes Faust
#: raise PartitionsMismatch (seen under load), so they exist before the worker starts.
#: None is left: the query tables (balances, history, account_events_seen, then transfers)
#: moved to PostgreSQL (issue 13), so no changelog is created any more, and those left on
#: an existing cluster (``<app id>-transfers-changelog`` and the account tables') are
#: harmless: nothing reads or writes them; delete them at leisure.
TABLES: tuple[str, ...] = ()


#: The longest key whose partition is cached (ids are at most 128 characters; a record's
#: key may be up to its size limit, and the cache must stay small whatever keys come).
CACHED_KEY_BYTES = 512


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of a keyed record (Kafka's default partitioner: murmur2, as aiokafka
    and the Java client): where a producer that names no partition puts ``key``. Cached
    for keys of ids' length: murmur2 is pure Python (:func:`murmur2`, ~6 µs a key), and
    many keys come back (an account's commands and events, a transfer's events); at most
    65,536 keys of at most :data:`CACHED_KEY_BYTES` bytes."""
    if len(key) <= CACHED_KEY_BYTES:
        return _cached_partition(key, partitions)
    return _partition(key, partitions)


def _partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
#: ``struct`` readers of n little-endian 32-bit words, by n (keys of ids come in few sizes).
_WORDS: dict[int, Callable[[bytes], tuple[int, ...]]] = {}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``, seed 0x9747b28c),
    as an unsigned 32-bit int: the same values as aiokafka's ``murmur2``, twice as fast
    (its 4-byte words read by one ``struct`` call instead of byte by byte; ~6 against
    ~13 µs for a key of a transfer id's length, most of which are seen once)."""
    length = len(data)
    h = 0x9747B28C ^ length
    n = length >> 2
    if n:
        words = _WORDS.get(n)
        if words is None:
            words = struct.Struct(f"<{n}I").unpack_from
            if len(_WORDS) < 1024:
                _WORDS[n] = words
        for k in words(data):
            k = (k * _M) & _MASK
            k = ((k ^ (k >> 24)) * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        if extra == 3:
            h ^= data[-1] << 16 ^ data[-2] << 8 ^ data[-3]
        elif extra == 2:
            h ^= data[-1] << 8 ^ data[-2]
        else:
            h ^= data[-1]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


_cached_partition = functools.lru_cache(maxsize=1 << 16)(_partition)


def cached_partitioner(key: bytes | None, all_partitions: list[int],
                       available: list[int]) -> int:
    """aiokafka's ``DefaultPartitioner`` (murmur2 of the key, else a random available
    partition) with :func:`partition_of`'s cache: the producers' ``partitioner``."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[partition_of(key, len(all_partitions))]


def changelog_topic(settings: TopicSettings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"


class TopicMismatch(RuntimeError):
    pass


async def ensure_topics(settings: TopicSettings) -> list[str]:
    """Create the missing topics; return the names created. Idempotent."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = {settings.topic(s.name): s for s in TOPIC_SPECS}
        for table in TABLES:
            wanted[changelog_topic(settings, table)] = TopicSpec(
                changelog_topic(settings, table), "the table's key", f"{table}_changelog",
                compacted=True, copartitioned=True)
        missing = [
            NewTopic(name, settings.topic_partitions, settings.topic_replication_factor,
                     topic_configs={"cleanup.policy": "compact"} if spec.compacted else {})
            for name, spec in wanted.items() if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # a new topic's partitions show up in the metadata a moment later
            described = await admin.describe_topics(list(wanted))
            if all(t.get("partitions") for t in described) or loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        for topic in described:
            if not topic.get("partitions"):
                raise TopicMismatch(f"topic {topic['topic']} has no partitions in the "
                                    f"metadata 30 s after its creation")
            if not wanted[topic["topic"]].copartitioned:
                continue
            count = len(topic.get("partitions", []))
            if count != settings.topic_partitions:
                raise TopicMismatch(
                    f"topic {topic['topic']} has {count} partitions but "
                    f"BIZ_TOPIC_PARTITIONS is {settings.topic_partitions}: they must match"
                )
        await _wait_until_served([
            TopicPartition(t["topic"], p["partition"])
            for t in described for p in t.get("partitions", [])
        ], settings.kafka_bootstrap_servers)
        created = [t.name for t in missing]
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        await admin.close()


async def _wait_until_served(partitions: list[TopicPartition], bootstrap_servers: str) -> None:
    """Return once the leader of every partition answers for it (a ListOffsets); raise
    ``KafkaTimeoutError`` after 30 s.

    The metadata is not enough. On KRaft the broker publishes a new topic's metadata
    (a leader for every partition) *before* its replica manager has made those
    partitions leaders: for a moment a describe shows the leader while the leader
    answers NOT_LEADER_OR_FOLLOWER to ListOffsets, Fetch and Produce. Every client
    started then has to retry (aiokafka logs "Failed fetch offsets ...
    NotLeaderForPartitionError" and backs off), which a caller of ensure_topics should
    never have to care about. ``end_offsets`` retries the retriable errors until its
    request timeout: when it returns, every leader has answered for every partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                                enable_auto_commit=False, request_timeout_ms=30000)
    await consumer.start()
    try:
        await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
