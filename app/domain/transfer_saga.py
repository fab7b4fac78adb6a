"""The transfer saga: a pure state machine.

Why one module: it answers one question, what the saga does with each input in each state,
and a reader checks that against the diagrams below in one file. The transitions (``start``,
the duplicates, ``on_otp``, ``on_account_event``, ``on_funding_event``, ``on_tick``,
``on_resolution``) are built from the same private steps (``_move``, ``_start_step``,
``_step_command``, the command ids); split by input, each part would reach into the others'
internals. Pure and table-tested (tests/unit/test_transfer_saga.py): its length costs no setup.

Every step is a function ``(saga, input, now, policy) -> (saga', outputs)``. No I/O, no
clock, no randomness: time, the OTP and the checks' results are passed in; the outputs are
plain data that the adapters send (replies, account commands, OTP notifications, transfer
events) or apply (releasing a daily-limit reservation).

States::

    AWAITING_OTP ──otp ok──▶ DEBITING ──debited──▶ CREDITING ──credited──▶ COMPLETED
         │                      │                      │
         │ expired / locked     │ rejected             │ rejected
         ▼                      ▼                      ▼
       FAILED ◀───────────── FAILED               REFUNDING ──refunded──▶ FAILED
                                                       │ rejected
                                                       ▼
                                                 MANUAL_REVIEW

Top-ups (``kind == "topup"``) run the same machine with other steps: the payer is a
linked funding source (bank account or card) charged through the funding provider::

    AWAITING_OTP ─▶ CHARGING ──captured──▶ CREDITING ──credited──▶ COMPLETED
                       │ declined / no answer in time       │ rejected
                       ▼                                     ▼
                     FAILED ──a late capture──▶ REVERSING  REFUNDING (to the source) ─▶ FAILED
                       ▲                           │ refunded
                       └───────────────────────────┘

A capture that arrives after FUNDING_TIMEOUT is given back to the source (REVERSING), not
credited: the user was told the top-up failed, and that must stay true.

Duplicates: every command the saga emits has a deterministic id
(``<transferId>:<step>:<homePartition>``). The saga remembers the input that caused its
last transition (``last_trigger``) and the outputs it decided then; when that same input
arrives again (a redelivery after a crash between the state write and the sends) it
re-sends those outputs instead of deciding again. Any other stale input is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from enum import StrEnum
from typing import Any

from app.domain import otp as otp_codes
from app.domain.frozen import quick, replace


class State(StrEnum):
    AWAITING_OTP = "AWAITING_OTP"
    DEBITING = "DEBITING"
    CREDITING = "CREDITING"
    REFUNDING = "REFUNDING"
    CHARGING = "CHARGING"  # top-up: the funding source is being charged
    REVERSING = "REVERSING"  # top-up: a late capture is being given back to the source
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    MANUAL_REVIEW = "MANUAL_REVIEW"  # refund rejected: money held in clearing, operators act


FINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.MANUAL_REVIEW})
#: The step awaited in each money-moving state and the account event that answers it.
STEP_OF_STATE = {
    State.DEBITING: "debit", State.CREDITING: "credit", State.REFUNDING: "refund",
    State.CHARGING: "charge", State.REVERSING: "reverse",
}
ANSWER_OF_STEP = {
    "debit": "debited", "credit": "credited", "refund": "refunded",
    "charge": "captured", "reverse": "refunded",
}
TOPUP = "topup"


@dataclass(frozen=True, slots=True)
class Policy:
    otp_ttl_seconds: float
    otp_max_attempts: int
    otp_pepper: bytes = field(repr=False)
    command_timeout_seconds: float
    command_max_backoff_seconds: float
    funding_timeout_seconds: float = 30.0  # a charge unanswered this long fails the top-up


@quick
@dataclass(frozen=True, slots=True)
class Transfer:
    """What a confirmed transfer token bound, plus where the saga lives."""

    transfer_id: str
    operator_id: str
    idempotency_key: str
    fingerprint: str  # identifies the payload under the idempotency key
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    note: str | None
    home_partition: int
    kind: str = "transfer"  # or "topup": from_account_id is then the funding source
    #: Unique to this attempt of the key (16 hex digits, kept in the idempotency record):
    #: part of every command id. "" in sagas started before it existed (old-format ids).
    attempt: str = ""


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


@quick
@dataclass(frozen=True, slots=True)
class SendReply:
    request_id: str
    status: str  # ok | pending | error
    code: str | None
    message: str | None
    data: dict[str, Any] | None
    command_type: str


@quick
@dataclass(frozen=True, slots=True)
class SendAccountCommand:
    command_id: str
    type: str  # debit | credit | refund
    account_id: str
    amount_minor: int
    currency: str
    transfer_id: str
    origin: str | None = None  # "topup": the credit's money comes from a funding source


@quick
@dataclass(frozen=True, slots=True)
class SendFundingCommand:
    charge_id: str
    type: str  # charge | refund
    funding_source_id: str
    amount_minor: int
    currency: str


@quick
@dataclass(frozen=True, slots=True)
class SendOtp:
    """Never stored: the only place the plain OTP exists after generation."""

    user_id: str
    otp: str = field(repr=False)
    expires_at: float
    transfer_id: str


@quick
@dataclass(frozen=True, slots=True)
class PublishTransferEvent:
    transfer_id: str
    seq: int
    state: str
    previous_state: str | None
    code: str | None
    at: float


@quick
@dataclass(frozen=True, slots=True)
class ReleaseLimit:
    transfer_id: str


Output = (SendReply | SendAccountCommand | SendFundingCommand | SendOtp | PublishTransferEvent
          | ReleaseLimit)


# --------------------------------------------------------------------------------------
# the saga
# --------------------------------------------------------------------------------------


@quick
@dataclass(frozen=True, slots=True)
class Saga:
    transfer: Transfer
    state: State
    seq: int
    created_at: float
    updated_at: float
    origin_request_id: str  # the transferConfirm that started it
    reply_to: str  # the request that receives the final outcome
    reply_type: str  # transferConfirm or verifyOtp
    code: str | None = None
    otp_digest: str | None = field(default=None, repr=False)
    #: The pending OTP, sealed (app/domain/otp.py): re-sent when the confirm that started
    #: the saga is delivered again (the first notification may have died with the worker).
    otp_sealed: str | None = field(default=None, repr=False)
    otp_expires_at: float | None = None
    otp_attempts: int = 0
    command_attempts: int = 0
    next_retry_at: float | None = None
    give_up_at: float | None = None  # top-up: when an unanswered charge fails
    last_trigger: str = ""
    last_outputs: tuple[Output, ...] = ()
    #: Operator resolutions of MANUAL_REVIEW (``bizcenter sagas resolve``): how many were
    #: started (part of their command ids), the last one's action, who and why.
    resolution_count: int = 0
    resolution_action: str | None = None
    resolved_by: str | None = None
    resolution_reason: str | None = None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def deadline(self) -> float | None:
        """When a tick must look at this saga again (None when final)."""
        if self.state is State.AWAITING_OTP:
            return self.otp_expires_at
        if self.state in STEP_OF_STATE:
            times = [t for t in (self.next_retry_at, self.give_up_at) if t is not None]
            return min(times) if times else None
        return None

    def final_reply(self, request_id: str, command_type: str) -> SendReply:
        """The saved final outcome, addressed to ``request_id``."""
        return final_reply(self.transfer.transfer_id, self.state.value, self.code,
                           request_id, command_type)


def final_reply(transfer_id: str, state: str, code: str | None, request_id: str,
                command_type: str) -> SendReply:
    """The final outcome of a transfer, addressed to ``request_id``: from its saga, or from
    its kept idempotency record once the saga was purged."""
    data = {"transferId": transfer_id, "state": state}
    if state == State.COMPLETED.value:
        return SendReply(request_id, "ok", None, None, data, command_type)
    code = code or "INTERNAL"
    message = (MANUAL_REVIEW_MESSAGE if state == State.MANUAL_REVIEW.value
               else MESSAGES.get(code))
    return SendReply(request_id, "error", code, message, data, command_type)


MESSAGES = {
    "INSUFFICIENT_FUNDS": "the payer's balance does not cover the amount",
    "ACCOUNT_NOT_FOUND": "an account of the transfer does not exist or is closed",
    "OTP_EXPIRED": "the one-time password was not verified in time",
    "OTP_LOCKED": "too many wrong one-time passwords",
    "INTERNAL": "the transfer could not be completed; no money was lost",
}
MANUAL_REVIEW_MESSAGE = (
    "the transfer failed and its refund was refused: the amount is held by the account "
    "center until an operator settles it"
)


def command_id(transfer: Transfer, step: str) -> str:
    """``<transferId>:<attempt>:<step>:<homePartition>``; sagas started before attempts
    existed keep ``<transferId>:<step>:<homePartition>``."""
    if transfer.attempt:
        return f"{transfer.transfer_id}:{transfer.attempt}:{step}:{transfer.home_partition}"
    return f"{transfer.transfer_id}:{step}:{transfer.home_partition}"


_HEX = frozenset("0123456789abcdef")
ATTEMPT_CHARS = 16


def is_attempt(value: str) -> bool:
    return len(value) == ATTEMPT_CHARS and set(value) <= _HEX


def step_base(step: str) -> str:
    """The step an id names: ``credit`` or ``refund`` for an operator resolution's
    ``credit.r<n>`` / ``refund.r<n>`` (the n-th resolution of the saga), else ``step``."""
    base, sep, n = step.partition(".r")
    if sep and base in ("credit", "refund") and n.isascii() and n.isdigit():
        return base
    return step


def _resolution_step(saga: Saga, step: str) -> str:
    """The id step of ``step`` for this saga: ``<step>.r<n>`` once an operator's n-th
    resolution started (the account center keeps the refused commands of the first ids
    for ever, so a resolution needs new ones), else ``step``."""
    return f"{step}.r{saga.resolution_count}" if saga.resolution_count else step


def parse_command_id(value: str) -> tuple[str, str, int] | None:
    """``(transfer_id, step, home_partition)`` of a command id this saga emitted, in
    either format (with or without the attempt)."""
    parts = value.rsplit(":", 2)
    if (len(parts) != 3 or not parts[0] or step_base(parts[1]) not in ANSWER_OF_STEP
            or not (parts[2].isascii() and parts[2].isdigit())):
        return None  # isascii: "²".isdigit() is True but int("²") raises
    head = parts[0]
    if ":" in head:
        head, attempt = head.split(":", 1)
        if not head or not is_attempt(attempt):
            return None
    return head, step_base(parts[1]), int(parts[2])


def _step_command(transfer: Transfer, step: str, id_step: str | None = None
                  ) -> SendAccountCommand | SendFundingCommand:
    """The command of a step, with its deterministic id."""
    if transfer.kind == TOPUP and step != "credit":
        # charge, and refund/reverse: both give back the capture of the one charge id
        return SendFundingCommand(
            charge_id=command_id(transfer, "charge"),
            type="charge" if step == "charge" else "refund",
            funding_source_id=transfer.from_account_id,
            amount_minor=transfer.amount_minor,
            currency=transfer.currency,
        )
    account = transfer.to_account_id if step == "credit" else transfer.from_account_id
    return SendAccountCommand(
        command_id=command_id(transfer, id_step or step),
        type=step,
        account_id=account,
        amount_minor=transfer.amount_minor,
        currency=transfer.currency,
        transfer_id=transfer.transfer_id,
        origin=TOPUP if transfer.kind == TOPUP else None,
    )


def origin_type(transfer: Transfer) -> str:
    """The command that starts this kind of saga."""
    return "topUp" if transfer.kind == TOPUP else "transferConfirm"


def first_step(transfer: Transfer) -> State:
    return State.CHARGING if transfer.kind == TOPUP else State.DEBITING


def _move(
    saga: Saga, state: State, now: float, trigger: str, outputs: list[Output], **changes: Any
) -> tuple[Saga, tuple[Output, ...]]:
    """Change state: publish the transfer event, remember the trigger and the outputs."""
    seq = saga.seq + 1
    event = PublishTransferEvent(
        saga.transfer.transfer_id, seq, state.value,
        saga.state.value if saga.seq else None,  # the first event has no previous state
        changes.get("code", saga.code), now,
    )
    all_outputs = (*outputs, event)
    new = replace(
        saga, state=state, seq=seq, updated_at=now, last_trigger=trigger,
        last_outputs=tuple(o for o in all_outputs if not isinstance(o, SendOtp)), **changes,
    )
    if state is State.FAILED:
        release = ReleaseLimit(saga.transfer.transfer_id)
        all_outputs = (release, *all_outputs)
        new = replace(new, last_outputs=(release, *new.last_outputs))
    if new.is_final and not new.resolution_count:
        # (after an operator's resolution no reply: the request had its final answer)
        all_outputs = (*all_outputs, new.final_reply(new.reply_to, new.reply_type))
        new = replace(new, last_outputs=(*new.last_outputs, all_outputs[-1]))
    return new, all_outputs


def _start_step(
    saga: Saga, state: State, now: float, policy: Policy, trigger: str, **changes: Any
) -> tuple[Saga, tuple[Output, ...]]:
    step = STEP_OF_STATE[state]
    if state is State.CHARGING:
        changes["give_up_at"] = now + policy.funding_timeout_seconds
    return _move(
        saga, state, now, trigger,
        [_step_command(saga.transfer, step, _resolution_step(saga, step))],
        command_attempts=1, next_retry_at=now + policy.command_timeout_seconds, **changes,
    )


def start(
    transfer: Transfer,
    *,
    request_id: str,
    otp: str | None,
    user_id: str,
    now: float,
    policy: Policy,
) -> tuple[Saga, tuple[Output, ...]]:
    """A new confirmed transfer (token, PIN and limit already checked).

    ``otp`` is given when the amount is over the user's threshold: the saga then waits for
    it; otherwise it debits the payer at once.
    """
    trigger = f"confirm:{request_id}"
    command_type = origin_type(transfer)
    blank = Saga(
        transfer=transfer, state=State.AWAITING_OTP, seq=0, created_at=now, updated_at=now,
        origin_request_id=request_id, reply_to=request_id, reply_type=command_type,
    )
    if otp is None:
        return _start_step(blank, first_step(transfer), now, policy, trigger)
    expires = now + policy.otp_ttl_seconds
    binding = otp_codes.otp_binding(
        transfer.transfer_id, transfer.amount_minor, transfer.to_account_id,
        transfer.idempotency_key,
    )
    pending = SendReply(
        request_id, "pending", "OTP_REQUIRED", "enter the one-time password sent to your phone",
        {"transferId": transfer.transfer_id, "otpExpiresAt": expires}, command_type,
    )
    digest = otp_codes.otp_digest(policy.otp_pepper, binding, otp)
    return _move(
        blank, State.AWAITING_OTP, now, trigger,
        [SendOtp(user_id, otp, expires, transfer.transfer_id), pending],
        otp_digest=digest,
        otp_sealed=otp_codes.seal_otp(policy.otp_pepper, binding, otp, digest),
        otp_expires_at=expires,
    )


# --------------------------------------------------------------------------------------
# idempotency
# --------------------------------------------------------------------------------------


class Duplicate(StrEnum):
    NEW = "new"
    SAME = "same"  # same key, same payload
    REUSED = "reused"  # same key, different payload


def classify(saga: Saga | None, fingerprint: str) -> Duplicate:
    if saga is None:
        return Duplicate.NEW
    return Duplicate.SAME if saga.transfer.fingerprint == fingerprint else Duplicate.REUSED


def on_duplicate_confirm(
    saga: Saga, request_id: str, now: float, policy: Policy | None = None,
) -> tuple[Saga, tuple[Output, ...]]:
    """The same confirm again: a redelivery, a double click or a retry."""
    if saga.last_trigger == f"confirm:{request_id}":
        # A redelivery of the confirm that started the saga (a crash between the state
        # write and the sends): re-send what was decided, decide nothing new.
        return saga, redelivered_outputs(saga, now, policy)
    outputs: list[Output] = []
    command_type = origin_type(saga.transfer)
    if saga.is_final:
        outputs.append(saga.final_reply(request_id, command_type))
    elif saga.state is State.AWAITING_OTP:
        outputs.append(SendReply(
            request_id, "pending", "OTP_REQUIRED",
            "enter the one-time password sent to your phone",
            {"transferId": saga.transfer.transfer_id, "otpExpiresAt": saga.otp_expires_at},
            command_type,
        ))
    else:
        outputs.append(_in_progress(saga, request_id, command_type))
    return saga, _dedupe_replies(outputs)


def redelivered_outputs(saga: Saga, now: float, policy: Policy | None) -> tuple[Output, ...]:
    """What the saga's last decision sent, to send again when the record that made it is
    delivered again. The OTP notification is not among the stored outputs (no plain OTP is
    stored); while the saga still waits for that OTP it is unsealed and sent again, the same
    OTP, so a crash between the state write and the notification strands no user."""
    outputs = saga.last_outputs
    if (policy is None or saga.state is not State.AWAITING_OTP or saga.otp_sealed is None
            or saga.otp_digest is None or saga.otp_expires_at is None
            or now > saga.otp_expires_at or saga.otp_attempts > 0):
        return outputs
    t = saga.transfer
    binding = otp_codes.otp_binding(t.transfer_id, t.amount_minor, t.to_account_id,
                                    t.idempotency_key)
    otp = otp_codes.unseal_otp(policy.otp_pepper, binding, saga.otp_sealed, saga.otp_digest)
    if otp is None:
        return outputs
    return (SendOtp(t.operator_id, otp, saga.otp_expires_at, t.transfer_id), *outputs)


def _in_progress(saga: Saga, request_id: str, command_type: str) -> SendReply:
    return SendReply(
        request_id, "pending", "IN_PROGRESS", "the transfer is being processed",
        {"transferId": saga.transfer.transfer_id, "state": saga.state.value}, command_type,
    )


def _dedupe_replies(outputs: list[Output]) -> tuple[Output, ...]:
    """At most one reply per request id (the last decided wins)."""
    seen: set[str] = set()
    kept: list[Output] = []
    for output in reversed(outputs):
        if isinstance(output, SendReply):
            if output.request_id in seen:
                continue
            seen.add(output.request_id)
        kept.append(output)
    return tuple(reversed(kept))


# --------------------------------------------------------------------------------------
# inputs after the start
# --------------------------------------------------------------------------------------


def on_otp(
    saga: Saga, request_id: str, otp: str, now: float, policy: Policy, *,
    budget_spent: bool = False,
) -> tuple[Saga, tuple[Output, ...]]:
    """``budget_spent``: the user's wrong OTPs across transfers reached their budget in the
    window: the step-up is refused (OTP_LOCKED), whatever the OTP."""
    trigger = f"otp:{request_id}"
    if saga.last_trigger == trigger:
        return saga, saga.last_outputs  # redelivery of the verifyOtp that moved the saga
    if saga.is_final:
        return saga, (saga.final_reply(request_id, "verifyOtp"),)
    if saga.state is not State.AWAITING_OTP:
        return saga, (_in_progress(saga, request_id, "verifyOtp"),)
    assert saga.otp_digest is not None and saga.otp_expires_at is not None
    if now > saga.otp_expires_at:
        return _move(
            saga, State.FAILED, now, trigger, [], code="OTP_EXPIRED",
            reply_to=request_id, reply_type="verifyOtp", otp_digest=None, otp_sealed=None,
        )
    if budget_spent:
        return _move(
            saga, State.FAILED, now, trigger, [], code="OTP_LOCKED",
            reply_to=request_id, reply_type="verifyOtp", otp_digest=None, otp_sealed=None,
        )
    t = saga.transfer
    binding = otp_codes.otp_binding(t.transfer_id, t.amount_minor, t.to_account_id,
                                    t.idempotency_key)
    if otp_codes.otp_matches(policy.otp_pepper, binding, otp, saga.otp_digest):
        return _start_step(
            saga, first_step(saga.transfer), now, policy, trigger,
            reply_to=request_id, reply_type="verifyOtp", otp_digest=None, otp_sealed=None,
        )
    attempts = saga.otp_attempts + 1
    if attempts >= policy.otp_max_attempts:
        return _move(
            saga, State.FAILED, now, trigger, [], code="OTP_LOCKED", otp_attempts=attempts,
            reply_to=request_id, reply_type="verifyOtp", otp_digest=None, otp_sealed=None,
        )
    reply = SendReply(
        request_id, "error", "INVALID_OTP", "the one-time password is wrong",
        {"transferId": t.transfer_id, "attemptsLeft": policy.otp_max_attempts - attempts},
        "verifyOtp",
    )
    # Not a state change: the saga keeps waiting, but remembers this attempt and its reply.
    new = replace(saga, otp_attempts=attempts, updated_at=now, last_trigger=trigger,
                  last_outputs=(reply,))
    return new, (reply,)


REJECTION_CODES = {"INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"}
#: The account center's refusal of a known commandId sent with other content: not an
#: answer to the command that owns the id (that one's event stands), so never a decision.
COMMAND_ID_CONFLICT = "COMMAND_ID_CONFLICT"


def on_account_event(
    saga: Saga, command_id_: str, event_type: str, reason: str | None, now: float,
    policy: Policy,
) -> tuple[Saga, tuple[Output, ...]]:
    trigger = f"event:{command_id_}:{event_type}"
    if saga.last_trigger == trigger:
        return saga, saga.last_outputs  # redelivery of the event that moved the saga
    step = STEP_OF_STATE.get(saga.state)
    if step is None or command_id_ != command_id(saga.transfer, _resolution_step(saga, step)):
        return saga, ()  # stale or foreign: already handled, nothing to decide
    if event_type == ANSWER_OF_STEP[step]:
        if saga.state is State.DEBITING:
            return _start_step(saga, State.CREDITING, now, policy, trigger)
        if saga.state is State.CREDITING:
            return _move(saga, State.COMPLETED, now, trigger, [], next_retry_at=None)
        return _move(saga, State.FAILED, now, trigger, [], next_retry_at=None)
    if event_type != "rejected" or reason == COMMAND_ID_CONFLICT:
        return saga, ()  # an answer of another kind, or to another command with our id
    code = reason if reason in REJECTION_CODES else "INTERNAL"
    if saga.state is State.DEBITING:
        return _move(saga, State.FAILED, now, trigger, [], code=code, next_retry_at=None)
    if saga.state is State.CREDITING:
        return _start_step(saga, State.REFUNDING, now, policy, trigger, code=code)
    return _move(saga, State.MANUAL_REVIEW, now, trigger, [], code="INTERNAL",
                 next_retry_at=None)


def on_funding_event(
    saga: Saga, charge_id: str, status: str, now: float, policy: Policy
) -> tuple[Saga, tuple[Output, ...]]:
    """The funding provider's answer about the top-up's charge (captured, declined,
    refunded)."""
    trigger = f"funding:{charge_id}:{status}"
    if saga.last_trigger == trigger:
        return saga, saga.last_outputs  # redelivery of the event that moved the saga
    if saga.transfer.kind != TOPUP or charge_id != command_id(saga.transfer, "charge"):
        return saga, ()
    if saga.state is State.CHARGING:
        if status == "captured":
            return _start_step(saga, State.CREDITING, now, policy, trigger, give_up_at=None)
        if status == "declined":
            return _move(saga, State.FAILED, now, trigger, [], code="FUNDING_DECLINED",
                         next_retry_at=None, give_up_at=None)
        return saga, ()
    if saga.state in (State.REFUNDING, State.REVERSING) and status == "refunded":
        return _move(saga, State.FAILED, now, trigger, [], next_retry_at=None)
    if (saga.state is State.FAILED and saga.code == "FUNDING_TIMEOUT"
            and status == "captured"):
        return _start_step(saga, State.REVERSING, now, policy, trigger)
    return saga, ()  # stale


def on_tick(saga: Saga, now: float, policy: Policy) -> tuple[Saga, tuple[Output, ...]]:
    """Deadlines: an OTP never verified fails the transfer; an unanswered account command
    is re-sent with the same command id, with exponential back-off, until it is answered."""
    if saga.state is State.AWAITING_OTP:
        if saga.otp_expires_at is not None and now > saga.otp_expires_at:
            return _move(saga, State.FAILED, now, f"tick:{saga.seq}", [], code="OTP_EXPIRED",
                         otp_digest=None, otp_sealed=None)
        return saga, ()
    if (saga.state is State.CHARGING and saga.give_up_at is not None
            and now >= saga.give_up_at):
        # The provider never answered: the top-up fails, nothing was credited. Should the
        # capture arrive later, on_funding_event gives it back (REVERSING).
        return _move(saga, State.FAILED, now, f"tick:{saga.seq}", [], code="FUNDING_TIMEOUT",
                     next_retry_at=None, give_up_at=None)
    step = STEP_OF_STATE.get(saga.state)
    if step is None or saga.next_retry_at is None or now < saga.next_retry_at:
        return saga, ()
    backoff = min(
        policy.command_timeout_seconds * 2 ** saga.command_attempts,
        policy.command_max_backoff_seconds,
    )
    new = replace(saga, command_attempts=saga.command_attempts + 1, next_retry_at=now + backoff)
    return new, (_step_command(saga.transfer, step, _resolution_step(saga, step)),)


RESOLUTION_ACTIONS = frozenset({"refund", "complete"})


def on_resolution(
    saga: Saga, resolution_id: str, number: int, action: str, operator: str, reason: str,
    now: float, policy: Policy,
) -> tuple[Saga, tuple[Output, ...]]:
    """An operator settles a MANUAL_REVIEW transfer (``bizcenter sagas resolve``):
    ``refund`` gives the amount held in clearing back to the payer (REFUNDING, then FAILED),
    ``complete`` credits the payee (CREDITING, then COMPLETED; a refused credit falls back
    to the refund, as in any transfer). The money moves through the account center like any
    step, under new command ids (``<step>.r<n>``), so once. The same resolution again (a
    redelivery, the command run twice) re-sends what it decided; a resolution of a saga not
    in MANUAL_REVIEW (already resolved, or a top-up) changes nothing. A refused resolution
    ends in MANUAL_REVIEW again. No reply is sent: the request had its final answer; the
    outcome is on business.transfer-events.

    ``number`` is the resolution's place (1 for the first, as the operator's command read
    it from the saga): only ``resolution_count + 1`` is decided. An older one (a replay of
    business.saga-inputs, a redelivery after the saga moved on, even after a refused
    resolution brought it back to MANUAL_REVIEW) re-sends what it decided while it is the
    saga's last input, else nothing: it never decides again."""
    trigger = f"resolve:{resolution_id}"
    if saga.last_trigger == trigger:
        return saga, saga.last_outputs
    if (number != saga.resolution_count + 1 or saga.state is not State.MANUAL_REVIEW
            or saga.transfer.kind == TOPUP or action not in RESOLUTION_ACTIONS):
        return saga, ()
    moved = replace(saga, resolution_count=saga.resolution_count + 1, resolution_action=action,
                    resolved_by=operator, resolution_reason=reason,
                    code=saga.code if action == "refund" else None)
    state = State.REFUNDING if action == "refund" else State.CREDITING
    return _start_step(moved, state, now, policy, trigger)


