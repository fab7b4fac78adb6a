"""app/faust_consumer.py: a fetched batch is delivered in one task with Faust's per-record
rules (read offsets, gaps, stale records dropped)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from app.faust_consumer import YIELD_EVERY, BatchDeliveringConsumer

A = TP("business.commands", 0)
B = TP("business.saga-inputs", 0)


def fake_consumer(read: dict[TP, int | None] | None = None) -> Any:
    delivered: list[tuple[str, int]] = []
    gaps: list[tuple[TP, int, int]] = []

    async def callback(message: Any) -> None:
        delivered.append((message.topic, message.offset))

    async def add_gap(tp: TP, start: int, end: int) -> None:
        gaps.append((tp, start, end))

    offsets: defaultdict[TP, int | None] = defaultdict(lambda: None)
    offsets.update(read or {})
    return SimpleNamespace(
        callback=callback, _read_offset=offsets, _add_gap=add_gap,
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True)),
        log=SimpleNamespace(dev=lambda *a, **k: None),
        delivered=delivered, gaps=gaps,
    )


def msg(tp: TP, offset: int) -> tuple[TP, Any]:
    return tp, SimpleNamespace(topic=tp.topic, offset=offset, key=b"k", value=b"v")


async def test_delivers_every_record_in_fetch_order_and_advances_read_offsets() -> None:
    c = fake_consumer()
    batch = [msg(A, 0), msg(B, 5), msg(A, 1), msg(B, 6)]
    await BatchDeliveringConsumer._deliver(c, batch)
    assert c.delivered == [(A.topic, 0), (B.topic, 5), (A.topic, 1), (B.topic, 6)]
    assert c._read_offset[A] == 1 and c._read_offset[B] == 6
    assert c.gaps == []


async def test_records_older_than_the_read_offset_are_dropped() -> None:
    c = fake_consumer({A: 10})
    await BatchDeliveringConsumer._deliver(c, [msg(A, 9), msg(A, 10), msg(A, 11)])
    assert c.delivered == [(A.topic, 10), (A.topic, 11)]
    assert c._read_offset[A] == 11


async def test_a_jump_in_offsets_is_recorded_as_a_gap() -> None:
    """Compacted changelogs and transaction markers leave holes: Faust counts them as
    acknowledged so that commits can pass them."""
    c = fake_consumer({A: 3})
    await BatchDeliveringConsumer._deliver(c, [msg(A, 7)])
    assert c.gaps == [(A, 4, 7)]
    assert c.delivered == [(A.topic, 7)]


async def test_large_batches_are_delivered_whole() -> None:
    c = fake_consumer()
    n = YIELD_EVERY * 3 + 7
    await BatchDeliveringConsumer._deliver(c, [msg(A, i) for i in range(n)])
    assert [o for _, o in c.delivered] == list(range(n))

