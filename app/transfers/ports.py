"""Which tables does the command side need, and with what methods?

The two Faust tables of the worker (adapters in agents/faust_app.py, dicts in unit
tests). Here until they join the other ports in app/domain/ports.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from app.domain import transfer_saga as saga_core


class SagaRepository(Protocol):
    """Where sagas live: the Faust table keyed by transfer id (a dict in unit tests)."""

    def get(self, transfer_id: str) -> saga_core.Saga | None: ...

    def put(self, saga: saga_core.Saga) -> None: ...

    def scan(self) -> Iterable[saga_core.Saga]: ...

    def delete(self, transfer_id: str) -> None: ...


class ReplyCache(Protocol):
    """Replies already sent, by ``operatorId ␟ requestId`` (the Faust table ``replies``)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, reply: bytes, *, at: float, partition: int) -> None: ...

    def expired(self, partition: int, older_than: float) -> list[str]:
        """Keys of the replies saved from ``partition`` before ``older_than``."""
        ...

    def delete(self, key: str) -> None: ...
