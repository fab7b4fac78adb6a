"""What does the code below the intake know of the record being handled?

Its identity (what a Kafka redelivery keeps: a wrong PIN counts once per record), carried
in the request (``commands.Request.record_id``) like its partition: explicit arguments,
never context variables, so that several records can be decided in one task. And
:class:`Tally`, the count of records ignored or set aside for what they hold.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter

from app.record_failures import SourceRecord

log = logging.getLogger(__name__)


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
