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

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from app.domain import otp as otp_codes
from app.domain import pin as pin_codes
from app.domain import transfer_saga as saga_core
from app.domain.ports import BusinessStore, ConfirmOutcome, UserStatus
from app.query_service import query_record
from app.settings import Settings
from app.tokens import AccessTokenVerifier, TokenError, TransferTokens
from schemas.wire import (
    NEEDS_IDEMPOTENCY_KEY,
    PAYLOAD_MODELS,
    QUERY_COMMANDS,
    AccountEvent,
    CommandEnvelope,
    ErrorCode,
    FundingEvent,
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

#: Namespaces of the deterministic ids (UUIDv5): the same input always yields the same id.
TRANSFER_NS = uuid.UUID("6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01")
TOKEN_NS = uuid.UUID("0b9e3c44-7d1a-4f0e-8f3a-5c2d7e9b1a02")


def transfer_id_for(operator_id: str, idempotency_key: str) -> str:
    """The transfer id is the scoped idempotency key, hashed: the saga table's key."""
    return str(uuid.uuid5(TRANSFER_NS, f"{operator_id}\x1f{idempotency_key}"))


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to send. ``topic`` is a logical name, see :class:`Topics`."""

    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None


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
        # Deadlines of the open sagas, per home partition: derived, rebuilt by scanning.
        self._deadlines: dict[int, dict[str, float]] = {}
        self._next_purge: dict[int, float] = {}

    # ----------------------------------------------------------------------------------
    # business.commands
    # ----------------------------------------------------------------------------------

    async def handle_command(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        _handled_partition.set(partition)
        try:
            return await self._handle_command(raw, key, partition, offset)
        except Exception:
            # Never let an exception escape to the agent (Faust would ack and skip).
            log.exception("internal error on business.commands[%s]@%s", partition, offset)
            return self._internal_error(raw, key, self.topics.commands, partition, offset)

    async def _handle_command(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int
    ) -> list[Outbound]:
        try:
            doc = orjson.loads(raw or b"")
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return [self._dead_letter(self.topics.commands, partition, offset, key, raw,
                                      f"undecodable: {exc}")]
        try:
            envelope = CommandEnvelope.model_validate(doc)
        except ValidationError as exc:
            request_id = doc.get("requestId")
            if isinstance(request_id, str) and request_id:
                return self._reply_error(
                    request_id, doc.get("idempotencyKey"), str(doc.get("type", "unknown")),
                    ErrorCode.INVALID_REQUEST, _validation_message(exc), cache_key=None,
                )
            return [self._dead_letter(self.topics.commands, partition, offset, key, raw,
                                      f"invalid envelope: {_validation_message(exc)}")]

        cache_key = f"{envelope.operator_id}\x1f{envelope.request_id}"
        saved = envelope.type not in QUERY_COMMANDS  # a query is answered afresh every time
        cached = self.replies.get(cache_key) if saved else None
        if cached is not None:
            return await self._answered_before(envelope, cached)
        try:
            return await self._dispatch(envelope, key, partition, cache_key)
        except Rejection as rej:
            return self._reply_error(
                envelope.request_id, envelope.idempotency_key, envelope.type.value,
                rej.code, rej.message, data=rej.data, cache_key=cache_key if saved else None,
            )

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
                return await self._apply(saga, saga.last_outputs, changed=False)
        return [Outbound(self.topics.replies, env.request_id.encode(), cached)]

    async def _dispatch(
        self, env: CommandEnvelope, key: bytes | None, partition: int, cache_key: str
    ) -> list[Outbound]:
        try:
            payload = PAYLOAD_MODELS[env.type].model_validate(env.payload)
        except ValidationError as exc:
            raise Rejection(ErrorCode.INVALID_REQUEST, _validation_message(exc)) from None
        if env.type in NEEDS_IDEMPOTENCY_KEY:
            if not env.idempotency_key:
                raise Rejection(ErrorCode.INVALID_REQUEST,
                                f"{env.type.value} needs an idempotencyKey")
            if key is not None and key != env.idempotency_key.encode():
                raise Rejection(
                    ErrorCode.INVALID_REQUEST, "the message key must equal the idempotencyKey"
                )
        now = self.clock()
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
            _refuse_if(expired)
            return await self._transfer_init(env, payload, cache_key)
        if isinstance(payload, TransferConfirmPayload):
            return await self._transfer_confirm(env, payload, partition, expired)
        if isinstance(payload, TopUpPayload):
            return await self._top_up(env, payload, partition, expired)
        assert isinstance(payload, VerifyOtpPayload)
        return await self._verify_otp(env, payload, expired)

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
        access_expired: bool = False,
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
        _refuse_if(access_expired)

        leeway = self.settings.jwt_leeway_seconds
        if now > claims.expires_at.timestamp() + leeway:
            raise Rejection(ErrorCode.TOKEN_EXPIRED, "the transfer token has expired")
        checks = await self.store.confirm_checks(
            user_id=env.operator_id, from_account_id=claims.from_account_id,
            request_id=env.request_id,
            matches=lambda verifier: pin_codes.pin_matches(
                self._pin_pepper, env.operator_id, payload.pin, verifier),
            max_attempts=self.settings.pin_max_attempts, jti=claims.jti,
            transfer_id=transfer_id, day=_day(now), amount_minor=claims.amount_minor,
        )
        if checks.outcome is not ConfirmOutcome.OK:
            code, message = CONFIRM_REFUSALS[checks.outcome]
            raise Rejection(code, message, {"attemptsLeft": checks.attempts_left}
                            if checks.outcome is ConfirmOutcome.INVALID_PIN else None)
        user = checks.user
        assert user is not None
        transfer = saga_core.Transfer(
            transfer_id=transfer_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=claims.from_account_id, to_account_id=claims.to_account_id,
            amount_minor=claims.amount_minor, currency=claims.currency, note=claims.note,
            home_partition=partition,
        )
        needs_otp = claims.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            transfer, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self._apply(saga, outputs, phone=user.phone)

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
        saga, outputs = saga_core.on_duplicate_confirm(existing, env.request_id, now)
        return saga_id, await self._apply(saga, outputs, changed=False)

    async def _top_up(
        self, env: CommandEnvelope, payload: TopUpPayload, partition: int,
        access_expired: bool,
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
        _refuse_if(access_expired)
        user = await self._active_user(env.operator_id)
        source = await self.store.get_funding_source(payload.funding_source_id)
        if (source is None or source.user_id != user.user_id
                or source.status is not UserStatus.ACTIVE):
            raise Rejection(ErrorCode.FORBIDDEN, "the funding source is unknown or not yours")
        if payload.currency != user.currency:
            raise Rejection(ErrorCode.INVALID_REQUEST, f"the account holds {user.currency}")
        topup = saga_core.Transfer(
            transfer_id=topup_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=source.funding_source_id, to_account_id=user.account_id,
            amount_minor=payload.amount_minor, currency=payload.currency, note=None,
            home_partition=partition, kind=saga_core.TOPUP,
        )
        needs_otp = payload.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            topup, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self._apply(saga, outputs, phone=user.phone)

    async def _verify_otp(
        self, env: CommandEnvelope, payload: VerifyOtpPayload, access_expired: bool = False
    ) -> list[Outbound]:
        assert env.idempotency_key is not None
        saga = self.sagas.get(transfer_id_for(env.operator_id, env.idempotency_key))
        if saga is None:
            _refuse_if(access_expired)
            raise Rejection(ErrorCode.INVALID_REQUEST,
                            "no transfer under this idempotencyKey awaits a one-time password")
        _refuse_if(access_expired and saga.state is saga_core.State.AWAITING_OTP
                   and saga.last_trigger != f"otp:{env.request_id}")
        new, outputs = saga_core.on_otp(saga, env.request_id, payload.otp, self.clock(),
                                        self.policy)
        return await self._apply(new, outputs, changed=new is not saga)

    # ----------------------------------------------------------------------------------
    # account.events → business.saga-inputs (the relay) and the saga inputs themselves
    # ----------------------------------------------------------------------------------

    def route_account_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """Forward an account event to the partition where its saga lives."""
        try:
            event = AccountEvent.model_validate_json(raw or b"")
        except ValidationError as exc:
            return [self._dead_letter(self.topics.account_events, partition, offset, key, raw,
                                      f"invalid account event: {_validation_message(exc)}")]
        parsed = saga_core.parse_command_id(event.command_id)
        if parsed is None:
            log.debug("account event for a command this saga did not emit: %s", event.command_id)
            return []
        transfer_id, _step, home = parsed
        value = SagaInput(kind="accountEvent", account_event=event)
        return [Outbound(self.topics.saga_inputs, transfer_id.encode(),
                         orjson.dumps(value.to_wire()), partition=home)]

    def route_funding_event(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        """Forward a funding provider's event to the partition where its top-up lives."""
        try:
            event = FundingEvent.model_validate_json(raw or b"")
        except ValidationError as exc:
            return [self._dead_letter(self.topics.funding_events, partition, offset, key, raw,
                                      f"invalid funding event: {_validation_message(exc)}")]
        parsed = saga_core.parse_command_id(event.charge_id)
        if parsed is None or parsed[1] != "charge":
            log.warning("funding event for a charge this service did not make")
            return []
        value = SagaInput(kind="fundingEvent", funding_event=event)
        return [Outbound(self.topics.saga_inputs, parsed[0].encode(),
                         orjson.dumps(value.to_wire()), partition=parsed[2])]

    def tick(self, partition: int) -> Outbound:
        return Outbound(self.topics.saga_inputs, b"tick",
                        orjson.dumps({"kind": "tick"}), partition=partition)

    async def handle_saga_input(
        self, raw: bytes | None, key: bytes | None, partition: int, offset: int = -1
    ) -> list[Outbound]:
        _handled_partition.set(partition)
        try:
            item = SagaInput.model_validate_json(raw or b"")
        except ValidationError as exc:
            return [self._dead_letter(self.topics.saga_inputs, partition, offset, key, raw,
                                      f"invalid saga input: {_validation_message(exc)}")]
        try:
            if item.kind == "tick":
                return await self._on_tick(partition)
            if item.kind == "fundingEvent":
                assert item.funding_event is not None
                return await self._on_funding_event(item.funding_event)
            assert item.account_event is not None
            return await self._on_account_event(item.account_event)
        except Exception:
            log.exception("internal error on saga input [%s]@%s", partition, offset)
            return []  # the saga's deadline re-sends its command: nothing is lost

    async def _on_account_event(self, event: AccountEvent) -> list[Outbound]:
        parsed = saga_core.parse_command_id(event.command_id)
        if parsed is None:
            return []
        saga = self.sagas.get(parsed[0])
        if saga is None:
            log.warning("account event for an unknown transfer %s", parsed[0])
            return []
        new, outputs = saga_core.on_account_event(
            saga, event.command_id, event.type.value, event.reason, self.clock(), self.policy
        )
        return await self._apply(new, outputs, changed=new is not saga)

    async def _on_funding_event(self, event: FundingEvent) -> list[Outbound]:
        parsed = saga_core.parse_command_id(event.charge_id)
        if parsed is None:
            return []
        saga = self.sagas.get(parsed[0])
        if saga is None:
            if event.status != "captured":
                return []
            # Money was taken from a source for a top-up nobody knows (purged long ago):
            # nothing may be lost, so operators get it.
            return [self._dead_letter(
                self.topics.funding_events, _handled_partition.get(), -1,
                event.charge_id.encode(),
                orjson.dumps(event.to_wire()),
                "capture for an unknown top-up: give it back to the source by hand")]
        new, outputs = saga_core.on_funding_event(saga, event.charge_id, event.status,
                                                  self.clock(), self.policy)
        return await self._apply(new, outputs, changed=new is not saga)

    async def _on_tick(self, partition: int) -> list[Outbound]:
        now = self.clock()
        due = [tid for tid, at in self._deadlines_of(partition).items() if at <= now]
        sends: list[Outbound] = []
        for transfer_id in due:
            saga = self.sagas.get(transfer_id)
            if saga is None:
                self._deadlines[partition].pop(transfer_id, None)
                continue
            new, outputs = saga_core.on_tick(saga, now, self.policy)
            sends.extend(await self._apply(new, outputs, changed=new is not saga))
        self._purge_if_due(partition, now)
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
        outputs = tuple(outputs)
        for output in outputs:  # PostgreSQL effects first: idempotent, safe to repeat
            if isinstance(output, saga_core.ReleaseLimit):
                await self.store.release_daily_limit(output.transfer_id)
        if changed:
            self.sagas.put(saga)
            index = self._deadlines.get(saga.transfer.home_partition)
            if index is not None:
                deadline = saga.deadline()
                if deadline is None:
                    index.pop(saga.transfer.transfer_id, None)
                else:
                    index[saga.transfer.transfer_id] = deadline
        return list(self._encode(saga, outputs, phone))

    def _encode(
        self, saga: saga_core.Saga, outputs: tuple[saga_core.Output, ...], phone: str | None
    ) -> Iterator[Outbound]:
        t = saga.transfer
        for o in outputs:
            if isinstance(o, saga_core.SendReply):
                status_cache = None if o.code == ErrorCode.IN_PROGRESS else (
                    f"{t.operator_id}\x1f{o.request_id}")
                yield from self._reply(o.request_id, t.idempotency_key, o.command_type, o.status,
                                       o.code, o.message, _wire_data(o.data),
                                       cache_key=status_cache)
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
        cache_key: str | None,
    ) -> list[Outbound]:
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
        if cache_key is not None:
            self.replies.put(cache_key, value, at=self.clock(),
                             partition=_handled_partition.get())
        return [Outbound(self.topics.replies, request_id.encode(), value)]

    def _reply_error(
        self, request_id: str, idempotency_key: Any, command_type: str, code: ErrorCode,
        message: str, *, data: dict[str, Any] | None = None, cache_key: str | None,
    ) -> list[Outbound]:
        key = idempotency_key if isinstance(idempotency_key, str) else None
        return self._reply(request_id, key, command_type, "error", code.value, message, data,
                           cache_key=cache_key)

    def _dead_letter(
        self, topic: str, partition: int, offset: int, key: bytes | None, raw: bytes | None,
        reason: str,
    ) -> Outbound:
        log.warning("dead letter from %s[%s]@%s: %s", topic, partition, offset, reason)
        raw = redact_secrets(raw)
        record = {
            "sourceTopic": topic, "sourcePartition": partition, "sourceOffset": offset,
            "keyB64": base64.b64encode(key).decode() if key is not None else None,
            "valueB64": base64.b64encode(raw).decode() if raw is not None else None,
            "reason": reason, "failedAt": iso(self.clock()),
        }
        return Outbound(self.topics.dlq, key, orjson.dumps(record))

    def _internal_error(
        self, raw: bytes | None, key: bytes | None, topic: str, partition: int, offset: int
    ) -> list[Outbound]:
        """An unexpected failure: the caller gets INTERNAL and the message is dead-lettered
        so that nothing is lost."""
        outputs = [self._dead_letter(topic, partition, offset, key, raw, "internal error")]
        try:
            doc = orjson.loads(raw or b"")
            request_id = doc.get("requestId") if isinstance(doc, dict) else None
        except ValueError:
            request_id = None
        if isinstance(request_id, str) and request_id:
            outputs += self._reply(request_id, doc.get("idempotencyKey"), str(doc.get("type")),
                                   "error", ErrorCode.INTERNAL.value,
                                   "internal error; retry with the same idempotencyKey", None,
                                   cache_key=None)
        return outputs


