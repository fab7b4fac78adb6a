"""agents/faust_consumer.py without a broker: a fetched batch is delivered in one task with
Faust's per-record rules, and the bookkeeping that keeps records from being lost or
committed past at a rebalance (offset jumps sought back, no stream fetch while rebalancing,
the committable offset never past an unacknowledged record)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.types import TP
from intervaltree import IntervalTree

from agents.faust_consumer import YIELD_EVERY, BatchDeliveringConsumer

A = TP("business.commands", 0)
B = TP("business.saga-inputs", 0)
CHANGELOG = TP("bizcenter-sagas-changelog", 0)


class BareConsumer(BatchDeliveringConsumer):
    """The consumer's bookkeeping with Faust's service machinery and the broker left out:
    seeks, earliest offsets and fetches are recorded instead of sent."""

    def __init__(self, *, earliest: dict[TP, int] | None = None,
                 committed: dict[TP, int | None] | None = None) -> None:
        self.delivered: list[tuple[TP, int]] = []
        self.gaps: list[tuple[TP, int, int]] = []
        self.sought: list[tuple[TP, int]] = []
        self.fetched_for: list[set[TP] | None] = []
        self.earliest = earliest or {}
        self.kafka_committed = committed or {}
        self.app = SimpleNamespace(
            topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
            tables=SimpleNamespace(changelog_topics={CHANGELOG.topic}),
            rebalancing=False,
            consumer_generation_id=1,
        )
        self.log = SimpleNamespace(dev=lambda *a, **k: None, info=lambda *a, **k: None)
        self._next_expected = {}
        self._floor = {}
        self._read_offset = defaultdict(lambda: None)
        self._committed_offset = defaultdict(lambda: None)
        self._acked = defaultdict(list)
        self._acked_index = defaultdict(set)
        self._gap = defaultdict(IntervalTree)
        self._sought_back_to = {}
        self._holes = {}
        self._streams_sought = 1  # the current generation's streams were sought

        async def getmany(active: set[TP] | None, timeout: float) -> dict[TP, list[Any]]:
            self.fetched_for.append(None if active is None else set(active))
            return {}

        self._thread = SimpleNamespace(getmany=getmany)

    async def callback(self, message: Any) -> None:  # type: ignore[override]
        self.delivered.append((TP(message.topic, message.partition), message.offset))

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        self.gaps.append((tp, offset_from, offset_to))

    async def _seek(self, partition: TP, offset: int) -> None:
        self.sought.append((partition, offset))

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return {tp: self.earliest.get(tp, 0) for tp in partitions}

    async def seek_to_committed(self) -> dict[TP, int | None]:
        for tp, offset in self.kafka_committed.items():
            if offset:  # like aiokafka: only offsets above 0 are sought
                self.sought.append((tp, offset))
        return dict(self.kafka_committed)

    def ack(self, tp: TP, *offsets: int) -> None:
        for offset in offsets:
            self._acked[tp].append(offset)
            self._acked_index[tp].add(offset)


def msg(tp: TP, offset: int) -> tuple[TP, Any]:
    return tp, SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset,
                               key=b"k", value=b"v")


async def test_delivers_every_record_in_fetch_order_and_remembers_the_next_offset() -> None:
    c = BareConsumer()
    batch = [msg(A, 0), msg(B, 5), msg(A, 1), msg(B, 6)]
    await c._deliver(batch)
    assert c.delivered == [(A, 0), (B, 5), (A, 1), (B, 6)]
    assert c._next_expected == {A: 2, B: 7}
    assert c._read_offset[A] == 1 and c._read_offset[B] == 6
    assert c.gaps == [] and c.sought == []


async def test_records_before_the_expected_offset_are_stale_and_dropped() -> None:
    c = BareConsumer()
    c._next_expected[A] = 10
    await c._deliver([msg(A, 8), msg(A, 9), msg(A, 10), msg(A, 11)])
    assert c.delivered == [(A, 10), (A, 11)]


async def test_a_jump_on_an_input_topic_is_never_delivered_and_the_partition_is_sought_back(
) -> None:
    """The records fetched during a rebalance's seek were cleared from the stream buffers:
    the next fetch starts past them. Nothing of that partition is delivered and it is sought
    back to the first record never delivered; other partitions go on."""
    c = BareConsumer()
    c._next_expected.update({A: 100, B: 7})
    await c._deliver([msg(A, 121), msg(B, 7), msg(A, 122), msg(B, 8)])
    assert c.delivered == [(B, 7), (B, 8)]
    assert c.sought == [(A, 100)]
    assert c._next_expected[A] == 100
    assert c.jumps_detected == 1
    assert c.gaps == []  # a jump is never acknowledged as a gap
    # The records fetched again from 100 are delivered in order.
    await c._deliver([msg(A, 100), msg(A, 101)])
    assert c.delivered[-2:] == [(A, 100), (A, 101)]
    assert c._next_expected[A] == 102


async def test_a_jump_over_records_deleted_by_retention_is_accepted_and_committed_past(
) -> None:
    c = BareConsumer(earliest={A: 500})
    c._committed_offset[A] = 100
    c._next_expected[A] = 100
    await c._deliver([msg(A, 500), msg(A, 501)])
    assert c.delivered == [(A, 500), (A, 501)]
    assert c.sought == []
    assert c.jumps_detected == 1
    c.ack(A, 500, 501)
    assert c._new_offset(A) == 502  # commits go on past the deleted records
    assert c._acked[A] == []


async def test_a_hole_the_broker_never_fills_is_accepted_after_one_seek_back() -> None:
    """Another team's transactional producer leaves commit markers (and aborted records)
    that take offsets but are never returned: the first jump is sought back; when the fetch
    from there starts past the same offset again, the hole is accepted and committed past,
    so the partition does not stall."""
    c = BareConsumer()
    c._committed_offset[A] = 0
    c._next_expected[A] = 0
    await c._deliver([msg(A, 0), msg(A, 1), msg(A, 3)])
    assert c.delivered == [(A, 0), (A, 1)] and c.sought == [(A, 2)]
    await c._deliver([msg(A, 3), msg(A, 4)])  # fetched again from 2: still no record 2
    assert c.delivered[-2:] == [(A, 3), (A, 4)]
    assert c.sought == [(A, 2)]  # sought back once only
    c.ack(A, 0, 1, 3, 4)
    assert c._new_offset(A) == 2
    c._committed_offset[A] = 2
    assert c._new_offset(A) == 5
    # A later jump at another offset is sought back again first.
    await c._deliver([msg(A, 7)])
    assert c.sought == [(A, 2), (A, 5)]


def test_a_hole_at_the_committed_offset_is_committed_past_alone() -> None:
    c = BareConsumer()
    c._committed_offset[A] = 9
    c._accept_hole(A, 9, 11)
    assert c._new_offset(A) == 11
    c._committed_offset[A] = 11
    assert c._new_offset(A) is None


async def test_changelog_partitions_keep_faust_gaps() -> None:
    """Compacted changelogs have holes: Faust counts them as acknowledged."""
    c = BareConsumer()
    c._read_offset[CHANGELOG] = 3
    await c._deliver([msg(CHANGELOG, 7)])
    assert c.gaps == [(CHANGELOG, 4, 7)]
    assert c.delivered == [(CHANGELOG, 7)]


async def test_large_batches_are_delivered_whole() -> None:
    c = BareConsumer()
    n = YIELD_EVERY * 3 + 7
    await c._deliver([msg(A, i) for i in range(n)])
    assert [o for _, o in c.delivered] == list(range(n))


def test_the_committable_offset_stops_at_the_first_record_not_acknowledged() -> None:
    """Faust's head check lets a commit pass the one record right at the committed offset
    (``min(acked) - committed > 1``) and is off when the committed offset is 0."""
    c = BareConsumer()
    c._committed_offset[A] = 31
    c.ack(A, 32, 33)
    assert c._new_offset(A) is None  # 31 is not done: nothing to commit
    c.ack(A, 31)
    assert c._new_offset(A) == 34
    assert c._acked[A] == [] and not c._acked_index[A]


def test_a_run_of_acknowledged_records_is_committed_up_to_its_first_hole() -> None:
    c = BareConsumer()
    c._committed_offset[A] = 10
    c.ack(A, 10, 11, 13, 14)
    assert c._new_offset(A) == 12
    assert c._acked[A] == [13, 14]
    c._committed_offset[A] = 12
    assert c._new_offset(A) is None


def test_without_a_committed_offset_the_floor_holds_the_commit() -> None:
    """Committed offset 0 (stored by Faust as None): record 0 must be acknowledged first."""
    c = BareConsumer()
    c._floor[A] = 0
    c.ack(A, 1, 2)
    assert c._new_offset(A) is None
    c.ack(A, 0)
    assert c._new_offset(A) == 3


def test_acknowledgements_below_the_committed_offset_are_forgotten() -> None:
    c = BareConsumer()
    c._committed_offset[A] = 5
    c.ack(A, 3, 4, 5)
    assert c._new_offset(A) == 6
    assert 3 not in c._acked_index[A]


async def test_while_rebalancing_only_changelog_partitions_are_fetched() -> None:
    c = BareConsumer()
    live = {A, B, CHANGELOG}
    c.app.rebalancing = True
    assert await c._getmany(live, timeout=1.0) == {}
    assert c.fetched_for == [{CHANGELOG}]
    assert live == {A, B, CHANGELOG}  # the live set is not changed
    # Only stream partitions: nothing is fetched at all (aiokafka reads an empty set as
    # "every partition").
    assert await c._getmany({A, B}, timeout=0.001) == {}
    assert c.fetched_for == [{CHANGELOG}]
    c.app.rebalancing = False
    await c._getmany(live, timeout=1.0)
    assert c.fetched_for[-1] == live


async def test_no_stream_partition_is_fetched_until_this_generation_s_seek_is_done(
        monkeypatch: Any) -> None:
    """Two rebalances in a row: the end of the first (its seek, then its recovery
    completion) can clear ``app.rebalancing`` after the second revocation, while the second
    seek is still under way; records fetched then reach the stream buffers that the second
    resume clears (seen: queries never answered). Streams are fetched again only once the
    current generation's seek is done."""
    c = BareConsumer(committed={A: 10})
    live = {A, B, CHANGELOG}

    async def faust_revocation(self: Any, revoked: set[TP]) -> None:
        return None  # Faust's own revocation bookkeeping is not under test here

    monkeypatch.setattr(BatchDeliveringConsumer.__mro__[1], "on_partitions_revoked",
                        faust_revocation)
    await c.on_partitions_revoked({A})
    c.app.consumer_generation_id = 2
    await c._getmany(live, timeout=0.001)
    assert c.fetched_for == [{CHANGELOG}]  # rebalancing already False: still no stream

    seen_during_seek: list[set[TP] | None] = []
    seek = c.seek_to_committed

    async def slow_seek() -> dict[TP, int | None]:
        await c._getmany(live, timeout=0.001)  # a fetch while the seek is under way
        seen_during_seek.append(c.fetched_for[-1])
        return await seek()

    c.seek_to_committed = slow_seek  # type: ignore[method-assign]
    await c.perform_seek()
    assert seen_during_seek == [{CHANGELOG}]
    await c._getmany(live, timeout=0.001)
    assert c.fetched_for[-1] == live
    # A seek overtaken by the next generation does not open the streams of that one.
    c.app.consumer_generation_id = 3

    async def overtaken() -> dict[TP, int | None]:
        c.app.consumer_generation_id = 4
        return await seek()

    c.seek_to_committed = overtaken  # type: ignore[method-assign]
    await c.perform_seek()
    await c._getmany(live, timeout=0.001)
    assert c.fetched_for[-1] == {CHANGELOG}


