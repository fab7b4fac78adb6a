"""What does the code below the intake know of the record being handled?

Its partition (where the reply cache's writes land) and its identity (what a Kafka
redelivery keeps: a wrong PIN counts once per record), as context variables, not
attributes: the saga agent handles records of different partitions concurrently, each
in its own task (agents/lanes.py). And :class:`Tally`, the count of records ignored or
set aside for what they hold.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from contextvars import ContextVar

from app.record_failures import SourceRecord

log = logging.getLogger(__name__)

#: The partition of the record being handled (where its table writes land).
handled_partition: ContextVar[int] = ContextVar("handled_partition", default=0)
#: The coordinates (topic/partition/offset) of the ``business.commands`` record being
#: handled: what a Kafka redelivery keeps and a client cannot vary (a wrong PIN counts once
#: per record). None for a record that was not consumed (offset unknown).
handled_record: ContextVar[str | None] = ContextVar("handled_record", default=None)


def record_identity(record: SourceRecord, key: bytes) -> str | None:
    """What a redelivery of a record keeps and nothing else has: its coordinates and a
    keyed hash of its value (a topic recreated later reuses offsets, never with the same
    bytes; keyed, so the stored form says nothing about the PIN the value holds). None for
    a record that was not consumed."""
    if record.offset < 0:
        return None
    digest = hmac.new(key, record.value or b"", hashlib.sha256).hexdigest()[:32]
    return f"{record.topic}/{record.partition}/{record.offset}/{digest}"


class Tally:
    """Records set aside or ignored for what they hold: foreign ids, misrouted inputs."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def count(self, what: str) -> None:
        """Count a record ignored or set aside for what it holds; logged at 1, 2, 4, 8, ...
        (an operator sees it happen without a line per record)."""
        self.counters[what] += 1
        n = self.counters[what]
        log.debug("%s: one more (%d)", what.replace("_", " "), n)
        if n & (n - 1) == 0:
            log.info("%s: %d so far", what.replace("_", " "), n)