CONFIRM_REFUSALS = {
    ConfirmOutcome.FORBIDDEN: (ErrorCode.FORBIDDEN, "the user is unknown or blocked, or the "
                               "transfer token is for another account"),
    ConfirmOutcome.PIN_LOCKED: (ErrorCode.PIN_LOCKED, "too many wrong PINs: the PIN is locked"),
    ConfirmOutcome.INVALID_PIN: (ErrorCode.INVALID_PIN, "the PIN is wrong"),
    ConfirmOutcome.TOKEN_USED: (ErrorCode.TOKEN_ALREADY_USED,
                                "this transfer token already funds another transfer"),
    ConfirmOutcome.LIMIT_EXCEEDED: (ErrorCode.LIMIT_EXCEEDED,
                                    "the amount exceeds today's limit"),
}


def _fingerprint(*parts: object) -> str:
    """What identifies a payload under an idempotency key."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


def _refuse_if(access_expired: bool) -> None:
    if access_expired:
        raise Rejection(ErrorCode.UNAUTHENTICATED, "access token expired")


SECRET_FIELDS = ("accessToken", "pin", "otp", "transferToken")


def redact_secrets(raw: bytes | None) -> bytes | None:
    """The original bytes of a dead letter, minus any access token, PIN, OTP or transfer
    token they hold (when they are JSON at all; undecodable bytes are kept as they are)."""
    try:
        doc = orjson.loads(raw or b"")
    except ValueError:
        return raw
    found = False

    def scrub(node: Any) -> Any:
        nonlocal found
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k in SECRET_FIELDS:
                    found = True
                    out[k] = "[redacted]"
                else:
                    out[k] = scrub(v)
            return out
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    cleaned = scrub(doc)
    return orjson.dumps(cleaned) if found else raw


def _day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def _validation_message(exc: ValidationError) -> str:
    """Field paths and reasons only: never echo input values (they may hold a PIN)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "message"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
