"""What does each command do once its sender is authenticated?

One handler per command type (:meth:`CommandHandlers.table`): transferInit (checks, a
transfer token), transferConfirm and topUp (the PIN, the token or funding source, the
daily limit, then the saga's start), verifyOtp (the saga's OTP step) and the queries
(forwarded to ``business.queries``, answered from PostgreSQL by whichever worker reads
them). Each handler answers a duplicate with what was decided before and a request
refused before any saga exists with a :class:`Rejection`, which the intake turns into an
error reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from app.domain import pin as pin_codes
from app.domain import transfer_saga as saga_core
from app.domain.ports import (
    BusinessStore,
    ConfirmChecks,
    ConfirmOutcome,
    ConfirmRequest,
    GuessBudgets,
    SagaRepository,
    UserStatus,
)
from app.record_failures import Outbound
from app.settings import Settings
from app.tokens import TokenError, TransferTokens
from app.transfers.ids import attempt_for, token_jti_for, transfer_id_for
from app.transfers.ids import fingerprint as fingerprint_of
from app.transfers.outbound import Outbox
from app.transfers.steps import SagaSteps
from events.queries import query_record
from schemas.wire import (
    QUERY_COMMANDS,
    CommandEnvelope,
    CommandType,
    ErrorCode,
    TopUpPayload,
    TransferConfirmPayload,
    TransferInitPayload,
    VerifyOtpPayload,
    WireModel,
)


class Rejection(Exception):
    """A request refused before any saga exists: becomes an error reply."""

    def __init__(self, code: ErrorCode, message: str, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class NothingKept(Exception):
    """A stale request (older than the retention window) with nothing kept to answer it."""


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


@dataclass(frozen=True, slots=True)
class Request:
    """An authenticated command, its payload validated (``PAYLOAD_MODELS[env.type]``)."""

    env: CommandEnvelope
    payload: WireModel
    partition: int
    cache_key: str
    #: The access token is genuine but expired: the request may get the answer to a
    #: decision already taken (a redelivery, a replay), never a new one.
    expired: bool
    #: Sent before the retention window: answered only from what its key keeps.
    stale: bool
    #: What a Kafka redelivery of the record keeps and a client cannot vary
    #: (``handling.record_identity``): a wrong PIN counts once per record.
    record_id: str | None = None


Handler = Callable[[Request], Awaitable[list[Outbound]]]


def _refuse_if(access_expired: bool) -> None:
    if access_expired:
        raise Rejection(ErrorCode.UNAUTHENTICATED, "access token expired")


def _day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


class CommandHandlers:
    """The handlers of business.commands, by command type."""

    def __init__(
        self, settings: Settings, store: BusinessStore, sagas: SagaRepository,
        outbox: Outbox, steps: SagaSteps, transfer_tokens: TransferTokens,
        policy: saga_core.Policy, budgets: GuessBudgets, new_otp: Callable[[], str],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.sagas = sagas
        self.outbox = outbox
        self.steps = steps
        self.transfer_tokens = transfer_tokens
        self.policy = policy
        self.budgets = budgets
        self.new_otp = new_otp
        self.clock = clock
        self._pin_pepper = settings.pin_pepper.get_secret_value().encode()

    def table(self) -> dict[CommandType, Handler]:
        """The handler of every command type."""
        table: dict[CommandType, Handler] = {
            CommandType.TRANSFER_INIT: self.transfer_init,
            CommandType.TRANSFER_CONFIRM: self.transfer_confirm,
            CommandType.TOP_UP: self.top_up,
            CommandType.VERIFY_OTP: self.verify_otp,
        }
        table.update(dict.fromkeys(QUERY_COMMANDS, self.query))
        return table

    # --- queries ----------------------------------------------------------------------

    async def query(self, req: Request) -> list[Outbound]:
        """Forwarded to business.queries, answered by the ``answer_queries`` agent."""
        _refuse_if(req.expired)
        user = await self.active_user(req.env.operator_id)
        key, value = query_record(req.env, req.payload, user.account_id, user.currency)
        return [self.outbox.query(key, value)]

    async def active_user(self, user_id: str) -> Any:
        user = await self.store.get_user(user_id)
        if user is None or user.status is not UserStatus.ACTIVE:
            raise Rejection(ErrorCode.FORBIDDEN, "the user is unknown or blocked")
        return user

    # --- transferInit -----------------------------------------------------------------

    async def transfer_init(self, req: Request) -> list[Outbound]:
        if req.stale:
            raise NothingKept  # an init leaves nothing but its saved reply
        _refuse_if(req.expired)
        env, payload = req.env, req.payload
        assert isinstance(payload, TransferInitPayload)
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
        token, expires_at = self.transfer_tokens.issue(
            jti=token_jti_for(env.operator_id, env.request_id), operator_id=env.operator_id,
            from_account_id=user.account_id, to_account_id=payload.to_account_id,
            amount_minor=payload.amount_minor, currency=payload.currency, note=payload.note,
            now=datetime.fromtimestamp(now, UTC),
        )
        data = {
            "transferToken": token,
            "expiresAt": expires_at.isoformat().replace("+00:00", "Z"),
            "otpRequired": payload.amount_minor > user.otp_threshold_minor,
        }
        return self.outbox.reply(env.request_id, None, env.type.value, "ok", None, None, data,
                                 cache_key=req.cache_key, partition=req.partition)

    # --- transferConfirm --------------------------------------------------------------

    async def transfer_confirm(self, req: Request) -> list[Outbound]:
        env, payload = req.env, req.payload
        assert isinstance(payload, TransferConfirmPayload)
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
        fingerprint = fingerprint_of(claims.jti, claims.from_account_id,
                                     claims.to_account_id, claims.amount_minor, claims.currency)
        transfer_id, answered = await self._duplicate_of(env, fingerprint, now)
        if answered is not None:
            return answered
        if req.stale:
            return await self._kept_only(req, fingerprint)
        _refuse_if(req.expired)

        leeway = self.settings.jwt_leeway_seconds
        if now > claims.expires_at.timestamp() + leeway:
            # A key whose saga was purged: the kept idempotency record answers, never an
            # expired token (and never another operation's outcome).
            kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
            if kept is not None and (kept.state is not None or kept.fingerprint != fingerprint):
                return self._kept_answer(req, fingerprint, kept)
            raise Rejection(ErrorCode.TOKEN_EXPIRED, "the transfer token has expired")
        checks = await self.store.confirm_checks(ConfirmRequest(
            user_id=env.operator_id, idempotency_key=env.idempotency_key,
            fingerprint=fingerprint, transfer_id=transfer_id,
            attempt=attempt_for(transfer_id, claims.jti),
            matches=lambda verifier: pin_codes.pin_matches(
                self._pin_pepper, env.operator_id, payload.pin, verifier),
            record=req.record_id, day=_day(now), now=now_dt,
            amount_minor=claims.amount_minor, from_account_id=claims.from_account_id,
            jti=claims.jti,
        ), self.budgets)
        user = self._checked(req, fingerprint, checks)
        if isinstance(user, list):
            return user
        transfer = saga_core.Transfer(
            transfer_id=transfer_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=claims.from_account_id, to_account_id=claims.to_account_id,
            amount_minor=claims.amount_minor, currency=claims.currency, note=claims.note,
            home_partition=req.partition, attempt=checks.attempt,
        )
        needs_otp = claims.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            transfer, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self.steps.apply(saga, outputs, phone=user.phone)

    # --- topUp ------------------------------------------------------------------------

    async def top_up(self, req: Request) -> list[Outbound]:
        """Pull money from the user's linked bank account or card: the same saga and the
        same idempotency rules as a transfer, with the funding source as the payer."""
        env, payload = req.env, req.payload
        assert isinstance(payload, TopUpPayload)
        assert env.idempotency_key is not None
        now = self.clock()
        fingerprint = fingerprint_of("topUp", payload.funding_source_id,
                                     payload.amount_minor, payload.currency)
        topup_id, answered = await self._duplicate_of(env, fingerprint, now)
        if answered is not None:
            return answered
        if req.stale:
            return await self._kept_only(req, fingerprint)
        _refuse_if(req.expired)
        user = await self.active_user(env.operator_id)
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
            record=req.record_id, day=_day(now),
            now=datetime.fromtimestamp(now, UTC), amount_minor=payload.amount_minor,
            kind=saga_core.TOPUP, limit_minor=self.settings.topup_daily_limit_minor,
        ), self.budgets)
        checked = self._checked(req, fingerprint, checks)
        if isinstance(checked, list):
            return checked
        user = checked
        topup = saga_core.Transfer(
            transfer_id=topup_id, operator_id=env.operator_id,
            idempotency_key=env.idempotency_key, fingerprint=fingerprint,
            from_account_id=source.funding_source_id, to_account_id=user.account_id,
            amount_minor=payload.amount_minor, currency=payload.currency, note=None,
            home_partition=req.partition, kind=saga_core.TOPUP, attempt=checks.attempt,
        )
        needs_otp = payload.amount_minor > user.otp_threshold_minor
        saga, outputs = saga_core.start(
            topup, request_id=env.request_id, user_id=user.user_id,
            otp=self.new_otp() if needs_otp else None, now=now, policy=self.policy,
        )
        return await self.steps.apply(saga, outputs, phone=user.phone)

    # --- verifyOtp --------------------------------------------------------------------

    async def verify_otp(self, req: Request) -> list[Outbound]:
        env, payload = req.env, req.payload
        assert isinstance(payload, VerifyOtpPayload)
        assert env.idempotency_key is not None
        saga = await self.sagas.get(transfer_id_for(env.operator_id, env.idempotency_key))
        if saga is None:
            if req.stale:  # the transfer's final outcome, if its record kept one
                kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
                if kept is None or kept.state is None:
                    raise NothingKept
                return self._kept_answer(req, kept.fingerprint, kept)
            _refuse_if(req.expired)
            raise Rejection(ErrorCode.INVALID_REQUEST,
                            "no transfer under this idempotencyKey awaits a one-time password")
        fresh = (saga.state is saga_core.State.AWAITING_OTP
                 and saga.last_trigger != f"otp:{env.request_id}")
        _refuse_if(req.expired and fresh)
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
        return await self.steps.apply(new, outputs, changed=new is not saga)

    # --- what a key already holds -----------------------------------------------------

    def _checked(self, req: Request, fingerprint: str, checks: ConfirmChecks) -> Any:
        """The user a new operation may start for, or the answer when the checks refused
        it (a :class:`Rejection`) or its key already ended (the kept outcome)."""
        if checks.outcome is ConfirmOutcome.ANSWERED:
            assert checks.kept is not None
            return self._kept_answer(req, fingerprint, checks.kept)
        if checks.outcome is not ConfirmOutcome.OK:
            code, message = CONFIRM_REFUSALS[checks.outcome]
            raise Rejection(code, message, {"attemptsLeft": checks.attempts_left}
                            if checks.outcome is ConfirmOutcome.INVALID_PIN else None)
        assert checks.user is not None
        return checks.user

    def _kept_answer(self, req: Request, fingerprint: str, kept: Any) -> list[Outbound]:
        """The answer of an idempotency record whose saga was purged: the same payload gets
        the operation's final outcome (saved for this request), another one
        IDEMPOTENCY_KEY_REUSED."""
        env = req.env
        if kept.fingerprint != fingerprint:
            raise Rejection(*CONFIRM_REFUSALS[ConfirmOutcome.KEY_REUSED])
        assert kept.state is not None
        reply = saga_core.final_reply(kept.transfer_id, kept.state, kept.code,
                                      env.request_id, env.type.value)
        return self.outbox.reply(reply.request_id, env.idempotency_key, reply.command_type,
                                 reply.status, reply.code, reply.message, reply.data,
                                 cache_key=req.cache_key, partition=req.partition)

    async def _kept_only(self, req: Request, fingerprint: str) -> list[Outbound]:
        """The answer of a stale request whose key has no saga: its idempotency record's
        final outcome, else nothing (:class:`NothingKept`)."""
        env = req.env
        assert env.idempotency_key is not None
        kept = await self.store.kept_outcome(env.operator_id, env.idempotency_key)
        if kept is None or kept.state is None:
            raise NothingKept
        return self._kept_answer(req, fingerprint, kept)

    async def _duplicate_of(
        self, env: CommandEnvelope, fingerprint: str, now: float
    ) -> tuple[str, list[Outbound] | None]:
        """The saga id of this scoped idempotency key, and the answer when a saga already
        exists under it: the same payload gets that saga's answer, another payload
        IDEMPOTENCY_KEY_REUSED. ``None`` when the key is new."""
        assert env.idempotency_key is not None
        saga_id = transfer_id_for(env.operator_id, env.idempotency_key)
        existing = await self.sagas.get(saga_id)
        if saga_core.classify(existing, fingerprint) is saga_core.Duplicate.REUSED:
            raise Rejection(ErrorCode.IDEMPOTENCY_KEY_REUSED,
                            "this idempotencyKey was used for another operation")
        if existing is None:
            return saga_id, None
        saga, outputs = saga_core.on_duplicate_confirm(existing, env.request_id, now,
                                                       self.policy)
        return saga_id, await self.steps.apply(saga, outputs, changed=False)
