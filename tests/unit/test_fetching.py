"""events/fetching.py: a consumer's fetch setting follows the records it reads (batched
under load, answered at the first byte when quiet), with hysteresis, once per window."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from events.fetching import (
    HYSTERESIS,
    SPARSE_MAX_WAIT_MS,
    SPARSE_MIN_BYTES,
    WINDOW_SECONDS,
    AdaptiveFetch,
)

BATCHED = (65536, 10)
SPARSE = (SPARSE_MIN_BYTES, SPARSE_MAX_WAIT_MS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def consumer() -> SimpleNamespace:
    """What AdaptiveFetch touches of an aiokafka consumer: its fetcher's two values."""
    return SimpleNamespace(_fetcher=SimpleNamespace(_fetch_min_bytes=BATCHED[0],
                                                    _fetch_max_wait_ms=BATCHED[1]))


def in_force(c: SimpleNamespace) -> tuple[int, int]:
    return (c._fetcher._fetch_min_bytes, c._fetcher._fetch_max_wait_ms)


def second(fetch: AdaptiveFetch, clock: Clock, records: int) -> None:
    """One window in which ``records`` were read, over several getmany calls."""
    fetch.read(records // 2)
    clock.now += WINDOW_SECONDS
    fetch.read(records - records // 2)


def test_a_quiet_consumer_fetches_at_the_first_byte() -> None:
    c, clock = consumer(), Clock()
    fetch = AdaptiveFetch(c, *BATCHED, clock)
    assert fetch.batched_above == 100  # a fetch every 10 ms
    assert in_force(c) == SPARSE and not fetch.batched
    second(fetch, clock, 0)
    second(fetch, clock, 100)  # not above the threshold
    assert in_force(c) == SPARSE and fetch.switches == 0


def test_load_batches_the_fetches_and_quiet_brings_them_back_with_hysteresis() -> None:
    c, clock = consumer(), Clock()
    fetch = AdaptiveFetch(c, *BATCHED, clock)
    second(fetch, clock, 101)
    assert in_force(c) == BATCHED and fetch.batched and fetch.switches == 1
    # Between 70 % of the threshold and the threshold: stays batched (no flapping).
    second(fetch, clock, int(HYSTERESIS * 100))
    assert in_force(c) == BATCHED
    second(fetch, clock, int(HYSTERESIS * 100) - 1)
    assert in_force(c) == SPARSE and fetch.switches == 2
    # ... and from sparse, the same middle rate does not batch again.
    second(fetch, clock, 90)
    assert in_force(c) == SPARSE and fetch.switches == 2


def test_the_rate_is_measured_over_a_whole_window() -> None:
    c, clock = consumer(), Clock()
    fetch = AdaptiveFetch(c, *BATCHED, clock)
    fetch.read(500)  # a burst at once: no decision before the window ends
    assert in_force(c) == SPARSE
    clock.now += WINDOW_SECONDS / 2
    fetch.read(0)
    assert in_force(c) == SPARSE
    clock.now += WINDOW_SECONDS / 2
    fetch.read(0)
    assert in_force(c) == BATCHED
    # A long gap with few records is a low rate (records / elapsed time, not per window).
    clock.now += 10 * WINDOW_SECONDS
    fetch.read(200)
    assert in_force(c) == SPARSE


def test_a_consumer_without_a_fetcher_yet_gets_the_setting_once_it_has_one() -> None:
    c, clock = SimpleNamespace(_fetcher=None), Clock()
    fetch = AdaptiveFetch(c, *BATCHED, clock)
    c._fetcher = SimpleNamespace(_fetch_min_bytes=BATCHED[0], _fetch_max_wait_ms=BATCHED[1])
    fetch.read(0)
    assert in_force(c) == SPARSE


def test_a_fetcher_without_the_settings_is_left_alone_and_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    c, clock = SimpleNamespace(_fetcher=SimpleNamespace()), Clock()
    fetch = AdaptiveFetch(c, *BATCHED, clock)
    for _ in range(3):
        second(fetch, clock, 500)
        second(fetch, clock, 0)
    assert not hasattr(c._fetcher, "_fetch_min_bytes")
    assert [r.levelname for r in caplog.records if r.name == "events.fetching"] == ["WARNING"]
