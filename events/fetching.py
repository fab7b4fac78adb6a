"""How a busy consumer's fetches follow its traffic: batched under load, at the first byte
when quiet.

A fetch waits at the broker for ``fetch_min_bytes`` or ``fetch_max_wait_ms``, whichever
comes first. The saga engine and the account center batch (64 KiB or 10 ms,
``BIZ_CONSUMER_FETCH_MIN_BYTES`` / ``_MAX_WAIT_MS``): under load each fetch carries what
came in 10 ms instead of one record. With no traffic the same setting answers an empty
fetch every 10 ms: an idle saga engine, account center and broker spent ~0.25 core of
the machine on them (docs/performance.md), and a lone record waited up to 10 ms per hop.

:class:`AdaptiveFetch` counts the records a consumer reads and, once a second, picks the
setting: batched above ``1000 / max_wait`` records a second (a fetch every ``max_wait`` is
then no more fetches than one a record), back to *sparse* below 70 % of that (a fetch is
answered at its first byte, or after half a second with nothing). The broker answers a
sparse fetch as soon as a record is there, so a quiet consumer's latency is the round trip
and its cost one fetch a record or two a second. aiokafka reads both values from its
fetcher each time it builds a fetch request; the change applies from the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: The fetches of a quiet consumer: answered at the first byte, or after half a second.
SPARSE_MIN_BYTES = 1
SPARSE_MAX_WAIT_MS = 500
#: Back to sparse below this share of the batching threshold (no flapping at the edge).
HYSTERESIS = 0.7
#: How often the rate is measured and the setting chosen.
WINDOW_SECONDS = 1.0


class AdaptiveFetch:
    """The fetch setting of one aiokafka consumer, chosen by the records it reads."""

    def __init__(self, consumer: Any, min_bytes: int, max_wait_ms: int,
                 clock: Callable[[], float]) -> None:
        self._consumer = consumer
        self.batched_setting = (min_bytes, max_wait_ms)
        #: Records a second above which the fetches are batched.
        self.batched_above = 1000.0 / max(max_wait_ms, 1)
        self._clock = clock
        self._window_start = clock()
        self._records = 0
        #: Whether the batched setting is in force (the consumer starts sparse).
        self.batched = False
        #: Changes of setting so far.
        self.switches = 0
        self._unsupported = False
        #: Whether the fetcher holds ``setting`` (False until the consumer has a fetcher).
        self._applied = self._apply()

    def read(self, records: int) -> None:
        """After each ``getmany``: ``records`` were read (0 for an empty one)."""
        self._records += records
        if not self._applied:
            self._applied = self._apply()
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW_SECONDS:
            return
        rate = self._records / elapsed
        self._window_start, self._records = now, 0
        want = (rate >= HYSTERESIS * self.batched_above if self.batched
                else rate > self.batched_above)
        if want != self.batched:
            self.batched = want
            self.switches += 1
            self._applied = self._apply()

    @property
    def setting(self) -> tuple[int, int]:
        """(fetch_min_bytes, fetch_max_wait_ms) in force."""
        return self.batched_setting if self.batched else (SPARSE_MIN_BYTES, SPARSE_MAX_WAIT_MS)

    def _apply(self) -> bool:
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is None:  # not started yet
            return False
        if not hasattr(fetcher, "_fetch_min_bytes"):
            # An aiokafka whose fetcher no longer has them (tests/integration/
            # test_fetching_broker.py): the consumer keeps the setting it was built with.
            if not self._unsupported:
                self._unsupported = True
                log.warning("this aiokafka's fetcher has no fetch settings to adapt: "
                            "the fetches keep the consumer's own")
            return True  # nothing to apply, now or later
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = self.setting
        return True
