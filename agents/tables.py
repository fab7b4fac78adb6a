"""The Faust tables behind the command side's ports (``SagaRepository``, ``ReplyCache`` in
app/domain/ports.py): bytes in the tables, domain objects at the port. Built and injected
by the bootstrap (agents/worker.py); dicts stand in for them in unit tests (tests/fakes.py).

A write lands in the changelog partition of the record being handled (Faust's
``current_event``): a saga's home partition, which is why every saga is written while a
record of its own partition is handled.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from app.domain import transfer_saga as saga_core


class TableSagas:
    """The ``sagas`` table (key: transferId = the scoped idempotency key, hashed)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    async def get(self, transfer_id: str) -> saga_core.Saga | None:
        raw = self.table.get(transfer_id.encode())
        return None if raw is None else saga_core.saga_from_dict(orjson.loads(raw))

    def put(self, saga: saga_core.Saga) -> None:
        self.table[saga.transfer.transfer_id.encode()] = orjson.dumps(
            saga_core.saga_to_dict(saga)
        )

    def scan(self) -> Iterable[saga_core.Saga]:
        for _key, raw in list(self.table.items()):
            yield saga_core.saga_from_dict(orjson.loads(raw))

    async def due(self, partition: int, now: float, limit: int) -> list[str]:
        found = sorted((deadline, saga.transfer.transfer_id) for saga in self.scan()
                       if saga.transfer.home_partition == partition
                       and (deadline := saga.deadline()) is not None and deadline <= now)
        return [transfer_id for _deadline, transfer_id in found[:limit]]

    async def purge(self, partition: int, older_than: float) -> int:
        old = [saga.transfer.transfer_id for saga in self.scan()
               if saga.transfer.home_partition == partition
               and saga.state in (saga_core.State.COMPLETED, saga_core.State.FAILED)
               and saga.updated_at < older_than]
        for transfer_id in old:
            del self.table[transfer_id.encode()]  # a tombstone in the changelog
        return len(old)


class TableReplies:
    """The ``replies`` table: the reply sent to each request (``operatorId ␟ requestId``)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    # Stored as b"<partition>|<saved at>|<reply>" so that old replies can be purged from
    # the partition they belong to.

    async def get(self, key: str) -> bytes | None:
        raw = self.table.get(key.encode())
        return None if raw is None else bytes(raw).split(b"|", 2)[2]

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None:
        self.table[key.encode()] = b"%d|%.3f|%s" % (partition, at, reply)

    async def purge(self, partition: int, older_than: float) -> int:
        keys = []
        for key, raw in list(self.table.items()):
            part, at, _reply = bytes(raw).split(b"|", 2)
            if int(part) == partition and float(at) < older_than:
                keys.append(key)
        for key in keys:
            del self.table[key]
        return len(keys)