async def test_perform_seek_sends_unstarted_partitions_to_the_group_start() -> None:
    """aiokafka seeks only to committed offsets above 0: a partition committed at 0 or never
    committed would keep its fetch position, past records fetched and never processed."""
    c2 = TP("business.commands", 2)
    c = BareConsumer(committed={A: 40, B: None, c2: 0, CHANGELOG: None},
                     earliest={B: 17})
    await c.perform_seek()
    assert sorted(c.sought) == sorted([(A, 40), (B, 17), (c2, 0)])
    assert c._next_expected == {A: 40, B: 17, c2: 0}
    assert c._floor == {A: 40, B: 17, c2: 0}
    assert c._committed_offset[A] == 40
    # The partition committed at 0 delivers from 0, and a jump past it is caught.
    await c._deliver([msg(c2, 3)])
    assert c.delivered == [] and c.sought[-1] == (c2, 0)


async def test_revoked_partitions_are_forgotten(monkeypatch: Any) -> None:
    c = BareConsumer()
    c._next_expected.update({A: 5, B: 6})
    c._floor.update({A: 5, B: 6})

    async def faust_revocation(self: Any, revoked: set[TP]) -> None:
        return None  # Faust's own revocation bookkeeping is not under test here

    monkeypatch.setattr(BatchDeliveringConsumer.__mro__[1], "on_partitions_revoked",
                        faust_revocation)
    await c.on_partitions_revoked({A})
    assert c._next_expected == {B: 6} and c._floor == {B: 6}
