"""Consumer groups seen from outside, through the broker: how far behind a group is and who
is in it. For harnesses and tools that watch the system (the integration tests, the
benchmark); the worker and the account center report their own lag from inside
(``bizcenter_consumer_lag``).

Everything is passed in (bootstrap servers, group, topics, partition count): events/ reads
no settings.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


def records_behind(end: int, committed: int | None) -> int:
    """Records of one partition not yet committed: its end offset minus the committed one
    (nothing committed, or no valid offset, counts from 0)."""
    return end - (committed if committed is not None and committed >= 0 else 0)


async def group_lag(bootstrap_servers: str, group: str, topics: Iterable[str],
                    partitions: int) -> int:
    """Records of ``topics`` (each with ``partitions`` partitions) not yet committed by
    consumer group ``group``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            meta = committed.get(tp)
            lag += records_behind(ends[tp], meta.offset if meta is not None else None)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


async def group_state(bootstrap_servers: str, group: str) -> tuple[str, int]:
    """(state, number of members) of consumer group ``group``, e.g. ("Stable", 2);
    ("Unknown", 0) when the broker knows no such group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        groups = response.to_object()["groups"]
    finally:
        await admin.close()
    if not groups:
        return "Unknown", 0
    found = groups[0]
    return str(found.get("state")), len(found.get("members") or [])
