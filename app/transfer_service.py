"""The service layer of the business center: one call per consumed message.

Decodes and validates the wire message, authenticates, asks the ports (user directory,
PIN, token uses, daily limit), runs the pure saga and returns the messages to send. The
Faust agents only move bytes between Kafka and these methods, so the whole flow is
testable with in-memory fakes.

Order inside one message, which is what makes a crash between two writes harmless:
decide (pure) → PostgreSQL effects (idempotent) → saga table write → sends. A
redelivered message finds the saga written (and re-sends what was decided) or not
written (and decides the same thing again: every PostgreSQL effect is idempotent per
transfer and every output id is deterministic).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from app import metrics, saga_telemetry
from app.domain import otp as otp_codes
from app.domain import pin as pin_codes
from app.domain import transfer_saga as saga_core
from app.domain.ports import (
    BusinessStore,
    ConfirmChecks,
    ConfirmOutcome,
    ConfirmRequest,
    GuessBudgets,
    UserStatus,
)
from app.domain.resolution_signing import resolution_signed
from app.record_failures import (
    MAX_ID_CHARS,
    MAX_REASON_CHARS,
    MAX_TYPE_CHARS,
    Handler,
    Outbound,
    Poison,
    RecordGuard,
    Refused,
    SourceRecord,
    cut,
    dead_letter_out,
    decode_json_object,
    describe,
    is_outage,
    readable_fields,
    readable_id,
    validation_reason,
)
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TokenError, TransferTokens
from events.queries import query_record
from schemas.wire import (
    NEEDS_IDEMPOTENCY_KEY,
    PAYLOAD_MODELS,
    QUERY_COMMANDS,
    AccountEvent,
    CommandEnvelope,
    ErrorCode,
    FundingEvent,
    OperatorResolution,
    SagaInput,
    TopUpPayload,
    TransferConfirmPayload,
    TransferInitPayload,
    VerifyOtpPayload,
)

log = logging.getLogger(__name__)

#: The partition of the record being handled (where its table writes land). A context
#: variable, not an attribute: the saga agent handles records of different partitions
#: concurrently, each in its own task (agents/lanes.py).
_handled_partition: ContextVar[int] = ContextVar("handled_partition", default=0)
#: The coordinates (topic/partition/offset) of the ``business.commands`` record being
#: handled: what a Kafka redelivery keeps and a client cannot vary (a wrong PIN counts once
#: per record). None for a record that was not consumed (offset unknown).
_handled_record: ContextVar[str | None] = ContextVar("handled_record", default=None)

#: Namespaces of the deterministic ids (UUIDv5): the same input always yields the same id.
TRANSFER_NS = uuid.UUID("6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01")
TOKEN_NS = uuid.UUID("0b9e3c44-7d1a-4f0e-8f3a-5c2d7e9b1a02")
#: Attempt ids of top-ups (transfers derive theirs from the transfer token's jti).
ATTEMPT_NS = uuid.UUID("9d4f2b7a-3c1e-4a8b-b6d2-7e0f5a9c1d03")


def attempt_for(transfer_id: str, nonce: str) -> str:
    """16 hex digits unique to one attempt of a key: the token's jti for a transfer, the
    first request for a top-up. Kept in the idempotency record: every re-decision of the
    key uses the first attempt's id."""
    return uuid.uuid5(ATTEMPT_NS, f"{transfer_id}\x1f{nonce}").hex[:saga_core.ATTEMPT_CHARS]


def transfer_id_for(operator_id: str, idempotency_key: str) -> str:
    """The transfer id is the scoped idempotency key, hashed: the saga table's key."""
    return str(uuid.uuid5(TRANSFER_NS, f"{operator_id}\x1f{idempotency_key}"))


#: The steps whose commands go to the account center, and to the funding provider: an
#: event answering anything else is not an answer to this service.
ACCOUNT_STEPS = frozenset({"debit", "credit", "refund"})
FUNDING_STEPS = frozenset({"charge"})
#: The longest a saga whose tick failed waits before it is tried again.
TICK_RETRY_MAX_SECONDS = 60.0

__all__ = ["Outbound", "Rejection", "Topics", "TransferService", "transfer_id_for"]


@dataclass(frozen=True, slots=True)
class Topics:
    commands: str
    replies: str
    account_commands: str
    account_events: str
    otp: str
    transfer_events: str
    dlq: str
    saga_inputs: str
    funding_commands: str
    funding_events: str
    queries: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        t = settings.topic
        return cls(
            commands=t("business.commands"), replies=t("business.replies"),
            account_commands=t("account.commands"), account_events=t("account.events"),
            otp=t("notifications.otp"), transfer_events=t("business.transfer-events"),
            dlq=t("business.dlq"), saga_inputs=t("business.saga-inputs"),
            funding_commands=t("funding.commands"), funding_events=t("funding.events"),
            queries=t("business.queries"),
        )


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


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _wire_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {k: iso(v) if k.endswith("At") and isinstance(v, float) else v
            for k, v in data.items()}


#: How far ahead of the worker's clock a command's ``sentAt`` may be (clock skew): beyond,
#: ``INVALID_REQUEST``. Unbounded, a future ``sentAt`` would keep a command inside the
#: retention window for ever (a replay after the purge would then be decided again).
MAX_SENT_AT_AHEAD_SECONDS = 300.0


class _NothingKept(Exception):
    """A stale request (older than the retention window) with nothing kept to answer it."""


