"""Queries served from tables: a user's balance, one transfer's details, the history page.

Three parts, none of which knows Faust or PostgreSQL (the projections write anything with
``get``/``put``, the answers read anything with an async ``get``/``get_many``, ports
``KeyValue`` and ``AsyncKeyValue``; the unit tests use dicts):

* the **projections** keep the tables current. :class:`AccountProjection` applies
  ``account.events`` to ``balances`` (per account: balance, as-of, last history seq),
  ``history`` (one entry per applied event, key ``accountId ␟ seq``) and ``seen``
  (``accountId ␟ commandId`` → seq, the deduplication): in the worker the PostgreSQL
  tables ``query_balances``, ``query_history`` and ``query_events_seen``, which the saga
  engine writes in its cycle (app/adapters/saga_state.py) and every worker reads
  (app/adapters/query_tables.py). :class:`TransferProjection` applies every transfer
  event the saga engine produces (``business.transfer-events``) to ``transfers``: the
  PostgreSQL table ``query_transfers``, written in the same cycle and transaction as the
  saga, before anything of the cycle is sent (agents/saga_engine.py).
* :class:`QueryService` answers a :class:`~schemas.wire.QueryRequest` from the tables:
  an :class:`Answer` that the Kafka agent turns into a reply and the HTTP views into a
  response. Every table is read from PostgreSQL with no cache, so any worker answers any
  query, its client's own writes included (docs/architecture.md, read your writes).

A history page reads the head, then its ``limit`` entries by key in one read, newest first,
from a cursor (a seq): its cost is the page, never the length of the history. An event's
entry and balance are committed together, so a page meets no hole; one (a row lost by
other means) would be skipped, at the cost of one more read. ``from``/``to`` bound the seq range
by a binary search on ``occurredAt`` (O(log n) point reads): an account's entries are in
the order the account center applied them, and its timestamps follow that order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from app import replies
from app.domain import transfer_saga as saga_core
from app.domain.ports import AsyncKeyValue, KeyValue
from app.record_failures import validation_reason
from schemas.wire import (
    AccountEvent,
    AccountEventType,
    CommandType,
    ErrorCode,
    QueryRequest,
    QueryTransactionDetailsPayload,
    QueryTransactionHistoryPayload,
    TransferEvent,
)

log = logging.getLogger(__name__)

SEP = "\x1f"
#: One message for a transfer that does not exist and one the caller may not see: the reply
#: must not tell them apart.
NOT_YOURS = "no such transfer among yours"

_KINDS = {
    AccountEventType.DEBITED: ("debit", -1),
    AccountEventType.CREDITED: ("credit", 1),
    AccountEventType.REFUNDED: ("refund", 1),
}


class DictKeyValue:
    """:class:`KeyValue` over a dict (unit tests, and the reads counter they check)."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}
        self.reads = 0

    def get(self, key: str) -> bytes | None:
        self.reads += 1
        return self.rows.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.rows[key] = value


