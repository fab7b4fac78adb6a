"""Consumer groups seen from outside, through the broker: how far behind a group is and who
is in it. For harnesses and tools that watch the system (the integration tests, the
benchmark); the worker and the account center report their own lag from inside
(``bizcenter_consumer_lag``).

Everything is passed in (bootstrap servers, group, topics, partition count): events/ reads
no settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


def records_behind(end: int, committed: int | None) -> int:
    """Records of one partition not yet committed: its end offset minus the committed one
    (nothing committed, or no valid offset, counts from 0)."""
    return end - (committed if committed is not None and committed >= 0 else 0)


@dataclass(frozen=True)
class GroupProgress:
    """Where a group stands on some partitions: their end offsets, read *first*, and the
    group's committed offsets, read after them. In that order every record counted as
    behind was already on the broker when the committed offsets were read; read the other
    way round, a record written between the two reads (a worker's tick, once a second on
    every ``business.saga-inputs`` partition) counts as behind although it was not even
    written when the commits were looked at (aiokafka's ``end_offsets`` from a fresh
    consumer takes ~0.3 s: a metadata round trip first)."""

    ends: dict[TopicPartition, int]
    committed: dict[TopicPartition, int | None]

    def behind(self, written: Mapping[TopicPartition, int] | None = None) -> int:
        """Records not committed among those below ``written`` (by default the end offsets
        read before the committed offsets): pass an earlier reading's ``ends`` to ask
        whether everything written by then has been committed since."""
        marks = self.ends if written is None else written
        return sum(max(0, records_behind(end, self.committed.get(tp)))
                   for tp, end in marks.items())


async def group_progress(bootstrap_servers: str, group: str, topics: Iterable[str],
                         partitions: int) -> GroupProgress:
    """End offsets of ``topics`` (each with ``partitions`` partitions), then the offsets
    consumer group ``group`` has committed on them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        ends = await consumer.end_offsets(tps)  # first: see GroupProgress
        offsets = await admin.list_consumer_group_offsets(group)
        committed: dict[TopicPartition, int | None] = {}
        for tp in tps:
            meta = offsets.get(tp)
            committed[tp] = meta.offset if meta is not None else None
        return GroupProgress({tp: ends[tp] for tp in tps}, committed)
    finally:
        await consumer.stop()
        await admin.close()


async def group_lag(bootstrap_servers: str, group: str, topics: Iterable[str],
                    partitions: int) -> int:
    """Records of ``topics`` (each with ``partitions`` partitions) not yet committed by
    consumer group ``group`` (of those already written when its commits were read)."""
    progress = await group_progress(bootstrap_servers, group, topics, partitions)
    return progress.behind()


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
