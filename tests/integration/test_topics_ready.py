"""ensure_topics returns only when every partition it created is served by its leader.

On KRaft a new topic's metadata (a leader for each partition) is published before the
broker's replica manager has made those partitions leaders; for a moment the leader
answers NOT_LEADER_OR_FOLLOWER to ListOffsets, Fetch and Produce. Every client the
harness started right after ensure_topics (the gateway client's reply tail, the
worker) met that window and had to retry (aiokafka: "Failed fetch offsets from 1:
[Error 6] NotLeaderForPartitionError ... business.replies").
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.offset import OffsetRequest

from app.settings import Settings
from events.topics import TABLES, TOPIC_SPECS, changelog_topic, ensure_topics

pytestmark = pytest.mark.integration

LATEST = -1


async def test_every_partition_is_served_when_ensure_topics_returns(
        kafka_bootstrap: str) -> None:
    iso = "r" + uuid.uuid4().hex[:10]
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=f"{iso}.",
                        app_id=f"{iso}-worker", topic_partitions=3)
    names = [settings.topic(s.name) for s in TOPIC_SPECS] + [
        changelog_topic(settings, t) for t in TABLES]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert sorted(await ensure_topics(settings)) == sorted(names)
        # Right away, one request, no retry: the leader answers for every partition.
        described = await admin.describe_topics(names)
        by_leader: dict[int, dict[str, list[tuple[int, int]]]] = {}
        for topic in described:
            assert len(topic["partitions"]) == 3, topic
            for p in topic["partitions"]:
                by_leader.setdefault(p["leader"], {}).setdefault(topic["topic"], []).append(
                    (p["partition"], LATEST))
        errors = []
        for leader, topics in by_leader.items():
            response = await admin._client.send(leader, OffsetRequest(-1, 0, list(topics.items())))
            errors += [(topic, part, code) for topic, parts in response.topics
                       for part, code, *_ in parts if code != 0]
        assert errors == [], f"not served yet (error 6 = NOT_LEADER_OR_FOLLOWER): {errors}"
        # And again: idempotent, nothing created.
        assert await ensure_topics(settings) == []
    finally:
        mine = [t for t in await admin.list_topics() if t.startswith(iso)]
        if mine:
            await admin.delete_topics(mine)
        await admin.close()
