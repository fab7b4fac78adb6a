"""bench/hops.py: a transfer's confirm → final time split by hop from record timestamps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson

from bench.hops import HOPS, chains, summarise


def rec(ts: float, value: dict[str, Any]) -> Any:
    return SimpleNamespace(timestamp=ts, value=orjson.dumps(value))


def one_transfer(t0: float, tid: str, rid: str, *,
                 reply_status: str = "ok") -> dict[str, list[Any]]:
    d, c = f"{tid}:debit:0", f"{tid}:credit:0"
    return {
        "commands": [rec(t0, {"type": "transferConfirm", "requestId": rid})],
        "account_commands": [rec(t0 + 10, {"commandId": d, "transferId": tid, "type": "debit"}),
                             rec(t0 + 40, {"commandId": c, "transferId": tid, "type": "credit"})],
        "account_events": [rec(t0 + 15, {"commandId": d}), rec(t0 + 50, {"commandId": c})],
        "saga_inputs": [rec(t0 + 30, {"kind": "accountEvent", "accountEvent": {"commandId": d}}),
                        rec(t0 + 70, {"kind": "accountEvent", "accountEvent": {"commandId": c}})],
        "replies": [rec(t0 + 100, {"type": "transferConfirm", "requestId": rid,
                                   "status": reply_status, "data": {"transferId": tid}})],
    }


def merged(*parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


def test_each_hop_is_the_difference_of_consecutive_timestamps() -> None:
    t = merged(one_transfer(1000, "T1", "r1"))
    found = chains(t["commands"], t["account_commands"], t["account_events"],
                   t["saga_inputs"], t["replies"], (0, 10_000))
    assert found == [[1000, 1010, 1015, 1030, 1040, 1050, 1070, 1100]]
    hops = summarise(found)["hopsMs"]
    assert [hops[h]["p50"] for h in HOPS] == [10, 5, 15, 10, 10, 20, 30]
    assert hops["total"]["mean"] == 100
    assert abs(sum(hops[h]["shareOfMean"] for h in HOPS) - 1) < 0.01


def test_an_event_decided_where_it_was_read_has_a_relay_hop_of_zero() -> None:
    """One worker owns every partition: the saga engine decides an account event where it
    reads it, and no saga input is written."""
    t = merged(one_transfer(1000, "T1", "r1"))
    found = chains(t["commands"], t["account_commands"], t["account_events"], [],
                   t["replies"], (0, 10_000))
    assert found == [[1000, 1010, 1015, 1015, 1040, 1050, 1050, 1100]]
    hops = summarise(found)["hopsMs"]
    assert hops[HOPS[2]]["p50"] == hops[HOPS[5]]["p50"] == 0


def test_only_complete_transfers_confirmed_in_the_window_count() -> None:
    t = merged(one_transfer(1000, "T1", "r1"),            # in the window
               one_transfer(5000, "T2", "r2"),            # confirmed after the window
               one_transfer(1200, "T3", "r3", reply_status="error"))
    t["account_events"] = [r for r in t["account_events"]  # T1's credit never answered
                           if b"T1:credit" not in r.value]
    found = chains(t["commands"], t["account_commands"], t["account_events"],
                   t["saga_inputs"], t["replies"], (0, 4000))
    assert found == []
    t = merged(one_transfer(1000, "T1", "r1"), one_transfer(5000, "T2", "r2"))
    found = chains(t["commands"], t["account_commands"], t["account_events"],
                   t["saga_inputs"], t["replies"], (0, 4000))
    assert [c[0] for c in found] == [1000]


def test_no_transfer_gives_an_empty_summary() -> None:
    assert summarise([]) == {"transfers": 0}


def test_the_generator_partitions_requests_as_the_producer_would() -> None:
    """bench/gateway.py batches its requests per partition itself: each must go where the
    gateway's producer (the default partitioner, murmur2 of the key) would send it."""
    from aiokafka.partitioner import DefaultPartitioner

    from bench.gateway import BenchGateway

    gateway = BenchGateway("unused:9092", lambda name: name)
    for n in (1, 6, 7):
        gateway._partitions = list(range(n))
        for i in range(200):
            key = f"{i:032x}-{n}".encode()
            assert gateway.partition_for(key) == DefaultPartitioner()(key, list(range(n)),
                                                                       list(range(n)))
