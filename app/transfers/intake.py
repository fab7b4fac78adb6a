"""How does a ``business.commands`` record become a handled request?

Size, JSON and depth checks; the envelope; the record key must be the idempotency key; a
request already answered gets its saved reply again (the reply cache); the payload and the
``sentAt`` are checked (a command older than the retention window is answered only from
what its key keeps); the access token is verified; then the handler of the command's type
(:meth:`app.transfers.commands.CommandHandlers.table`). A refusal becomes an error reply;
a record that fails for its own sake is answered or dead-lettered (:meth:`Intake.poison`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import ValidationError

from app.domain import transfer_saga as saga_core
from app.domain.ports import ReplyCache, SagaRepository
from app.record_failures import (
    MAX_TYPE_CHARS,
    Outbound,
    Poison,
    Refused,
    SourceRecord,
    cut,
    decode_json_object,
    readable_fields,
    readable_id,
    validation_reason,
)
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TokenError
from app.transfers.commands import Handler, NothingKept, Rejection, Request
from app.transfers.handling import Tally, record_identity
from app.transfers.ids import transfer_id_for
from app.transfers.outbound import Outbox
from app.transfers.steps import SagaSteps
from schemas.wire import (
    NEEDS_IDEMPOTENCY_KEY,
    PAYLOAD_MODELS,
    QUERY_COMMANDS,
    CommandEnvelope,
    CommandType,
    ErrorCode,
    WireModel,
)

log = logging.getLogger(__name__)

#: How far ahead of the worker's clock a command's ``sentAt`` may be (clock skew): beyond,
#: ``INVALID_REQUEST``. Unbounded, a future ``sentAt`` would keep a command inside the
#: retention window for ever (a replay after the purge would then be decided again).
MAX_SENT_AT_AHEAD_SECONDS = 300.0


class Intake:
    """The :class:`app.record_failures.RecordHandler` of ``business.commands``."""

    def __init__(
        self, settings: Settings, sagas: SagaRepository, replies: ReplyCache, outbox: Outbox,
        steps: SagaSteps, handlers: dict[CommandType, Handler], access: AccessTokenVerifier,
        policy: saga_core.Policy, tally: Tally, clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.sagas = sagas
        self.replies = replies
        self.outbox = outbox
        self.steps = steps
        self.handlers = handlers
        self.access = access
        self.policy = policy
        self.tally = tally
        self.clock = clock
        self._pin_pepper = settings.pin_pepper.get_secret_value().encode()

    async def decide(self, record: SourceRecord) -> list[Outbound]:
        doc = decode_json_object(record.value)  # size, JSON, object, depth: else Refused
        try:
            envelope = CommandEnvelope.model_validate(doc)
        except ValidationError as exc:
            raise Refused(f"invalid envelope: {validation_reason(exc, name_unknown=True)}",
                          validation_reason(exc)) from None
        # Key = idempotency key, always: a record keyed otherwise (or not at all) lands on a
        # partition whose sagas do not hold this key, and would start a second transfer.
        expected = envelope.idempotency_key or envelope.request_id
        if record.key != expected.encode():
            return self.outbox.reply_error(
                envelope.request_id, envelope.idempotency_key, envelope.type.value,
                ErrorCode.INVALID_REQUEST, "the record key must equal the idempotencyKey "
                "(the requestId for a command without one)", cache_key=None)

        cache_key = f"{envelope.operator_id}\x1f{envelope.request_id}"
        saved = envelope.type not in QUERY_COMMANDS  # a query is answered afresh every time
        cached = await self.replies.get(cache_key) if saved else None
        if cached is not None:
            return await self._answered_before(envelope, cached)
        try:
            return await self._dispatch(envelope, record, cache_key)
        except Rejection as rej:
            return self.outbox.reply_error(
                envelope.request_id, envelope.idempotency_key, envelope.type.value,
                rej.code, rej.message, data=rej.data, cache_key=cache_key if saved else None,
                partition=record.partition,
            )

    def poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        """A command that failed for its own sake. With a readable ``requestId`` (docs/
        contract.md) it is answered: ``INVALID_REQUEST`` when it breaks the contract,
        ``INTERNAL`` (and a dead letter) when its handling failed; without one it is
        dead-lettered. Nothing is saved: a retry is decided afresh."""
        fields = readable_fields(record.value, ("requestId", "type", "idempotencyKey"))
        request_id = readable_id(fields, "requestId")
        command_type = cut(fields.get("type", "unknown"), MAX_TYPE_CHARS)
        idem = readable_id(fields, "idempotencyKey")
        if isinstance(exc, Refused):
            if request_id is None:
                return [self.outbox.dead_letter(record, exc.reason)]
            return self.outbox.reply_error(request_id, idem, command_type,
                                           ErrorCode.INVALID_REQUEST, exc.reply_message,
                                           cache_key=None)
        outputs = [self.outbox.dead_letter(
            record, exc.reason if isinstance(exc, Poison) else "internal error")]
        if request_id is not None:
            outputs += self.outbox.reply(request_id, idem, command_type, "error",
                                         ErrorCode.INTERNAL.value,
                                         "internal error; retry with the same idempotencyKey",
                                         None, cache_key=None)
        return outputs

    async def _answered_before(self, env: CommandEnvelope, cached: bytes) -> list[Outbound]:
        """A request answered before (a gateway retry, a redelivery, a replay): the same
        answer again. The access token must still be genuine and the operator's, but may
        have expired since (a replay from offset 0 comes long after)."""
        try:
            self.access.verify(env.access_token, env.operator_id,
                               datetime.fromtimestamp(self.clock(), UTC), check_expiry=False)
        except TokenError as err:
            return self.outbox.reply_error(env.request_id, env.idempotency_key,
                                           env.type.value, err.code, err.message,
                                           cache_key=None)
        if env.idempotency_key:
            saga = await self.sagas.get(transfer_id_for(env.operator_id, env.idempotency_key))
            if saga is not None and saga.last_trigger in (f"confirm:{env.request_id}",
                                                          f"otp:{env.request_id}"):
                # This request made the saga's last decision: re-send all of it (the
                # transfer event too, not only the reply) in case the crash came between.
                return await self.steps.apply(
                    saga, saga_core.redelivered_outputs(saga, self.clock(), self.policy),
                    changed=False)
        return [self.outbox.replied_before(env.request_id, cached)]

    async def _dispatch(
        self, env: CommandEnvelope, record: SourceRecord, cache_key: str
    ) -> list[Outbound]:
        try:
            payload = PAYLOAD_MODELS[env.type].model_validate(env.payload)
        except ValidationError as exc:
            raise Rejection(ErrorCode.INVALID_REQUEST, validation_reason(exc)) from None
        if env.type in NEEDS_IDEMPOTENCY_KEY and not env.idempotency_key:
            raise Rejection(ErrorCode.INVALID_REQUEST,
                            f"{env.type.value} needs an idempotencyKey")
        now = self.clock()
        if env.type not in QUERY_COMMANDS:
            if env.sent_at.timestamp() > now + MAX_SENT_AT_AHEAD_SECONDS:
                # Its sender's clock is wrong, and such a command would stay inside the
                # retention window forever: answered, not saved (the same request sent
                # again with a right sentAt is handled).
                self.tally.count("requests_sent_in_the_future")
                return self.outbox.reply_error(
                    env.request_id, env.idempotency_key, env.type.value,
                    ErrorCode.INVALID_REQUEST, f"sentAt is more than "
                    f"{MAX_SENT_AT_AHEAD_SECONDS:.0f} s ahead of the business center's clock",
                    cache_key=None)
            if self._stale(env, now):
                return await self._answer_stale(env, payload, record, cache_key)
        return await self._dispatch_current(env, payload, record, cache_key, now)

    async def _answer_stale(self, env: CommandEnvelope, payload: WireModel,
                            record: SourceRecord,
                            cache_key: str) -> list[Outbound]:
        """A command sent before the retention window with no saved reply (an operator
        replay after the purge, a request held back, a gateway whose clock is behind): it
        is answered only from what is kept under its key: its saga (a MANUAL_REVIEW one is
        never purged), handled as a duplicate within the window is (only a verifyOtp for a
        saga still waiting for its OTP, with an access token still valid, is checked), or
        its idempotency record's final outcome. Never a new operation, nor a refusal
        checked now, which could differ from the answer it got the first time. With
        nothing kept it is neither acted on nor answered (counted)."""
        try:
            return await self._dispatch_current(env, payload, record, cache_key,
                                                self.clock(), stale=True)
        except (Rejection, NothingKept):
            self.tally.count("stale_requests_unanswered")
            return []

    async def _dispatch_current(
        self, env: CommandEnvelope, payload: WireModel, record: SourceRecord, cache_key: str,
        now: float, *, stale: bool = False,
    ) -> list[Outbound]:
        try:
            identity = self.access.verify(env.access_token, env.operator_id,
                                          datetime.fromtimestamp(now, UTC), check_expiry=False)
        except TokenError as err:
            raise Rejection(err.code, err.message) from None
        # An expired (but genuine) token may still get the answer to a decision already
        # taken (a redelivery, a replay); it can never take a new one.
        expired = identity.expires_at.timestamp() + self.settings.jwt_leeway_seconds <= now
        return await self.handlers[env.type](
            Request(env, payload, record.partition, cache_key, expired=expired, stale=stale,
                    record_id=record_identity(record, self._pin_pepper)))

    def _stale(self, env: CommandEnvelope, now: float) -> bool:
        """Sent before the retention window (and not answered from a saved reply): its
        duplicates may no longer be recognised by the purged tables (``_answer_stale``)."""
        return env.sent_at.timestamp() < now - self.settings.idempotency_retention_hours * 3600
