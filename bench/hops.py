"""Where a transfer's confirm → final reply time goes, hop by hop, from the records' own
timestamps.

Every record carries its producer's CreateTime (the moment ``send()`` was called). For each
transfer confirmed in the measured window without an OTP step, the chain is::

    transferConfirm (gateway) → debit command (worker) → debited (account center)
      → saga input (worker's relay) → credit command (worker) → credited (account center)
      → saga input (relay) → final reply (worker)

A saga input exists only for an event relayed to a worker that owns the saga (two
workers and more); an event the saga engine decided where it read it has none, and its
relay hop counts 0 (the event's own timestamp stands for it).

and each hop's time is the difference of two consecutive records' timestamps: the
upstream producer's batching, the broker, the consumer's fetch and hand-over, any queueing,
and the step's own work. One clock (one machine), so no skew. Read after the run, before
its topics are dropped.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

HOPS = (
    "confirm → debit command (worker)",
    "debit command → debited (account center)",
    "debited → saga input (relay)",
    "saga input → credit command (worker)",
    "credit command → credited (account center)",
    "credited → saga input (relay)",
    "saga input → final reply (worker)",
)


async def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic``, from its beginning to its end when called."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while True:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind:
                return records
            batch = await consumer.getmany(*behind, timeout_ms=1000, max_records=10000)
            for chunk in batch.values():
                records.extend(chunk)
    finally:
        await consumer.stop()


def _json(raw: bytes | None) -> dict[str, Any]:
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def chains(commands: Iterable[Any], account_commands: Iterable[Any],
           account_events: Iterable[Any], saga_inputs: Iterable[Any], replies: Iterable[Any],
           window_ms: tuple[float, float]) -> list[list[float]]:
    """The 8 timestamps (ms) of each complete chain whose confirm was sent in the window."""
    confirms: dict[str, float] = {}
    for r in commands:
        v = _json(r.value)
        if v.get("type") == "transferConfirm" and isinstance(v.get("requestId"), str):
            confirms.setdefault(v["requestId"], r.timestamp)
    steps: dict[str, dict[str, tuple[str, float]]] = {}
    for r in account_commands:
        v = _json(r.value)
        if {"commandId", "transferId", "type"} <= v.keys():
            steps.setdefault(v["transferId"], {}).setdefault(
                v["type"], (v["commandId"], r.timestamp))
    events: dict[str, float] = {}
    for r in account_events:
        v = _json(r.value)
        if isinstance(v.get("commandId"), str):
            events.setdefault(v["commandId"], r.timestamp)
    relayed: dict[str, float] = {}
    for r in saga_inputs:
        event = _json(r.value).get("accountEvent")
        if isinstance(event, dict) and isinstance(event.get("commandId"), str):
            relayed.setdefault(event["commandId"], r.timestamp)
    out: list[list[float]] = []
    lo, hi = window_ms
    for r in replies:
        v = _json(r.value)
        if v.get("type") != "transferConfirm" or v.get("status") != "ok":
            continue
        confirm = confirms.get(v.get("requestId", ""))
        data = v.get("data") if isinstance(v.get("data"), dict) else {}
        legs = steps.get(str(data.get("transferId")), {})  # type: ignore[union-attr]
        if confirm is None or not lo <= confirm < hi or {"debit", "credit"} - legs.keys():
            continue
        (debit_id, debit_at), (credit_id, credit_at) = legs["debit"], legs["credit"]
        if not {debit_id, credit_id} <= events.keys():
            continue
        out.append([confirm, debit_at, events[debit_id],
                    relayed.get(debit_id, events[debit_id]), credit_at,
                    events[credit_id], relayed.get(credit_id, events[credit_id]),
                    r.timestamp])
    return out


def summarise(found: list[list[float]]) -> dict[str, Any]:
    """Per hop: p50, p90, p99 and mean in ms, and the share of the mean total."""
    if not found:
        return {"transfers": 0}
    total_mean = statistics.fmean(c[-1] - c[0] for c in found)
    hops: dict[str, Any] = {}
    for i, name in enumerate(HOPS):
        hops[name] = _stats([c[i + 1] - c[i] for c in found], total_mean)
    hops["total"] = _stats([c[-1] - c[0] for c in found], total_mean)
    return {"transfers": len(found), "hopsMs": hops}


def _stats(values: list[float], total_mean: float) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    mean = statistics.fmean(ordered)
    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "mean": round(mean, 1),
            "shareOfMean": round(mean / total_mean, 3) if total_mean else 0.0}


async def measure(settings: Any, window_wall: tuple[float, float]) -> dict[str, Any]:
    """Read the run's topics and summarise the hops of the window's transfers."""
    bootstrap = settings.kafka_bootstrap_servers
    names = ("business.commands", "account.commands", "account.events",
             "business.saga-inputs", "business.replies")
    topics = [await read_topic(bootstrap, settings.topic(n)) for n in names]
    window_ms = (window_wall[0] * 1000, window_wall[1] * 1000)
    commands, account_commands, account_events, saga_inputs, replies = topics
    return summarise(chains(commands, account_commands, account_events, saga_inputs, replies,
                            window_ms))
