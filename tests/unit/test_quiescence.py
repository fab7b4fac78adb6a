"""The benchmark's quiescence check (bench/money_check.py ``wait_quiet``) and the group lag
it reads (events/consumer_groups.py), without a broker: an idle worker group that writes
and commits a tick per partition every second is quiet; a record never committed is not."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

import bench.money_check as money_check
import events.consumer_groups as consumer_groups
from events.consumer_groups import GroupProgress


class _Broker:
    """One partition whose owner writes a tick right after each read anyone makes (the
    worst case of a read landing just before a tick), committed only later."""

    def __init__(self) -> None:
        self.end = 10
        self.committed = 10
        self.reads: list[str] = []

    def read(self, what: str) -> int:
        self.reads.append(what)
        value = self.end if what == "ends" else self.committed
        self.end += 1  # a tick lands on the broker, not yet committed
        return value


def _fake_clients(monkeypatch: Any, broker: _Broker) -> None:
    class Admin:
        def __init__(self, **_: Any) -> None: ...
        async def start(self) -> None: ...
        async def close(self) -> None: ...

        async def list_consumer_group_offsets(self, group: str) -> dict[Any, Any]:
            return {TopicPartition("t", 0): SimpleNamespace(offset=broker.read("committed"))}

    class Consumer:
        def __init__(self, **_: Any) -> None: ...
        async def start(self) -> None: ...
        async def stop(self) -> None: ...

        async def end_offsets(self, tps: list[Any]) -> dict[Any, int]:
            return {tp: broker.read("ends") for tp in tps}

    monkeypatch.setattr(consumer_groups, "AIOKafkaAdminClient", Admin)
    monkeypatch.setattr(consumer_groups, "AIOKafkaConsumer", Consumer)


async def test_a_record_written_after_the_commits_were_read_is_not_behind(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = _Broker()
    _fake_clients(monkeypatch, broker)
    # Everything on the broker was committed when the commits were read.
    assert await consumer_groups.group_lag("b:1", "g", ["t"], 1) == 0
    assert broker.reads == ["ends", "committed"]


def test_behind_an_earlier_reading() -> None:
    tp = TopicPartition("t", 0)
    now = GroupProgress({tp: 12}, {tp: 11})
    assert now.behind() == 1
    assert now.behind({tp: 11}) == 0
    assert now.behind({tp: 9}) == 0  # committed past it: not negative
    assert GroupProgress({tp: 5}, {tp: None}).behind() == 5


def _quiet_fixtures() -> tuple[Any, Any, Any]:
    settings = SimpleNamespace(topic=lambda name: name, kafka_bootstrap_servers="b:1",
                               topic_partitions=6, app_id="w", account_center_group="ac")

    async def clearing_balance(_currency: str) -> int:
        return 0

    async def events_caught_up() -> bool:
        return True

    ledger = SimpleNamespace(clearing_balance=clearing_balance)
    gateway = SimpleNamespace(events_caught_up=events_caught_up, transfer_states={})
    return settings, ledger, gateway


def _progress(topics: list[str], partitions: int, ends: int, committed: int,
              stuck: TopicPartition | None = None) -> GroupProgress:
    tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
    return GroupProgress({tp: ends for tp in tps},
                         {tp: (3 if tp == stuck else committed) for tp in tps})


async def test_ticks_written_and_committed_every_second_are_quiet(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What the benchmark saw for 90 s: at every look one tick per saga-inputs partition not
    committed yet (lag 6), the committed offsets a tick further at every look."""
    looks = {"w-sagas": 0, "w": 0, "ac": 0}

    async def heartbeat(_b: str, group: str, topics: list[str], partitions: int) -> GroupProgress:
        looks[group] += 1
        if group != "w-sagas":  # the saga engine's group reads business.saga-inputs
            return _progress(topics, partitions, 50, 50)
        n = looks[group]
        progress = _progress(topics, partitions, 400, 400)
        for p in range(partitions):
            tp = TopicPartition("business.saga-inputs", p)
            progress.ends[tp], progress.committed[tp] = 100 + n, 99 + n
        return progress

    monkeypatch.setattr(money_check, "group_progress", heartbeat)
    seen = await money_check.wait_quiet(*_quiet_fixtures(), timeout=5, poll_seconds=0.01)
    assert seen["quiet"] is True, seen
    assert seen["workerUncommittedNow"] == 6 and seen["workerLag"] == 0
    assert looks["w-sagas"] == 2  # the first look alone cannot tell: one more


async def test_a_record_never_committed_is_never_quiet(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    stuck = TopicPartition("business.commands", 4)

    async def stuck_group(_b: str, group: str, topics: list[str], partitions: int) -> GroupProgress:
        return _progress(topics, partitions, 10, 10, stuck if group == "w-sagas" else None)

    monkeypatch.setattr(money_check, "group_progress", stuck_group)
    seen = await money_check.wait_quiet(*_quiet_fixtures(), timeout=0.3, poll_seconds=0.01)
    assert seen["quiet"] is False and seen["workerLag"] == 7, seen