class KeyValueReads:
    """The reads of a :class:`KeyValue` as an :class:`AsyncKeyValue` (dicts in unit tests;
    the worker reads PostgreSQL, app/adapters/query_tables.py). ``round_trips`` counts the
    reads asked of it (one per ``get`` or ``get_many``), as a database would serve them."""

    def __init__(self, table: KeyValue) -> None:
        self.table = table
        self.round_trips = 0

    async def get(self, key: str) -> bytes | None:
        self.round_trips += 1
        return self.table.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        self.round_trips += 1
        found = {key: self.table.get(key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}


def history_key(account_id: str, seq: int) -> str:
    return f"{account_id}{SEP}{seq:016d}"


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def micros(at: datetime) -> int:
    delta = at.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def transfer_id_of(command_id: str) -> str:
    """The transfer (or top-up) an account command belongs to; a foreign command's own id."""
    parsed = saga_core.parse_command_id(command_id)
    return parsed[0] if parsed is not None else command_id


# --------------------------------------------------------------------------------------
# projections
# --------------------------------------------------------------------------------------


class AccountProjection:
    """``account.events`` → ``balances``, ``history``, ``seen``.

    Called by the saga engine's cycle (the relay's listener, app/transfers/relay.py) for
    every valid account event *before* its saga input is made, over the PostgreSQL rows
    buffered in the cycle (``PostgresSagaState.rows``): ``get`` answers from what the cycle
    wrote or read ahead and raises ``NotReadAhead`` for any other row, so :meth:`apply`
    reads every row it needs before it writes any, and deciding the event again after the
    missing row is read is safe. The cycle's flush writes the rows in one transaction with
    the sagas, before anything of the cycle is sent: see docs/architecture.md, read your
    writes.

    Order of the writes: the seen mark (with the seq it takes), then the history entry,
    then the balance (which also holds the last seq). With the flush they are committed
    together; the order still lets an event whose writes were cut short (tables written
    one by one, as Faust's were) be completed, not duplicated, when delivered again.
    """

    def __init__(self, balances: KeyValue, history: KeyValue, seen: KeyValue) -> None:
        self.balances = balances
        self.history = history
        self.seen = seen

    def apply_raw(self, raw: bytes | None) -> bool:
        """Apply one record of ``account.events``; an invalid one is left to the relay
        (which dead-letters it). True when the tables changed."""
        try:
            event = AccountEvent.model_validate_json(raw or b"")
        except ValidationError:
            return False
        return self.apply(event)

    def apply(self, event: AccountEvent) -> bool:
        kind = _KINDS.get(event.type)
        if kind is None or event.balance_after_minor is None:
            return False  # rejected: the balance did not change
        account = event.account_id
        state = _load(self.balances.get(account))
        head = int(state["seq"]) if state else 0
        seen_key = f"{account}{SEP}{event.command_id}"
        seen = self.seen.get(seen_key)
        if seen is None:
            if state is not None and state.get("commandId") == event.command_id:
                # The last event applied, again, whose seen mark was lost in a crash.
                self.seen.put(seen_key, str(head).encode())
                return False
            seq = head + 1
            self.seen.put(seen_key, str(seq).encode())
        else:
            seq = int(seen)
            if seq <= head and self.history.get(history_key(account, seq)) is not None:
                return False  # a redelivered or re-emitted event: already applied
        name, sign = kind
        at = iso(event.occurred_at)
        self.history.put(history_key(account, seq), orjson.dumps({
            "transferId": transfer_id_of(event.command_id),
            "kind": name,
            "amountMinor": sign * event.amount_minor,
            "balanceAfterMinor": event.balance_after_minor,
            "occurredAt": at,
            "atUs": micros(event.occurred_at),
            "commandId": event.command_id,
        }))
        if seq > head:
            self.balances.put(account, orjson.dumps({
                "balanceMinor": event.balance_after_minor,
                "asOf": at,
                "commandId": event.command_id,
                "seq": seq,
            }))
        return True


class TransferProjection:
    """``business.transfer-events`` → ``transfers`` (one record per transfer or top-up):
    run by the saga engine over ``query_transfers`` for every transfer event it produces."""

    def __init__(self, transfers: KeyValue) -> None:
        self.transfers = transfers

    def apply_raw(self, raw: bytes | None) -> bool:
        try:
            event = TransferEvent.model_validate_json(raw or b"")
        except ValidationError:
            log.warning("invalid record on business.transfer-events ignored")
            return False
        return self.apply(event)

    def apply(self, event: TransferEvent) -> bool:
        stored = _load(self.transfers.get(event.transfer_id))
        if stored is not None and event.seq <= int(stored["seq"]):
            return False  # a redelivery or replay of a change already applied
        at = iso(event.occurred_at)
        record: dict[str, Any] = {
            "transferId": event.transfer_id,
            "fromAccountId": event.from_account_id,
            "toAccountId": event.to_account_id,
            "amountMinor": event.amount_minor,
            "currency": event.currency,
            "state": event.state,
            "createdAt": stored["createdAt"] if stored is not None else at,
            "updatedAt": at,
            "seq": event.seq,
        }
        if event.code is not None:
            record["code"] = event.code
        self.transfers.put(event.transfer_id, orjson.dumps(record))
        return True


# --------------------------------------------------------------------------------------
# answers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of a query: ``data`` when ok, else an error ``code`` and ``message``."""

    data: dict[str, Any] | None = None
    code: ErrorCode | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None

    @classmethod
    def error(cls, code: ErrorCode, message: str) -> Answer:
        return cls(code=code, message=message)


class QueryService:
    """Answers queries from the tables. Authorization is decided here: the caller's own
    account only; a transfer's details only to its payer or payee."""

    def __init__(self, balances: AsyncKeyValue, history: AsyncKeyValue,
                 transfers: AsyncKeyValue) -> None:
        self.balances = balances
        self.history = history
        self.transfers = transfers

    async def answer(self, request: QueryRequest) -> Answer:
        try:
            if request.type == CommandType.QUERY_BALANCE.value:
                return await self.balance(request.account_id, request.currency)
            if request.type == CommandType.QUERY_TRANSACTION_DETAILS.value:
                details = QueryTransactionDetailsPayload.model_validate(request.params)
                return await self.details(request.account_id, details.transfer_id)
            page = QueryTransactionHistoryPayload.model_validate(request.params)
        except ValidationError as exc:
            return Answer.error(ErrorCode.INVALID_REQUEST, validation_reason(exc))
        return await self.history_page(request.account_id, page)

    async def balance(self, account_id: str, currency: str) -> Answer:
        state = _load(await self.balances.get(account_id))
        data: dict[str, Any] = {"accountId": account_id, "currency": currency,
                                "balanceMinor": state["balanceMinor"] if state else 0}
        if state is not None:
            data["asOf"] = state["asOf"]
        return Answer(data)

    async def details(self, account_id: str, transfer_id: str) -> Answer:
        stored = _load(await self.transfers.get(transfer_id))
        if stored is None or account_id not in (stored["fromAccountId"],
                                                stored["toAccountId"]):
            return Answer.error(ErrorCode.FORBIDDEN, NOT_YOURS)
        data = {k: v for k, v in stored.items() if k != "seq"}
        return Answer(data)

    async def history_page(self, account_id: str, page: QueryTransactionHistoryPayload
                           ) -> Answer:
        state = _load(await self.balances.get(account_id))
        head = int(state["seq"]) if state else 0
        if page.cursor is not None and not 1 <= int(page.cursor) <= head:
            return Answer.error(ErrorCode.INVALID_REQUEST, "cursor: not a cursor of this history")
        if page.from_ is not None and page.to is not None and page.to <= page.from_:
            return Answer.error(ErrorCode.INVALID_REQUEST, "to: must be after from")
        low, high = 1, head
        if page.from_ is not None:
            low = await self._first_at_or_after(account_id, micros(page.from_), head)
        if page.to is not None:
            high = await self._first_at_or_after(account_id, micros(page.to), head) - 1
        seq = high if page.cursor is None else min(int(page.cursor), high)
        items: list[dict[str, Any]] = []
        while seq >= low and len(items) < page.limit:
            # The rest of the page in one read: exactly as many entries as are missing, so
            # a page never reads past its last item.
            bottom = max(low, seq - (page.limit - len(items)) + 1)
            keys = [history_key(account_id, n) for n in range(seq, bottom - 1, -1)]
            found = await self.history.get_many(keys)
            for key in keys:
                entry = _load(found.get(key))
                if entry is not None:  # an event's rows commit together: a hole is only skipped
                    items.append({k: v for k, v in entry.items()
                                  if k not in ("atUs", "commandId")})
            seq = bottom - 1
        data: dict[str, Any] = {"items": items}
        if seq >= low:
            data["nextCursor"] = str(seq)
        return Answer(data)

    async def _first_at_or_after(self, account_id: str, at_us: int, head: int) -> int:
        """The first seq in 1..head whose entry occurred at or after ``at_us``, else
        head + 1. Binary search: O(log head) point reads."""
        low, high = 1, head + 1
        while low < high:
            middle = (low + high) // 2
            entry = _load(await self.history.get(history_key(account_id, middle)))
            if entry is not None and int(entry["atUs"]) >= at_us:
                high = middle
            else:
                low = middle + 1
        return low


# --------------------------------------------------------------------------------------
# wire
# --------------------------------------------------------------------------------------


def reply_value(request: QueryRequest, answer: Answer) -> bytes:
    """The ``business.replies`` record of an answer (the envelope of every reply,
    app/replies.py)."""
    return replies.reply_value(
        request.request_id, request.type, "ok" if answer.ok else "error",
        idempotency_key=request.idempotency_key,
        code=None if answer.code is None else answer.code.value, message=answer.message,
        data=answer.data)


def _load(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = orjson.loads(raw)
    return value if isinstance(value, dict) else None