class Rejection(Exception):
    """A request refused before any saga exists: becomes an error reply."""

    def __init__(self, code: ErrorCode, message: str, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class TransferService:
    def __init__(
        self,
        settings: Settings,
        store: BusinessStore,
        sagas: SagaRepository,
        replies: ReplyCache,
        *,
        clock: Callable[[], float],
        new_otp: Callable[[], str] = otp_codes.generate_otp,
        access: AccessTokenVerifier | None = None,
        transfer_tokens: TransferTokens | None = None,
        pause: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.store = store
        self.sagas = sagas
        self.replies = replies
        self.clock = clock
        self.new_otp = new_otp
        self.access = access or AccessTokenVerifier.from_settings(settings)
        self.transfer_tokens = transfer_tokens or TransferTokens.from_settings(settings)
        self.policy = saga_core.Policy(
            otp_ttl_seconds=settings.otp_ttl_seconds,
            otp_max_attempts=settings.otp_max_attempts,
            otp_pepper=settings.otp_pepper.get_secret_value().encode(),
            command_timeout_seconds=settings.account_command_timeout_seconds,
            command_max_backoff_seconds=settings.account_command_max_backoff_seconds,
            funding_timeout_seconds=settings.funding_timeout_seconds,
        )
        self._pin_pepper = settings.pin_pepper.get_secret_value().encode()
        self._operator_secret = settings.operator_secret.get_secret_value().encode()
        self.budgets = GuessBudgets(
            pin_max_attempts=settings.pin_max_attempts,
            pin_lock_seconds=settings.pin_lock_seconds,
            otp_max_failures=settings.otp_user_max_failures,
            otp_failure_window_seconds=settings.otp_failure_window_seconds,
            otp_max_sends=settings.otp_max_sends,
            otp_send_window_seconds=settings.otp_send_window_seconds,
        )
        # Deadlines of the open sagas, per home partition: derived, rebuilt by scanning.
        self._deadlines: dict[int, dict[str, float]] = {}
        self._next_purge: dict[int, float] = {}
        self._tick_failures: dict[str, int] = {}
        #: The poison/outage rule of every consumer of the worker (app/record_failures.py).
        self.guard = RecordGuard(dlq_topic=self.topics.dlq,
                                 partitions=settings.topic_partitions, clock=clock, pause=pause)
        #: Records set aside or ignored for what they hold: foreign ids, misrouted inputs.
        self.counters: Counter[str] = Counter()
        #: Called with every valid account event before it is relayed (the query tables).
        self.account_event_listeners: list[Callable[[AccountEvent], object]] = []
        # One handler per consumed topic: how a record is decided, and answered as poison.
        self.commands = Handler(self._decide_command, self._command_poison)
        self.saga_inputs = Handler(self._decide_saga_input, self._dead_letter_poison)
        self.account_events = Handler(self._decide_account_event, self._dead_letter_poison)
        self.funding_events = Handler(self._decide_funding_event, self._dead_letter_poison)

    # ----------------------------------------------------------------------------------
    # business.commands
    # ----------------------------------------------------------------------------------

    async def handle_command(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``business.commands`` record, through the guard (an outage
        retried, poison answered): what the saga agent sends."""
        record = SourceRecord(self.topics.commands, partition, offset, key, raw)
        return await self.guard.decide(record, self.commands)

    async def _decide_command(self, record: SourceRecord) -> list[Outbound]:
        _handled_partition.set(record.partition)
        _handled_record.set(_record_identity(record, self._pin_pepper))
        doc = decode_json_object(record.value)  # size, JSON, object, depth: else Refused
        try:
            envelope = CommandEnvelope.model_validate(doc)
        except ValidationError as exc:
            raise Refused(f"invalid envelope: {_validation_message(exc, name_unknown=True)}",
                          _validation_message(exc)) from None
        # Key = idempotency key, always: a record keyed otherwise (or not at all) lands on a
        # partition whose sagas do not hold this key, and would start a second transfer.
        expected = envelope.idempotency_key or envelope.request_id
        if record.key != expected.encode():
            return self._reply_error(
                envelope.request_id, envelope.idempotency_key, envelope.type.value,
                ErrorCode.INVALID_REQUEST, "the record key must equal the idempotencyKey "
                "(the requestId for a command without one)", cache_key=None)

        cache_key = f"{envelope.operator_id}\x1f{envelope.request_id}"
        saved = envelope.type not in QUERY_COMMANDS  # a query is answered afresh every time
        cached = self.replies.get(cache_key) if saved else None
        if cached is not None:
            return await self._answered_before(envelope, cached)
        try:
            return await self._dispatch(envelope, record.partition, cache_key)
        except Rejection as rej:
            return self._reply_error(
                envelope.request_id, envelope.idempotency_key, envelope.type.value,
                rej.code, rej.message, data=rej.data, cache_key=cache_key if saved else None,
            )

    def _command_poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
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
                return [self._dead_letter(record, exc.reason)]
            return self._reply_error(request_id, idem, command_type, ErrorCode.INVALID_REQUEST,
                                     exc.reply_message, cache_key=None)
        outputs = [self._dead_letter(
            record, exc.reason if isinstance(exc, Poison) else "internal error")]
        if request_id is not None:
            outputs += self._reply(request_id, idem, command_type, "error",
                                   ErrorCode.INTERNAL.value,
                                   "internal error; retry with the same idempotencyKey", None,
                                   cache_key=None)
        return outputs

    def _dead_letter_poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        reason = exc.reason if isinstance(exc, Poison) else f"internal error ({describe(exc)})"
        return [self._dead_letter(record, reason)]

    async def _answered_before(self, env: CommandEnvelope, cached: bytes) -> list[Outbound]:
        """A request answered before (a gateway retry, a redelivery, a replay): the same
        answer again. The access token must still be genuine and the operator's, but may
        have expired since (a replay from offset 0 comes long after)."""
        try:
            self.access.verify(env.access_token, env.operator_id,
                               datetime.fromtimestamp(self.clock(), UTC), check_expiry=False)
        except TokenError as err:
            return self._reply_error(env.request_id, env.idempotency_key, env.type.value,
                                     err.code, err.message, cache_key=None)
        if env.idempotency_key:
            saga = self.sagas.get(transfer_id_for(env.operator_id, env.idempotency_key))
            if saga is not None and saga.last_trigger in (f"confirm:{env.request_id}",
                                                          f"otp:{env.request_id}"):
                # This request made the saga's last decision: re-send all of it (the
                # transfer event too, not only the reply) in case the crash came between.
                return await self._apply(
                    saga, saga_core.redelivered_outputs(saga, self.clock(), self.policy),
                    changed=False)
        return [Outbound(self.topics.replies, env.request_id.encode(), cached)]

    async def _dispatch(
        self, env: CommandEnvelope, partition: int, cache_key: str
    ) -> list[Outbound]:
        try:
            payload = PAYLOAD_MODELS[env.type].model_validate(env.payload)
        except ValidationError as exc:
            raise Rejection(ErrorCode.INVALID_REQUEST, _validation_message(exc)) from None
        if env.type in NEEDS_IDEMPOTENCY_KEY and not env.idempotency_key:
            raise Rejection(ErrorCode.INVALID_REQUEST,
                            f"{env.type.value} needs an idempotencyKey")
        now = self.clock()
        if env.type not in QUERY_COMMANDS:
            if env.sent_at.timestamp() > now + MAX_SENT_AT_AHEAD_SECONDS:
                # Its sender's clock is wrong, and such a command would stay inside the
                # retention window forever: answered, not saved (the same request sent
                # again with a right sentAt is handled).
                self._count("requests_sent_in_the_future")
                return self._reply_error(
                    env.request_id, env.idempotency_key, env.type.value,
                    ErrorCode.INVALID_REQUEST, f"sentAt is more than "
                    f"{MAX_SENT_AT_AHEAD_SECONDS:.0f} s ahead of the business center's clock",
                    cache_key=None)
            if self._stale(env, now):
                return await self._answer_stale(env, payload, partition, cache_key)
        return await self._dispatch_current(env, payload, partition, cache_key, now)

    async def _answer_stale(self, env: CommandEnvelope, payload: Any, partition: int,
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
            return await self._dispatch_current(env, payload, partition, cache_key,
                                                self.clock(), stale=True)
        except (Rejection, _NothingKept):
            self._count("stale_requests_unanswered")
            return []

    async def _dispatch_current(
        self, env: CommandEnvelope, payload: Any, partition: int, cache_key: str,
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
        if env.type in QUERY_COMMANDS:
            _refuse_if(expired)
            user = await self._active_user(env.operator_id)
            key_, value = query_record(env, payload, user.account_id, user.currency)
            return [Outbound(self.topics.queries, key_, value)]  # answered by answer_queries
        if isinstance(payload, TransferInitPayload):
            if stale:
                raise _NothingKept  # an init leaves nothing but its saved reply
            _refuse_if(expired)
            return await self._transfer_init(env, payload, cache_key)
        if isinstance(payload, TransferConfirmPayload):
            return await self._transfer_confirm(env, payload, partition, expired, stale)
        if isinstance(payload, TopUpPayload):
            return await self._top_up(env, payload, partition, expired, stale)
        assert isinstance(payload, VerifyOtpPayload)
        return await self._verify_otp(env, payload, expired, stale)

    async def _transfer_init(
        self, env: CommandEnvelope, payload: TransferInitPayload, cache_key: str
    ) -> list[Outbound]:
        now = self.clock()
        facts = await self.store.init_facts(env.operator_id, payload.to_account_id, _day(now))
        user = facts.user
        if user is None or user.status is not UserStatus.ACTIVE:
            raise Rejection(ErrorCode.FORBIDDEN, "the user is unknown or blocked")
        if payload.currency != user.currency:
            raise Rejection(ErrorCode.INVALID_REQUEST, f"the account holds {user.currency}")
        if payload.to_account_id == user.account_id:
            raise Rejection(ErrorCode.INVALID_REQUEST, "cannot transfer to the same account")
        if not facts.payee_exists:
            raise Rejection(ErrorCode.ACCOUNT_NOT_FOUND, "the payee account does not exist")
        if facts.payee_currency is not None and facts.payee_currency != payload.currency:
            raise Rejection(ErrorCode.CURRENCY_MISMATCH,
                            f"the payee account holds {facts.payee_currency}")
        reserved = facts.reserved_today_minor
        if reserved + payload.amount_minor > user.daily_limit_minor:
            raise Rejection(ErrorCode.LIMIT_EXCEEDED, "the amount exceeds today's limit",
                            {"remainingMinor": max(0, user.daily_limit_minor - reserved)})
        # The jti is derived from the request: a replayed or retried init can never mint a
        # second token able to fund another transfer.
        jti = str(uuid.uuid5(TOKEN_NS, f"{env.operator_id}\x1f{env.request_id}"))
        token, expires_at = self.transfer_tokens.issue(
            jti=jti, operator_id=env.operator_id, from_account_id=user.account_id,
            to_account_id=payload.to_account_id, amount_minor=payload.amount_minor,
            currency=payload.currency, note=payload.note,
            now=datetime.fromtimestamp(now, UTC),
        )
        data = {
            "transferToken": token,
            "expiresAt": expires_at.isoformat().replace("+00:00", "Z"),
            "otpRequired": payload.amount_minor > user.otp_threshold_minor,
        }
        return self._reply(env.request_id, None, env.type.value, "ok", None, None, data,
                           cache_key=cache_key)

    async def _active_user(self, user_id: str) -> Any:
        user = await self.store.get_user(user_id)
        if user is None or user.status is not UserStatus.ACTIVE:
            raise Rejection(ErrorCode.FORBIDDEN, "the user is unknown or blocked")
        return user

    async def _transfer_confirm(
        self, env: CommandEnvelope, payload: TransferConfirmPayload, partition: int,
        access_expired: bool = False, stale: bool = False,
    ) -> list[Outbound]:
        assert env.idempotency_key is not None
        now = self.clock()
        now_dt = datetime.fromtimestamp(now, UTC)
        try:
            # Expiry is checked only for a new saga: a duplicate of an old confirm must
            # still get its saved reply.
            claims = self.transfer_tokens.verify(payload.transfer_token, now_dt,
                                                 check_expiry=False)
        except TokenError as err:
            raise Rejection(err.code, err.message) from None
        if claims.operator_id != env.operator_id:
            raise Rejection(ErrorCode.FORBIDDEN, "the transfer token belongs to another user")
        fingerprint = _fingerprint(claims.jti, claims.from_account_id, claims.to_account_id,
                                   claims.amount_minor, claims.currency)
        transfer_id, answered = await self._duplicate_of(env, fingerprint, now)
        if answered is not None:
            return answered
        if stale:
            return await self._kept_only(env, fingerprint)
        _refuse_if(access_expired)

        leeway = self.settings.jwt_leeway_seconds
        if now > claims.expires_at.timestamp() + leeway:
            # A key whose saga was purged: the kept idempotency record answers, never an
            # expired token (and never another operation's outcome).
            kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
            if kept is not None and (kept.state is not None
                                     or kept.fingerprint != fingerprint):
                return self._kept_answer(env, fingerprint, kept)
            raise Rejection(ErrorCode.TOKEN_EXPIRED, "the transfer token has expired")
        checks = await self.store.confirm_checks(ConfirmRequest(
            user_id=env.operator_id, idempotency_key=env.idempotency_key,
            fingerprint=fingerprint, transfer_id=transfer_id,
            attempt=attempt_for(transfer_id, claims.jti),
            matches=lambda verifier: pin_codes.pin_matches(
                self._pin_pepper, env.operator_id, payload.pin, verifier),
            record=_handled_record.get(), day=_day(now), now=now_dt,
            amount_minor=claims.amount_minor, from_account_id=claims.from_account_id,
            jti=claims.jti,
        ), self.budgets)
        user = self._checked(env, fingerprint, checks)
        if isinstance(user, list):
            return user
        transfer = saga_core.Transfer(
            transfer_id=transfer_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=claims.from_account_id, to_account_id=claims.to_account_id,
            amount_minor=claims.amount_minor, currency=claims.currency, note=claims.note,
            home_partition=partition, attempt=checks.attempt,
        )
        needs_otp = claims.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            transfer, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self._apply(saga, outputs, phone=user.phone)

    def _checked(self, env: CommandEnvelope, fingerprint: str, checks: ConfirmChecks
                 ) -> Any:
        """The user a new operation may start for, or the answer when the checks refused
        it (a :class:`Rejection`) or its key already ended (the kept outcome)."""
        if checks.outcome is ConfirmOutcome.ANSWERED:
            assert checks.kept is not None
            return self._kept_answer(env, fingerprint, checks.kept)
        if checks.outcome is not ConfirmOutcome.OK:
            code, message = CONFIRM_REFUSALS[checks.outcome]
            raise Rejection(code, message, {"attemptsLeft": checks.attempts_left}
                            if checks.outcome is ConfirmOutcome.INVALID_PIN else None)
        assert checks.user is not None
        return checks.user

    def _kept_answer(self, env: CommandEnvelope, fingerprint: str, kept: Any
                     ) -> list[Outbound]:
        """The answer of an idempotency record whose saga was purged: the same payload gets
        the operation's final outcome (saved for this request), another one
        IDEMPOTENCY_KEY_REUSED."""
        if kept.fingerprint != fingerprint:
            raise Rejection(*CONFIRM_REFUSALS[ConfirmOutcome.KEY_REUSED])
        assert kept.state is not None
        reply = saga_core.final_reply(kept.transfer_id, kept.state, kept.code,
                                      env.request_id, env.type.value)
        return self._reply(reply.request_id, env.idempotency_key, reply.command_type,
                           reply.status, reply.code, reply.message, reply.data,
                           cache_key=f"{env.operator_id}\x1f{env.request_id}")

    def _stale(self, env: CommandEnvelope, now: float) -> bool:
        """Sent before the retention window (and not answered from a saved reply): its
        duplicates may no longer be recognised by the purged tables (``_answer_stale``)."""
        return env.sent_at.timestamp() < now - self.settings.idempotency_retention_hours * 3600

    async def _kept_only(self, env: CommandEnvelope, fingerprint: str) -> list[Outbound]:
        """The answer of a stale request whose key has no saga: its idempotency record's
        final outcome, else nothing (:class:`_NothingKept`)."""
        assert env.idempotency_key is not None
        kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
        if kept is None or kept.state is None:
            raise _NothingKept
        return self._kept_answer(env, fingerprint, kept)

    async def _duplicate_of(
        self, env: CommandEnvelope, fingerprint: str, now: float
    ) -> tuple[str, list[Outbound] | None]:
        """The saga id of this scoped idempotency key, and the answer when a saga already
        exists under it: the same payload gets that saga's answer, another payload
        IDEMPOTENCY_KEY_REUSED. ``None`` when the key is new."""
        assert env.idempotency_key is not None
        saga_id = transfer_id_for(env.operator_id, env.idempotency_key)
        existing = self.sagas.get(saga_id)
        if saga_core.classify(existing, fingerprint) is saga_core.Duplicate.REUSED:
            raise Rejection(ErrorCode.IDEMPOTENCY_KEY_REUSED,
                            "this idempotencyKey was used for another operation")
        if existing is None:
            return saga_id, None
        saga, outputs = saga_core.on_duplicate_confirm(existing, env.request_id, now,
                                                       self.policy)
        return saga_id, await self._apply(saga, outputs, changed=False)

    async def _top_up(
        self, env: CommandEnvelope, payload: TopUpPayload, partition: int,
        access_expired: bool, stale: bool = False,
    ) -> list[Outbound]:
        """Pull money from the user's linked bank account or card: the same saga and the
        same idempotency rules as a transfer, with the funding source as the payer."""
        assert env.idempotency_key is not None
        now = self.clock()
        fingerprint = _fingerprint("topUp", payload.funding_source_id, payload.amount_minor,
                                   payload.currency)
        topup_id, answered = await self._duplicate_of(env, fingerprint, now)
        if answered is not None:
            return answered
        if stale:
            return await self._kept_only(env, fingerprint)
        _refuse_if(access_expired)
        user = await self._active_user(env.operator_id)
        source = await self.store.get_funding_source(payload.funding_source_id)
        if (source is None or source.user_id != user.user_id
                or source.status is not UserStatus.ACTIVE):
            raise Rejection(ErrorCode.FORBIDDEN, "the funding source is unknown or not yours")
        if payload.currency != user.currency:
            raise Rejection(ErrorCode.INVALID_REQUEST, f"the account holds {user.currency}")
        # Confirmed with the PIN exactly like a transfer, and counted against the daily
        # top-up limit (one transaction, docs/architecture.md "Security").
        checks = await self.store.confirm_checks(ConfirmRequest(
            user_id=env.operator_id, idempotency_key=env.idempotency_key,
            fingerprint=fingerprint, transfer_id=topup_id,
            attempt=attempt_for(topup_id, env.request_id),
            matches=lambda verifier: pin_codes.pin_matches(
                self._pin_pepper, env.operator_id, payload.pin, verifier),
            record=_handled_record.get(), day=_day(now),
            now=datetime.fromtimestamp(now, UTC), amount_minor=payload.amount_minor,
            kind=saga_core.TOPUP, limit_minor=self.settings.topup_daily_limit_minor,
        ), self.budgets)
        checked = self._checked(env, fingerprint, checks)
        if isinstance(checked, list):
            return checked
        user = checked
        topup = saga_core.Transfer(
            transfer_id=topup_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=source.funding_source_id, to_account_id=user.account_id,
            amount_minor=payload.amount_minor, currency=payload.currency, note=None,
            home_partition=partition, kind=saga_core.TOPUP, attempt=checks.attempt,
        )
        needs_otp = payload.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            topup, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self._apply(saga, outputs, phone=user.phone)

    async def _verify_otp(
        self, env: CommandEnvelope, payload: VerifyOtpPayload, access_expired: bool = False,
        stale: bool = False,
    ) -> list[Outbound]:
        assert env.idempotency_key is not None
        saga = self.sagas.get(transfer_id_for(env.operator_id, env.idempotency_key))
        if saga is None:
            if stale:  # the transfer's final outcome, if its record kept one
                kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
                if kept is None or kept.state is None:
                    raise _NothingKept
                return self._kept_answer(env, kept.fingerprint, kept)
            _refuse_if(access_expired)
            raise Rejection(ErrorCode.INVALID_REQUEST,
                            "no transfer under this idempotencyKey awaits a one-time password")
        fresh = (saga.state is saga_core.State.AWAITING_OTP
                 and saga.last_trigger != f"otp:{env.request_id}")
        _refuse_if(access_expired and fresh)
        now = self.clock()
        now_dt = datetime.fromtimestamp(now, UTC)
        spent = False
        if fresh:  # the user's wrong OTPs across transfers, in the rolling window
            since = now_dt - timedelta(seconds=self.budgets.otp_failure_window_seconds)
            spent = (await self.store.otp_failures_since(env.operator_id, since)
                     >= self.budgets.otp_max_failures)
        new, outputs = saga_core.on_otp(saga, env.request_id, payload.otp, now,
                                        self.policy, budget_spent=spent)
        if new.otp_attempts > saga.otp_attempts:  # a wrong OTP: counted once per attempt
            await self.store.record_otp_failure(
                env.operator_id, f"{saga.transfer.transfer_id}:{new.otp_attempts}", now_dt)
        return await self._apply(new, outputs, changed=new is not saga)

    # ----------------------------------------------------------------------------------
    # account.events → business.saga-inputs (the relay) and the saga inputs themselves
    # ----------------------------------------------------------------------------------

    def route_account_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``account.events`` record, through the guard."""
        record = SourceRecord(self.topics.account_events, partition, offset, key, raw)
        return self.guard.decide_now(record, self._relay_account_event, self.account_events)

    async def _decide_account_event(self, record: SourceRecord) -> list[Outbound]:
        return self._relay_account_event(record)

    def _relay_account_event(self, record: SourceRecord) -> list[Outbound]:
        """Forward an account event to the partition where its saga lives, if it answers a
        command of this service: ``<uuid>:debit|credit|refund:<partition in range>``.
        Events of other services' commands are normal on this shared topic: counted,
        never relayed. One shaped like ours but naming a partition that does not exist is
        dead-lettered."""
        doc = decode_json_object(record.value)
        try:
            event = AccountEvent.model_validate(doc)
        except ValidationError as exc:
            raise Refused("invalid account event: "
                          + _validation_message(exc, name_unknown=True)) from None
        if record.key != event.account_id.encode():
            # Not from the account center (it keys by account): its table writes would land
            # in another partition than the account's, and it answers nothing of ours.
            self._count("miskeyed_account_events")
            raise Refused("the record key is not the event's accountId")
        for listener in self.account_event_listeners:
            listener(event)
        home = self._home_of(event.command_id, ACCOUNT_STEPS, "foreign_account_events")
        if home is None:
            return []
        transfer_id, partition = home
        value = SagaInput(kind="accountEvent", account_event=event)
        return [Outbound(self.topics.saga_inputs, transfer_id.encode(),
                         orjson.dumps(value.to_wire()), partition=partition)]

    def route_funding_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``funding.events`` record, through the guard."""
        record = SourceRecord(self.topics.funding_events, partition, offset, key, raw)
        return self.guard.decide_now(record, self._relay_funding_event, self.funding_events)

    async def _decide_funding_event(self, record: SourceRecord) -> list[Outbound]:
        return self._relay_funding_event(record)

    def _relay_funding_event(self, record: SourceRecord) -> list[Outbound]:
        """Forward a funding provider's event to the partition where its top-up lives. The
        topic answers this service only: an event for any other charge id is
        dead-lettered."""
        doc = decode_json_object(record.value)
        try:
            event = FundingEvent.model_validate(doc)
        except ValidationError as exc:
            raise Refused("invalid funding event: "
                          + _validation_message(exc, name_unknown=True)) from None
        home = self._home_of(event.charge_id, FUNDING_STEPS, "foreign_funding_events")
        if home is None:
            raise Refused("not a charge of this service")
        transfer_id, partition = home
        value = SagaInput(kind="fundingEvent", funding_event=event)
        return [Outbound(self.topics.saga_inputs, transfer_id.encode(),
                         orjson.dumps(value.to_wire()), partition=partition)]

    def _home_of(self, command_id: str, steps: frozenset[str], foreign: str
                 ) -> tuple[str, int] | None:
        """``(transferId, home partition)`` of a command id this service issued; None (and
        counted as ``foreign``) for any other; :class:`Refused` when it names a partition
        that does not exist."""
        parsed = saga_core.parse_command_id(command_id)
        if parsed is None or parsed[1] not in steps or not _is_transfer_id(parsed[0]):
            self._count(foreign)
            return None
        transfer_id, _step, home = parsed
        if not 0 <= home < self.settings.topic_partitions:
            self._count("out_of_range_ids")
            raise Refused(f"foreign id: it names partition {home}, which does not exist "
                          f"({self.settings.topic_partitions} partitions)")
        return transfer_id, home

    def tick(self, partition: int) -> Outbound:
        return Outbound(self.topics.saga_inputs, b"tick",
                        orjson.dumps({"kind": "tick"}), partition=partition)

    async def handle_saga_input(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """The outputs of one ``business.saga-inputs`` record, through the guard."""
        record = SourceRecord(self.topics.saga_inputs, partition, offset, key, raw)
        return await self.guard.decide(record, self.saga_inputs)

    async def _decide_saga_input(self, record: SourceRecord) -> list[Outbound]:
        _handled_partition.set(record.partition)
        doc = decode_json_object(record.value)
        try:
            item = SagaInput.model_validate(doc)
        except ValidationError as exc:
            if doc.get("kind") == "operatorResolution":
                self._count("refused_resolutions")  # unsigned, or an operator/reason refused
            raise Refused("invalid saga input: "
                          + _validation_message(exc, name_unknown=True)) from None
        if item.kind == "tick":
            return await self._on_tick(record.partition)
        if item.kind == "operatorResolution":
            if item.resolution is None:
                raise Refused("invalid saga input: resolution missing")
            return await self._on_resolution(item.resolution, record)
        if item.kind == "fundingEvent":
            if item.funding_event is None:
                raise Refused("invalid saga input: fundingEvent missing")
            return await self._on_funding_event(item.funding_event, record)
        if item.account_event is None:
            raise Refused("invalid saga input: accountEvent missing")
        return await self._on_account_event(item.account_event, record)

    async def _on_resolution(self, resolution: OperatorResolution, record: SourceRecord
                             ) -> list[Outbound]:
        """An operator's resolution of a MANUAL_REVIEW saga (``bizcenter sagas resolve``,
        cli/operator_commands.py), on the saga's home partition. Its signature (HMAC-SHA256
        under BIZ_OPERATOR_SECRET over every field that decides anything) is checked in
        constant time before the saga sees it: without it anyone able to produce to the
        topic could move money out of clearing. A forged one is counted and dead-lettered,
        nothing moves; then the pure saga decides."""
        if not resolution_signed(
                self._operator_secret, resolution.signature,
                transfer_id=resolution.transfer_id, resolution_id=resolution.resolution_id,
                number=resolution.number, action=resolution.action,
                operator=resolution.operator, reason=resolution.reason):
            self._count("refused_resolutions")
            log.error("an operator resolution of %r without a valid signature: refused, "
                      "dead-lettered", resolution.transfer_id,
                      extra={"transferId": resolution.transfer_id})
            raise Refused("operator resolution: invalid signature")
        ids = {"transferId": resolution.transfer_id, "operatorId": resolution.operator}
        saga = self.sagas.get(resolution.transfer_id)
        if saga is None or saga.transfer.home_partition != record.partition:
            log.warning("resolution of %s ignored: no such saga on partition %s",
                        resolution.transfer_id, record.partition, extra=ids)
            return []
        new, outputs = saga_core.on_resolution(
            saga, resolution.resolution_id, resolution.number, resolution.action,
            resolution.operator, resolution.reason, self.clock(), self.policy)
        if new is saga and not outputs:
            log.warning("resolution %s of %s ignored: the saga is %s", resolution.action,
                        resolution.transfer_id, saga.state.value, extra=ids)
        return await self._apply(new, outputs, changed=new is not saga)

    def _routed_here(self, command_id: str, record: SourceRecord) -> str | None:
        """The transfer id of a relayed event, if its id names this record's partition:
        the relay sends nothing anywhere else, so any other record was not relayed by
        this service (counted, ignored)."""
        parsed = saga_core.parse_command_id(command_id)
        if parsed is None or parsed[2] != record.partition:
            self._count("misrouted_saga_inputs")
            return None
        return parsed[0]

    def _saga(self, transfer_id: str) -> saga_core.Saga | None:
        saga = self.sagas.get(transfer_id)
        if saga is None:
            self._count("unknown_transfer_events")
        return saga

    def _count(self, what: str) -> None:
        """Count a record ignored or set aside for what it holds; logged at 1, 2, 4, 8, ...
        (an operator sees it happen without a line per record)."""
        self.counters[what] += 1
        n = self.counters[what]
        log.debug("%s: one more (%d)", what.replace("_", " "), n)
        if n & (n - 1) == 0:
            log.info("%s: %d so far", what.replace("_", " "), n)

    async def _on_account_event(self, event: AccountEvent, record: SourceRecord
                                ) -> list[Outbound]:
        transfer_id = self._routed_here(event.command_id, record)
        if event.reason == saga_core.COMMAND_ID_CONFLICT:
            # Someone sent one of our command ids with other content: the account center
            # refused it (and alarmed); the id's own event stands. Never a decision.
            self._count("command_id_conflicts")
            log.error("account center refused a command sent with our id %s and other "
                      "content (COMMAND_ID_CONFLICT): ignored", event.command_id)
            return []
        saga = None if transfer_id is None else self._saga(transfer_id)
        if saga is None:
            return []
        new, outputs = saga_core.on_account_event(
            saga, event.command_id, event.type.value, event.reason, self.clock(), self.policy
        )
        return await self._apply(new, outputs, changed=new is not saga)

    async def _on_funding_event(self, event: FundingEvent, record: SourceRecord
                                ) -> list[Outbound]:
        transfer_id = self._routed_here(event.charge_id, record)
        if transfer_id is None:
            return []
        saga = self._saga(transfer_id)
        if saga is None:
            if event.status != "captured":
                return []
            # Money was taken from a source for a top-up nobody knows (purged long ago):
            # nothing may be lost, so operators get it.
            return [self._dead_letter(
                record, f"capture {event.charge_id} for an unknown top-up: give it back to "
                "the source by hand")]
        new, outputs = saga_core.on_funding_event(saga, event.charge_id, event.status,
                                                  self.clock(), self.policy)
        return await self._apply(new, outputs, changed=new is not saga)

    async def _on_tick(self, partition: int) -> list[Outbound]:
        """Every due saga of the partition, each on its own: a saga whose step fails (the
        database is away, a bug) is left exactly as it was, nothing written and nothing to
        send, and tried again after a back-off; the other sagas' steps are written and
        their outputs returned together, so no state is kept whose outputs were dropped."""
        now = self.clock()
        self._purge_if_due(partition, now)  # first: if it fails, no saga has moved yet
        index = self._deadlines_of(partition)
        due = [tid for tid, at in index.items() if at <= now]
        sends: list[Outbound] = []
        for transfer_id in due:
            try:
                saga = self.sagas.get(transfer_id)
                if saga is None:
                    index.pop(transfer_id, None)
                    continue
                new, outputs = saga_core.on_tick(saga, now, self.policy)
                sends.extend(await self._apply(new, outputs, changed=new is not saga))
                self._tick_failures.pop(transfer_id, None)
            except Exception as exc:
                failures = self._tick_failures[transfer_id] = (
                    self._tick_failures.get(transfer_id, 0) + 1)
                delay = min(2.0 ** (failures - 1), TICK_RETRY_MAX_SECONDS)
                index[transfer_id] = now + delay
                log.warning("saga %s: its timer step failed (%s); it is unchanged and tried "
                            "again in %.0fs", transfer_id, describe(exc), delay,
                            exc_info=not is_outage(exc), extra={"transferId": transfer_id})
        return sends

    def _purge_if_due(self, partition: int, now: float) -> None:
        """Forget what duplicates no longer need, once it is older than the retention window
        (``BIZ_IDEMPOTENCY_RETENTION_HOURS``, at least 24 h): finished sagas and saved
        replies of this partition. Sagas waiting for operators (MANUAL_REVIEW) stay. After
        that a replayed confirm meets an expired transfer token, and money still cannot
        move twice (the token's single use is recorded in PostgreSQL)."""
        due = self._next_purge.setdefault(
            partition, now + self.settings.purge_interval_seconds)
        if now < due:
            return
        self._next_purge[partition] = now + self.settings.purge_interval_seconds
        horizon = now - self.settings.idempotency_retention_hours * 3600
        old = [saga.transfer.transfer_id for saga in self.sagas.scan()
               if saga.transfer.home_partition == partition
               and saga.state in (saga_core.State.COMPLETED, saga_core.State.FAILED)
               and saga.updated_at < horizon]
        for transfer_id in old:
            self.sagas.delete(transfer_id)
        replies = self.replies.expired(partition, horizon)
        for key in replies:
            self.replies.delete(key)
        if old or replies:
            log.info("partition %s: purged %d finished sagas and %d replies older than %s",
                     partition, len(old), len(replies), iso(horizon))

    def _deadlines_of(self, partition: int) -> dict[str, float]:
        index = self._deadlines.get(partition)
        if index is None:
            index = self._deadlines[partition] = {}
            for saga in self.sagas.scan():
                deadline = saga.deadline()
                if saga.transfer.home_partition == partition and deadline is not None:
                    index[saga.transfer.transfer_id] = deadline
        return index

    def forget_partitions(self) -> None:
        """After a rebalance the deadline index is rebuilt from the table on the next tick."""
        self._deadlines.clear()

    # ----------------------------------------------------------------------------------
    # effects
    # ----------------------------------------------------------------------------------

    async def _apply(
        self, saga: saga_core.Saga, outputs: Iterable[saga_core.Output], *,
        changed: bool = True, phone: str | None = None,
    ) -> list[Outbound]:
        """One saga's step, all or nothing: its outputs are encoded and checked, then its
        PostgreSQL effects run (idempotent), then its state and saved reply are written and
        its outputs returned. A failure before the writes leaves no trace but the
        idempotent effects, so deciding again (a retry, a redelivery, the next tick) is
        safe; after them nothing can fail."""
        outputs = tuple(outputs)
        if phone is None and any(isinstance(o, saga_core.SendOtp) for o in outputs):
            # An OTP sent again (saga_core.redelivered_outputs): the phone is not stored.
            user = await self.store.get_user(saga.transfer.operator_id)
            phone = user.phone if user is not None else None
        saves: list[tuple[str, bytes]] = []
        encoded = list(self._encode(saga, outputs, phone, saves))
        self.guard.check_outputs(encoded)  # an output that could never be sent: poison
        for output in outputs:  # PostgreSQL effects: idempotent, safe to repeat
            if isinstance(output, saga_core.ReleaseLimit):
                await self.store.release_daily_limit(output.transfer_id)
        if changed and saga.is_final:  # kept beyond the purge (the idempotency record)
            await self.store.save_outcome(saga.transfer.operator_id,
                                          saga.transfer.idempotency_key, saga.state.value,
                                          saga.code)
        for cache_key, value in saves:
            self.replies.put(cache_key, value, at=self.clock(),
                             partition=_handled_partition.get())
        if changed:
            self.sagas.put(saga)
            saga_telemetry.observe(saga, outputs)  # a log line and metrics per state change
            index = self._deadlines.get(saga.transfer.home_partition)
            if index is not None:
                deadline = saga.deadline()
                if deadline is None:
                    index.pop(saga.transfer.transfer_id, None)
                else:
                    index[saga.transfer.transfer_id] = deadline
        return encoded

    def _encode(
        self, saga: saga_core.Saga, outputs: tuple[saga_core.Output, ...], phone: str | None,
        saves: list[tuple[str, bytes]],
    ) -> Iterator[Outbound]:
        t = saga.transfer
        for o in outputs:
            if isinstance(o, saga_core.SendReply):
                status_cache = None if o.code == ErrorCode.IN_PROGRESS else (
                    f"{t.operator_id}\x1f{o.request_id}")
                yield from self._reply(o.request_id, t.idempotency_key, o.command_type, o.status,
                                       o.code, o.message, _wire_data(o.data),
                                       cache_key=status_cache, saves=saves)
            elif isinstance(o, saga_core.SendAccountCommand):
                command = {
                    "commandId": o.command_id, "type": o.type, "accountId": o.account_id,
                    "amountMinor": o.amount_minor, "currency": o.currency,
                    "transferId": o.transfer_id,
                }
                if o.origin is not None:
                    command["origin"] = o.origin
                yield Outbound(self.topics.account_commands, o.account_id.encode(),
                               orjson.dumps(command))
            elif isinstance(o, saga_core.SendFundingCommand):
                yield Outbound(self.topics.funding_commands, o.charge_id.encode(), orjson.dumps({
                    "chargeId": o.charge_id, "type": o.type,
                    "fundingSourceId": o.funding_source_id, "amountMinor": o.amount_minor,
                    "currency": o.currency,
                }))
            elif isinstance(o, saga_core.SendOtp):
                yield Outbound(self.topics.otp, o.user_id.encode(), orjson.dumps({
                    "userId": o.user_id, "phone": phone or "", "otp": o.otp,
                    "expiresAt": iso(o.expires_at), "transferId": o.transfer_id,
                }))
            elif isinstance(o, saga_core.PublishTransferEvent):
                event = {
                    "eventId": f"{o.transfer_id}:{o.seq}", "transferId": o.transfer_id,
                    "seq": o.seq, "state": o.state, "operatorId": t.operator_id,
                    "fromAccountId": t.from_account_id, "toAccountId": t.to_account_id,
                    "amountMinor": t.amount_minor, "currency": t.currency,
                    "occurredAt": iso(o.at),
                }
                if o.previous_state is not None:
                    event["previousState"] = o.previous_state
                if o.code is not None:
                    event["code"] = o.code
                yield Outbound(self.topics.transfer_events, o.transfer_id.encode(),
                               orjson.dumps(event))

    def _reply(
        self, request_id: str, idempotency_key: str | None, command_type: str, status: str,
        code: str | None, message: str | None, data: dict[str, Any] | None, *,
        cache_key: str | None, saves: list[tuple[str, bytes]] | None = None,
    ) -> list[Outbound]:
        """A reply to ``request_id``, saved under ``cache_key`` (now, or by the caller when
        ``saves`` collects it)."""
        reply: dict[str, Any] = {"requestId": request_id, "type": command_type, "status": status}
        if idempotency_key is not None:
            reply["idempotencyKey"] = idempotency_key
        if code is not None:
            reply["code"] = code
        if message is not None:
            reply["message"] = message
        if data is not None:
            reply["data"] = data
        value = orjson.dumps(reply)
        metrics.replied(command_type, status, code)
        if cache_key is not None:
            if saves is not None:
                saves.append((cache_key, value))
            else:
                self.replies.put(cache_key, value, at=self.clock(),
                                 partition=_handled_partition.get())
        return [Outbound(self.topics.replies, request_id.encode(), value)]

    def _reply_error(
        self, request_id: str, idempotency_key: Any, command_type: str, code: ErrorCode,
        message: str, *, data: dict[str, Any] | None = None, cache_key: str | None,
    ) -> list[Outbound]:
        """An error reply; what it echoes is bounded (docs/contract.md, "Limits")."""
        key = idempotency_key if isinstance(idempotency_key, str) and 0 < len(
            idempotency_key) <= MAX_ID_CHARS else None
        return self._reply(request_id, key, cut(command_type, MAX_TYPE_CHARS), "error",
                           code.value, cut(message, MAX_REASON_CHARS), data,
                           cache_key=cache_key)

    def _dead_letter(self, record: SourceRecord, reason: str) -> Outbound:
        return dead_letter_out(self.topics.dlq, record, reason,
                               datetime.fromtimestamp(self.clock(), UTC))


CONFIRM_REFUSALS = {
    ConfirmOutcome.FORBIDDEN: (ErrorCode.FORBIDDEN, "the user is unknown or blocked, or the "
                               "transfer token is for another account"),
    ConfirmOutcome.PIN_LOCKED: (ErrorCode.PIN_LOCKED, "too many wrong PINs: the PIN is locked"),
    ConfirmOutcome.INVALID_PIN: (ErrorCode.INVALID_PIN, "the PIN is wrong"),
    ConfirmOutcome.TOKEN_USED: (ErrorCode.TOKEN_ALREADY_USED,
                                "this transfer token already funds another transfer"),
    ConfirmOutcome.LIMIT_EXCEEDED: (ErrorCode.LIMIT_EXCEEDED,
                                    "the amount exceeds today's limit"),
    ConfirmOutcome.OTP_LOCKED: (ErrorCode.OTP_LOCKED, "too many wrong one-time passwords "
                                "lately: step-ups are refused for a while"),
    ConfirmOutcome.RATE_LIMITED: (ErrorCode.RATE_LIMITED, "too many one-time passwords sent "
                                  "lately: try again later"),
    ConfirmOutcome.KEY_REUSED: (ErrorCode.IDEMPOTENCY_KEY_REUSED,
                                "this idempotencyKey was used for another operation"),
}


def _fingerprint(*parts: object) -> str:
    """What identifies a payload under an idempotency key."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def _record_identity(record: SourceRecord, key: bytes) -> str | None:
    """What a redelivery of a record keeps and nothing else has: its coordinates and a
    keyed hash of its value (a topic recreated later reuses offsets, never with the same
    bytes; keyed, so the stored form says nothing about the PIN the value holds). None for
    a record that was not consumed."""
    if record.offset < 0:
        return None
    digest = hmac.new(key, record.value or b"", hashlib.sha256).hexdigest()[:32]
    return f"{record.topic}/{record.partition}/{record.offset}/{digest}"


def _refuse_if(access_expired: bool) -> None:
    if access_expired:
        raise Rejection(ErrorCode.UNAUTHENTICATED, "access token expired")


def _day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def _is_transfer_id(value: str) -> bool:
    """A transfer id as this service makes them: a UUID in its canonical form."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _validation_message(exc: ValidationError, *, name_unknown: bool = False) -> str:
    return validation_reason(exc, name_unknown=name_unknown)
