"""What does the command side send, and how is it written?

Every record it sends is built here, as a model of ``schemas/wire.py`` (replies, account
commands, funding commands, OTP notifications, transfer events, saga inputs), or as a dead
letter through the one builder of every process (app/record_failures.py), and serialized
in one place (:func:`app.replies.wire`, shared with the query side): the contract is
enforced on what goes out as on what comes in. The models declare their fields in the
order they travel, so the bytes are those of the hand-built dicts this replaced.

A model is built per output (a few µs; validation included, which is cheaper than
``model_construct``); a value that breaks the contract raises here, before any effect of
the step ran (app/transfers/steps.py), and the record becomes poison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from app import metrics
from app.domain import transfer_saga as saga_core
from app.domain.ports import ReplyCache
from app.record_failures import (
    MAX_ID_CHARS,
    MAX_REASON_CHARS,
    MAX_TYPE_CHARS,
    Outbound,
    SourceRecord,
    cut,
    dead_letter_out,
)
from app.replies import reply_value, wire
from events.topics import Topics
from schemas.wire import (
    AccountCommand,
    ErrorCode,
    FundingCommand,
    OtpNotification,
    SagaInput,
    TransferEvent,
)

#: Replies to save (``(cache key, value)``), collected while a step is encoded and written
#: by app/transfers/steps.py once nothing can fail any more.
Saves = list[tuple[str, bytes]]


def iso(ts: float) -> str:
    """A POSIX time as the wire writes it (RFC 3339, UTC, ``Z``)."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _wire_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {k: iso(v) if k.endswith("At") and isinstance(v, float) else v
            for k, v in data.items()}


class Outbox:
    """Builds the command side's outgoing records (and saves the replies it builds)."""

    def __init__(self, topics: Topics, replies: ReplyCache, clock: Callable[[], float]
                 ) -> None:
        self.topics = topics
        self.replies = replies
        self.clock = clock
        self._tick = wire(SagaInput(kind="tick"))

    # --- a saga step's outputs ------------------------------------------------------

    def encode(self, saga: saga_core.Saga, outputs: tuple[saga_core.Output, ...],
               phone: str | None, saves: Saves) -> Iterator[Outbound]:
        """The records of a step's outputs (a ReleaseLimit is a PostgreSQL effect: none).
        The replies to save are appended to ``saves``."""
        t = saga.transfer
        for o in outputs:
            if isinstance(o, saga_core.SendReply):
                status_cache = None if o.code == ErrorCode.IN_PROGRESS else (
                    f"{t.operator_id}\x1f{o.request_id}")
                yield from self.reply(o.request_id, t.idempotency_key, o.command_type,
                                      o.status, o.code, o.message, _wire_data(o.data),
                                      cache_key=status_cache, saves=saves)
            elif isinstance(o, saga_core.SendAccountCommand):
                yield Outbound(self.topics.account_commands, o.account_id.encode(),
                               wire(AccountCommand(
                                   command_id=o.command_id, type=o.type,
                                   account_id=o.account_id, amount_minor=o.amount_minor,
                                   currency=o.currency, transfer_id=o.transfer_id,
                                   origin=o.origin)))
            elif isinstance(o, saga_core.SendFundingCommand):
                yield Outbound(self.topics.funding_commands, o.charge_id.encode(),
                               wire(FundingCommand(
                                   charge_id=o.charge_id, type=o.type,
                                   funding_source_id=o.funding_source_id,
                                   amount_minor=o.amount_minor, currency=o.currency)))
            elif isinstance(o, saga_core.SendOtp):
                yield Outbound(self.topics.otp, o.user_id.encode(), wire(OtpNotification(
                    user_id=o.user_id, phone=phone or "", otp=o.otp,
                    expires_at=_at(o.expires_at), transfer_id=o.transfer_id)))
            elif isinstance(o, saga_core.PublishTransferEvent):
                event = TransferEvent(
                    event_id=f"{o.transfer_id}:{o.seq}", transfer_id=o.transfer_id,
                    seq=o.seq, state=o.state, operator_id=t.operator_id,
                    from_account_id=t.from_account_id, to_account_id=t.to_account_id,
                    amount_minor=t.amount_minor, currency=t.currency, occurred_at=_at(o.at),
                    previous_state=o.previous_state, code=o.code)
                # The model kept: the saga engine projects it without parsing it back.
                yield Outbound(self.topics.transfer_events, o.transfer_id.encode(),
                               wire(event), model=event)

    # --- replies --------------------------------------------------------------------

    def reply(
        self, request_id: str, idempotency_key: str | None, command_type: str, status: str,
        code: str | None, message: str | None, data: dict[str, Any] | None, *,
        cache_key: str | None, partition: int | None = None, saves: Saves | None = None,
    ) -> list[Outbound]:
        """A reply to ``request_id``, saved under ``cache_key``: now, in ``partition`` (the
        handled record's: where the purge of that partition finds it), or by the caller
        when ``saves`` collects it."""
        value = reply_value(request_id, command_type, status,
                            idempotency_key=idempotency_key, code=code, message=message,
                            data=data)
        metrics.replied(command_type, status, code)
        if cache_key is not None:
            if saves is not None:
                saves.append((cache_key, value))
            else:
                assert partition is not None, "a reply saved now needs its partition"
                self.replies.put(cache_key, value, at=self.clock(), partition=partition)
        return [Outbound(self.topics.replies, request_id.encode(), value)]

    def reply_error(
        self, request_id: str, idempotency_key: Any, command_type: str, code: ErrorCode,
        message: str, *, data: dict[str, Any] | None = None, cache_key: str | None,
        partition: int | None = None,
    ) -> list[Outbound]:
        """An error reply; what it echoes is bounded (docs/contract.md, "Limits")."""
        key = idempotency_key if isinstance(idempotency_key, str) and 0 < len(
            idempotency_key) <= MAX_ID_CHARS else None
        return self.reply(request_id, key, cut(command_type, MAX_TYPE_CHARS), "error",
                          code.value, cut(message, MAX_REASON_CHARS), data,
                          cache_key=cache_key, partition=partition)

    def replied_before(self, request_id: str, saved: bytes) -> Outbound:
        """A saved reply, sent again as it was."""
        return Outbound(self.topics.replies, request_id.encode(), saved)

    # --- everything else ------------------------------------------------------------

    def dead_letter(self, record: SourceRecord, reason: str) -> Outbound:
        return dead_letter_out(self.topics.dlq, record, reason, _at(self.clock()))

    def saga_input(self, transfer_id: str, partition: int, value: SagaInput) -> Outbound:
        """A saga input for the saga's home partition (explicit partition); the model is
        kept for the saga engine, which decides it in this process when it owns that
        partition."""
        return Outbound(self.topics.saga_inputs, transfer_id.encode(), wire(value),
                        partition=partition, model=value)

    def tick(self, partition: int) -> Outbound:
        return Outbound(self.topics.saga_inputs, b"tick", self._tick, partition=partition)

    def query(self, key: bytes, value: bytes) -> Outbound:
        """An authenticated query (events/queries.py), answered by ``answer_queries``."""
        return Outbound(self.topics.queries, key, value)