# --------------------------------------------------------------------------------------
# storage form
# --------------------------------------------------------------------------------------

_OUTPUT_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (SendReply, SendAccountCommand, SendFundingCommand, SendOtp,
                PublishTransferEvent, ReleaseLimit)
}


def _names(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclass_fields(cls))


_SAGA_NAMES = _names(Saga)
_TRANSFER_NAMES = _names(Transfer)
_OUTPUT_NAMES = {cls: _names(cls) for cls in _OUTPUT_TYPES.values()}


def saga_to_dict(saga: Saga) -> dict[str, Any]:
    """The storage form (JSON through orjson): field by field, not ``asdict``, whose deep
    copy cost ~118 µs a call (3 calls per transfer); the values are immutable or go
    straight to orjson. tests/fakes.py (DictSagas) checks every saga the unit tests write
    against the ``asdict`` form, byte for byte."""
    data = {n: getattr(saga, n) for n in _SAGA_NAMES}
    t = saga.transfer
    data["transfer"] = {n: getattr(t, n) for n in _TRANSFER_NAMES}
    data["state"] = saga.state.value
    data["last_outputs"] = [
        {"t": type(o).__name__, **{n: getattr(o, n) for n in _OUTPUT_NAMES[type(o)]}}
        for o in saga.last_outputs
    ]
    return data


_FIELD_SETS: dict[type[Any], frozenset[str]] = {
    cls: frozenset(_names(cls)) for cls in (Saga, Transfer, *_OUTPUT_TYPES.values())}


def _known(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` without the keys ``cls`` does not have: a saga written by a newer
    version (a field added since) still reads, its new fields ignored."""
    names = _FIELD_SETS[cls]
    if data.keys() <= names:  # the usual case: written by this version
        return dict(data)
    return {k: v for k, v in data.items() if k in names}


def saga_from_dict(data: dict[str, Any]) -> Saga:
    """The stored form back. Unknown keys are ignored (of the saga, its transfer and its
    outputs), so a version reading a saga stored by a later one does not fail on a field
    added since (docs/operations.md, "Upgrade")."""
    fields = _known(Saga, data)
    fields["transfer"] = Transfer(**_known(Transfer, data["transfer"]))
    fields["state"] = State(fields["state"])
    outputs = []
    for raw in data.get("last_outputs", []):
        item = dict(raw)
        cls = _OUTPUT_TYPES[item.pop("t")]
        outputs.append(cls(**_known(cls, item)))
    fields["last_outputs"] = tuple(outputs)
    return Saga(**fields)
