"""Unit tests of the pure transfer saga (app/domain/transfer_saga.py): no I/O, no clock.

Over 400 lines: every state by every input of the one machine, from one set of builders.
"""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from app.domain import otp as otp_codes
from app.domain import transfer_saga as s
from app.domain.transfer_saga import (
    Duplicate,
    PublishTransferEvent,
    ReleaseLimit,
    Saga,
    SendAccountCommand,
    SendOtp,
    SendReply,
    State,
)

PEPPER = b"unit-test-otp-pepper-0123456789abcdef"
POLICY = s.Policy(
    otp_ttl_seconds=300.0,
    otp_max_attempts=5,
    otp_pepper=PEPPER,
    command_timeout_seconds=5.0,
    command_max_backoff_seconds=40.0,
)
T0 = 1_000_000.0
TRANSFER = s.Transfer(
    transfer_id="tr-1", operator_id="alice", idempotency_key="idem-1", fingerprint="fp-1",
    from_account_id="acc-a", to_account_id="acc-b", amount_minor=12_345, currency="EUR",
    note="rent", home_partition=3,
)
OTP = "482913"
WRONG_OTP = "000000"
CONFIRM = "r-confirm"
DEBIT_ID = "tr-1:debit:3"
CREDIT_ID = "tr-1:credit:3"
REFUND_ID = "tr-1:refund:3"
ID_OF_STEP = {"debit": DEBIT_ID, "credit": CREDIT_ID, "refund": REFUND_ID}
ACCOUNT_OF_STEP = {"debit": "acc-a", "credit": "acc-b", "refund": "acc-a"}


# --------------------------------------------------------------------------------------
# builders: a saga in every state, reached through the public steps only
# --------------------------------------------------------------------------------------


def start(otp: str | None = None, request_id: str = CONFIRM) -> tuple[Saga, tuple[s.Output, ...]]:
    return s.start(TRANSFER, request_id=request_id, otp=otp, user_id="alice", now=T0,
                   policy=POLICY)


def event(saga: Saga, cid: str, type_: str, reason: str | None = None,
          now: float = T0 + 1) -> tuple[Saga, tuple[s.Output, ...]]:
    return s.on_account_event(saga, cid, type_, reason, now, POLICY)


def wrong_otps(saga: Saga, n: int) -> Saga:
    for i in range(n):
        saga, _ = s.on_otp(saga, f"r-wrong-{i}", WRONG_OTP, T0 + 1 + i, POLICY)
    return saga


def command(step: str) -> SendAccountCommand:
    return SendAccountCommand(ID_OF_STEP[step], step, ACCOUNT_OF_STEP[step], 12_345, "EUR",
                              "tr-1")


def build() -> dict[str, Saga]:
    awaiting = start(OTP)[0]
    debiting = start()[0]
    crediting = event(debiting, DEBIT_ID, "debited")[0]
    refunding = event(crediting, CREDIT_ID, "rejected", "ACCOUNT_NOT_FOUND")[0]
    return {
        "awaiting_otp": awaiting,
        "awaiting_otp_after_wrong": wrong_otps(awaiting, 2),
        "debiting": debiting,
        "debiting_after_otp": s.on_otp(awaiting, "r-otp", OTP, T0 + 10, POLICY)[0],
        "debiting_after_retry": s.on_tick(debiting, T0 + 5, POLICY)[0],
        "crediting": crediting,
        "refunding": refunding,
        "completed": event(crediting, CREDIT_ID, "credited")[0],
        "failed_insufficient": event(debiting, DEBIT_ID, "rejected", "INSUFFICIENT_FUNDS")[0],
        "failed_otp_locked": wrong_otps(awaiting, 5),
        "failed_otp_expired_by_otp": s.on_otp(awaiting, "r-late", OTP, T0 + 301, POLICY)[0],
        "failed_otp_expired_by_tick": s.on_tick(awaiting, T0 + 301, POLICY)[0],
        "failed_after_refund": event(refunding, REFUND_ID, "refunded")[0],
        "manual_review": event(refunding, REFUND_ID, "rejected", "ACCOUNT_NOT_FOUND")[0],
    }


SAGAS = build()
#: The states a transfer (not a top-up: see test_topup_saga.py) goes through.
TRANSFER_STATES = [st for st in State if st not in (State.CHARGING, State.REVERSING)]
#: The canonical saga of each state (used by the state-by-event matrix).
IN_STATE = {
    State.AWAITING_OTP: SAGAS["awaiting_otp"],
    State.DEBITING: SAGAS["debiting"],
    State.CREDITING: SAGAS["crediting"],
    State.REFUNDING: SAGAS["refunding"],
    State.COMPLETED: SAGAS["completed"],
    State.FAILED: SAGAS["failed_insufficient"],
    State.MANUAL_REVIEW: SAGAS["manual_review"],
}
#: The (step, event type) that brought each canonical saga into its state.
ARRIVED_BY = {
    State.CREDITING: ("debit", "debited"),
    State.REFUNDING: ("credit", "rejected"),
    State.COMPLETED: ("credit", "credited"),
    State.FAILED: ("debit", "rejected"),
    State.MANUAL_REVIEW: ("refund", "rejected"),
}


def test_builders_reach_the_states_they_are_named_after() -> None:
    expected = {
        "awaiting_otp": State.AWAITING_OTP, "awaiting_otp_after_wrong": State.AWAITING_OTP,
        "debiting": State.DEBITING, "debiting_after_otp": State.DEBITING,
        "debiting_after_retry": State.DEBITING, "crediting": State.CREDITING,
        "refunding": State.REFUNDING, "completed": State.COMPLETED,
        "failed_insufficient": State.FAILED, "failed_otp_locked": State.FAILED,
        "failed_otp_expired_by_otp": State.FAILED, "failed_otp_expired_by_tick": State.FAILED,
        "failed_after_refund": State.FAILED, "manual_review": State.MANUAL_REVIEW,
    }
    assert {name: saga.state for name, saga in SAGAS.items()} == expected


# --------------------------------------------------------------------------------------
# start
# --------------------------------------------------------------------------------------


def test_start_without_otp_debits_the_payer_at_once() -> None:
    saga, outputs = start()
    assert outputs == (
        SendAccountCommand("tr-1:debit:3", "debit", "acc-a", 12_345, "EUR", "tr-1"),
        PublishTransferEvent("tr-1", 1, "DEBITING", None, None, T0),
    )
    assert saga.state is State.DEBITING
    assert (saga.seq, saga.command_attempts, saga.next_retry_at) == (1, 1, T0 + 5)
    assert saga.deadline() == T0 + 5
    assert (saga.reply_to, saga.reply_type, saga.origin_request_id) == (
        CONFIRM, "transferConfirm", CONFIRM)
    assert saga.last_trigger == f"confirm:{CONFIRM}"
    assert saga.last_outputs == outputs
    assert saga.otp_digest is None and saga.otp_expires_at is None
    assert not any(isinstance(o, SendReply) for o in outputs)  # the outcome comes later


def test_start_with_otp_sends_it_and_waits() -> None:
    saga, outputs = start(OTP)
    assert len(outputs) == 3
    assert outputs[0] == SendOtp("alice", OTP, T0 + 300, "tr-1")
    reply = outputs[1]
    assert isinstance(reply, SendReply) and reply.message
    assert replace(reply, message=None) == SendReply(
        CONFIRM, "pending", "OTP_REQUIRED", None,
        {"transferId": "tr-1", "otpExpiresAt": T0 + 300}, "transferConfirm",
    )
    assert outputs[2] == PublishTransferEvent("tr-1", 1, "AWAITING_OTP", None, None, T0)
    assert saga.state is State.AWAITING_OTP
    assert saga.deadline() == saga.otp_expires_at == T0 + 300
    binding = otp_codes.otp_binding("tr-1", 12_345, "acc-b", "idem-1")
    assert saga.otp_digest == otp_codes.otp_digest(PEPPER, binding, OTP)
    # The plain OTP exists only in the SendOtp output: not stored, not in any repr.
    assert saga.last_outputs == outputs[1:]
    assert OTP not in orjson.dumps(s.saga_to_dict(saga)).decode()
    assert OTP not in repr(saga) and OTP not in repr(outputs)
    assert PEPPER.decode() not in repr(POLICY)


@pytest.mark.parametrize(
    "change",
    [{"amount_minor": 12_346}, {"to_account_id": "acc-c"}, {"idempotency_key": "idem-2"},
     {"transfer_id": "tr-2"}],
)
def test_the_otp_digest_is_bound_to_the_transfer(change: dict[str, object]) -> None:
    other = replace(TRANSFER, **change)  # type: ignore[arg-type]
    saga = s.start(other, request_id=CONFIRM, otp=OTP, user_id="alice", now=T0, policy=POLICY)[0]
    assert saga.otp_digest != SAGAS["awaiting_otp"].otp_digest
    # ... so the right code of one transfer does not pass for a transfer bound otherwise.
    forged = replace(SAGAS["awaiting_otp"], otp_digest=saga.otp_digest)
    new, outputs = s.on_otp(forged, "r-otp", OTP, T0 + 1, POLICY)
    assert new.state is State.AWAITING_OTP and new.otp_attempts == 1
    assert [o.code for o in outputs if isinstance(o, SendReply)] == ["INVALID_OTP"]


# --------------------------------------------------------------------------------------
# on_otp
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrong_before", "code", "now", "state", "result_code"),
    [
        (0, OTP, T0 + 10, State.DEBITING, None),
        (4, OTP, T0 + 10, State.DEBITING, None),
        (0, OTP, T0 + 300, State.DEBITING, None),  # at the expiry instant: still valid
        (0, OTP, T0 + 300.001, State.FAILED, "OTP_EXPIRED"),
        (0, WRONG_OTP, T0 + 10, State.AWAITING_OTP, "INVALID_OTP"),
        (3, WRONG_OTP, T0 + 10, State.AWAITING_OTP, "INVALID_OTP"),
        (4, WRONG_OTP, T0 + 10, State.FAILED, "OTP_LOCKED"),
        (0, WRONG_OTP, T0 + 301, State.FAILED, "OTP_EXPIRED"),  # expiry wins over wrong
    ],
)
def test_on_otp(wrong_before: int, code: str, now: float, state: State,
                result_code: str | None) -> None:
    before = wrong_otps(SAGAS["awaiting_otp"], wrong_before)
    saga, outputs = s.on_otp(before, "r-otp", code, now, POLICY)
    assert saga.state is state
    if state is State.DEBITING:
        assert outputs == (
            command("debit"),
            PublishTransferEvent("tr-1", 2, "DEBITING", "AWAITING_OTP", None, now),
        )
        assert (saga.reply_to, saga.reply_type) == ("r-otp", "verifyOtp")
        assert saga.otp_digest is None
        assert (saga.command_attempts, saga.next_retry_at) == (1, now + 5)
    elif state is State.AWAITING_OTP:
        attempts = wrong_before + 1
        assert outputs == (SendReply(
            "r-otp", "error", "INVALID_OTP", "the one-time password is wrong",
            {"transferId": "tr-1", "attemptsLeft": 5 - attempts}, "verifyOtp",
        ),)
        assert saga.otp_attempts == attempts
        assert saga.seq == 1  # not a state change: no transfer event
        assert saga.otp_digest == before.otp_digest
    else:
        assert outputs == (
            ReleaseLimit("tr-1"),
            PublishTransferEvent("tr-1", 2, "FAILED", "AWAITING_OTP", result_code, now),
            SendReply("r-otp", "error", result_code, s.MESSAGES[str(result_code)],
                      {"transferId": "tr-1", "state": "FAILED"}, "verifyOtp"),
        )
        assert saga.code == result_code and saga.otp_digest is None
        assert saga.deadline() is None
    assert saga.last_trigger == "otp:r-otp"
    assert saga.last_outputs == outputs


@pytest.mark.parametrize("code", [OTP, WRONG_OTP])
def test_on_otp_after_the_lock_only_repeats_the_outcome(code: str) -> None:
    locked = SAGAS["failed_otp_locked"]
    saga, outputs = s.on_otp(locked, "r-after", code, T0 + 20, POLICY)
    assert saga is locked
    assert outputs == (SendReply("r-after", "error", "OTP_LOCKED", s.MESSAGES["OTP_LOCKED"],
                                 {"transferId": "tr-1", "state": "FAILED"}, "verifyOtp"),)


@pytest.mark.parametrize("name", ["debiting", "crediting", "refunding", "debiting_after_otp"])
def test_on_otp_while_money_moves_is_in_progress(name: str) -> None:
    before = SAGAS[name]
    saga, outputs = s.on_otp(before, "r-other", OTP, T0 + 20, POLICY)
    assert saga is before
    assert outputs == (SendReply(
        "r-other", "pending", "IN_PROGRESS", "the transfer is being processed",
        {"transferId": "tr-1", "state": before.state.value}, "verifyOtp",
    ),)


# --------------------------------------------------------------------------------------
# on_account_event: every state by every event
# --------------------------------------------------------------------------------------

EVENTS = [
    ("debited", None),
    ("credited", None),
    ("refunded", None),
    ("rejected", "INSUFFICIENT_FUNDS"),
    ("rejected", "ACCOUNT_NOT_FOUND"),
    ("rejected", "CURRENCY_MISMATCH"),
    ("rejected", None),
]
#: (state, step of the command id, event type, reason) -> (new state, code of the saga).
TRANSITIONS: dict[tuple[State, str, str, str | None], tuple[State, str | None]] = {
    (State.DEBITING, "debit", "debited", None): (State.CREDITING, None),
    (State.DEBITING, "debit", "rejected", "INSUFFICIENT_FUNDS"):
        (State.FAILED, "INSUFFICIENT_FUNDS"),
    (State.DEBITING, "debit", "rejected", "ACCOUNT_NOT_FOUND"): (State.FAILED, "ACCOUNT_NOT_FOUND"),
    (State.DEBITING, "debit", "rejected", "CURRENCY_MISMATCH"): (State.FAILED, "INTERNAL"),
    (State.DEBITING, "debit", "rejected", None): (State.FAILED, "INTERNAL"),
    (State.CREDITING, "credit", "credited", None): (State.COMPLETED, None),
    (State.CREDITING, "credit", "rejected", "INSUFFICIENT_FUNDS"):
        (State.REFUNDING, "INSUFFICIENT_FUNDS"),
    (State.CREDITING, "credit", "rejected", "ACCOUNT_NOT_FOUND"):
        (State.REFUNDING, "ACCOUNT_NOT_FOUND"),
    (State.CREDITING, "credit", "rejected", "CURRENCY_MISMATCH"): (State.REFUNDING, "INTERNAL"),
    (State.CREDITING, "credit", "rejected", None): (State.REFUNDING, "INTERNAL"),
    # the canonical REFUNDING saga's credit was rejected with ACCOUNT_NOT_FOUND: kept
    (State.REFUNDING, "refund", "refunded", None): (State.FAILED, "ACCOUNT_NOT_FOUND"),
    (State.REFUNDING, "refund", "rejected", "INSUFFICIENT_FUNDS"):
        (State.MANUAL_REVIEW, "INTERNAL"),
    (State.REFUNDING, "refund", "rejected", "ACCOUNT_NOT_FOUND"): (State.MANUAL_REVIEW, "INTERNAL"),
    (State.REFUNDING, "refund", "rejected", "CURRENCY_MISMATCH"): (State.MANUAL_REVIEW, "INTERNAL"),
    (State.REFUNDING, "refund", "rejected", None): (State.MANUAL_REVIEW, "INTERNAL"),
}
NEXT_STEP = {State.CREDITING: "credit", State.REFUNDING: "refund"}


def expected_transition(before: Saga, new_state: State, code: str | None,
                        now: float) -> tuple[s.Output, ...]:
    event_out = PublishTransferEvent("tr-1", before.seq + 1, new_state.value,
                                     before.state.value, code, now)
    data = {"transferId": "tr-1", "state": new_state.value}
    if new_state in NEXT_STEP:
        return (command(NEXT_STEP[new_state]), event_out)
    if new_state is State.COMPLETED:
        return (event_out, SendReply(CONFIRM, "ok", None, None, data, "transferConfirm"))
    message = (s.MANUAL_REVIEW_MESSAGE if new_state is State.MANUAL_REVIEW
               else s.MESSAGES[str(code)])
    final = SendReply(CONFIRM, "error", code, message, data, "transferConfirm")
    if new_state is State.FAILED:
        return (ReleaseLimit("tr-1"), event_out, final)
    return (event_out, final)  # MANUAL_REVIEW: the reservation stays, operators act


@pytest.mark.parametrize("state", TRANSFER_STATES)
@pytest.mark.parametrize("step", ["debit", "credit", "refund"])
@pytest.mark.parametrize(("type_", "reason"), EVENTS)
def test_on_account_event(state: State, step: str, type_: str, reason: str | None) -> None:
    before = IN_STATE[state]
    now = T0 + 50
    saga, outputs = event(before, ID_OF_STEP[step], type_, reason, now=now)
    transition = TRANSITIONS.get((state, step, type_, reason))
    if ARRIVED_BY.get(state) == (step, type_):
        # The event that brought the saga here, again: a redelivery.
        assert saga is before
        assert outputs == before.last_outputs and outputs
    elif transition is None:
        assert saga is before  # stale, or an answer of another kind: nothing to decide
        assert outputs == ()
    else:
        new_state, code = transition
        assert saga.state is new_state and saga.code == code
        assert outputs == expected_transition(before, new_state, code, now)
        assert saga.seq == before.seq + 1 and saga.updated_at == now
        assert saga.last_trigger == f"event:{ID_OF_STEP[step]}:{type_}"
        assert saga.last_outputs == outputs
        if new_state in NEXT_STEP:
            assert (saga.command_attempts, saga.next_retry_at) == (1, now + 5)
        else:
            assert saga.deadline() is None


@pytest.mark.parametrize("state", TRANSFER_STATES)
@pytest.mark.parametrize(
    "cid",
    ["tr-2:debit:3", "tr-2:credit:3", "tr-1:debit:4", "tr-1:credit:0", "tr-1:refund:30",
     "tr-1:debit", "tr-1", "x:tr-1:debit:3", "tr-1:transfer:3", ""],
)
@pytest.mark.parametrize(("type_", "reason"), EVENTS)
def test_foreign_command_ids_are_ignored(state: State, cid: str, type_: str,
                                         reason: str | None) -> None:
    before = IN_STATE[state]
    saga, outputs = event(before, cid, type_, reason)
    assert saga is before and outputs == ()


# --------------------------------------------------------------------------------------
# duplicates
# --------------------------------------------------------------------------------------


def redeliver(saga: Saga) -> tuple[Saga, tuple[s.Output, ...]]:
    kind, _, rest = saga.last_trigger.partition(":")
    if kind == "confirm":
        return s.on_duplicate_confirm(saga, rest, T0 + 1000)
    if kind == "otp":
        return s.on_otp(saga, rest, OTP, T0 + 1000, POLICY)
    assert kind == "event"
    cid, type_ = rest.rsplit(":", 1)
    return event(saga, cid, type_, "ACCOUNT_NOT_FOUND", now=T0 + 1000)


@pytest.mark.parametrize("name", [n for n, v in SAGAS.items()
                                  if not v.last_trigger.startswith("tick:")])
def test_redelivered_last_trigger_resends_exactly_the_last_outputs(name: str) -> None:
    before = SAGAS[name]
    saga, outputs = redeliver(before)
    assert saga is before  # nothing decided again
    assert outputs == before.last_outputs
    assert outputs  # every trigger decided something worth re-sending
    assert not any(isinstance(o, SendOtp) for o in outputs)


def test_a_redelivered_confirm_never_resends_the_otp() -> None:
    saga, first = start(OTP)
    assert any(isinstance(o, SendOtp) for o in first)
    again, outputs = s.on_duplicate_confirm(saga, CONFIRM, T0 + 1)
    assert again is saga
    assert [type(o) for o in outputs] == [SendReply, PublishTransferEvent]
    assert outputs == first[1:]


@pytest.mark.parametrize("name", list(SAGAS))
def test_another_confirm_under_the_same_key(name: str) -> None:
    before = SAGAS[name]
    saga, outputs = s.on_duplicate_confirm(before, "r-double-click", T0 + 1000)
    assert saga is before
    assert len(outputs) == 1
    reply = outputs[0]
    assert isinstance(reply, SendReply)
    assert (reply.request_id, reply.command_type) == ("r-double-click", "transferConfirm")
    assert reply.data is not None and reply.data["transferId"] == "tr-1"
    if before.is_final:
        assert reply == before.final_reply("r-double-click", "transferConfirm")
        assert reply.data["state"] == before.state.value
    elif before.state is State.AWAITING_OTP:
        assert (reply.status, reply.code) == ("pending", "OTP_REQUIRED")
        assert reply.data["otpExpiresAt"] == T0 + 300
    else:
        assert (reply.status, reply.code) == ("pending", "IN_PROGRESS")
        assert reply.data["state"] == before.state.value


@pytest.mark.parametrize(
    ("saga", "fingerprint", "verdict"),
    [
        (None, "fp-1", Duplicate.NEW),
        (SAGAS["debiting"], "fp-1", Duplicate.SAME),
        (SAGAS["completed"], "fp-1", Duplicate.SAME),
        (SAGAS["debiting"], "fp-2", Duplicate.REUSED),
        (SAGAS["failed_otp_locked"], "", Duplicate.REUSED),
    ],
)
def test_classify(saga: Saga | None, fingerprint: str, verdict: Duplicate) -> None:
    assert s.classify(saga, fingerprint) is verdict


# --------------------------------------------------------------------------------------
# on_tick
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("now", [T0, T0 + 299, T0 + 300])
def test_tick_before_the_otp_expires_does_nothing(now: float) -> None:
    before = SAGAS["awaiting_otp"]
    saga, outputs = s.on_tick(before, now, POLICY)
    assert saga is before and outputs == ()


def test_tick_after_the_otp_expired_fails_the_transfer() -> None:
    now = T0 + 300.5
    saga, outputs = s.on_tick(SAGAS["awaiting_otp_after_wrong"], now, POLICY)
    assert saga.state is State.FAILED and saga.code == "OTP_EXPIRED"
    assert outputs == (
        ReleaseLimit("tr-1"),
        PublishTransferEvent("tr-1", 2, "FAILED", "AWAITING_OTP", "OTP_EXPIRED", now),
        SendReply(CONFIRM, "error", "OTP_EXPIRED", s.MESSAGES["OTP_EXPIRED"],
                  {"transferId": "tr-1", "state": "FAILED"}, "transferConfirm"),
    )
    assert saga.otp_digest is None and saga.deadline() is None
    assert not any(isinstance(o, SendAccountCommand) for o in outputs)


@pytest.mark.parametrize(("state", "step"), [(State.DEBITING, "debit"),
                                             (State.CREDITING, "credit"),
                                             (State.REFUNDING, "refund")])
def test_tick_resends_the_unanswered_command_with_capped_backoff(state: State,
                                                                 step: str) -> None:
    saga = IN_STATE[state]
    assert saga.next_retry_at is not None
    early, nothing = s.on_tick(saga, saga.next_retry_at - 0.001, POLICY)
    assert early is saga and nothing == ()
    delays = []
    for attempt in range(1, 7):
        now = saga.next_retry_at
        assert now is not None
        new, outputs = s.on_tick(saga, now, POLICY)
        assert outputs == (command(step),)  # the same command id every time
        assert new.command_attempts == attempt + 1
        assert new.next_retry_at is not None
        delays.append(new.next_retry_at - now)
        # a retry is not a transition: the redelivery memory is untouched
        assert (new.state, new.seq, new.last_trigger, new.last_outputs) == (
            saga.state, saga.seq, saga.last_trigger, saga.last_outputs)
        saga = new
    assert delays == [10.0, 20.0, 40.0, 40.0, 40.0, 40.0]  # 5·2^n, capped at 40


def test_an_answer_after_retries_moves_on_with_fresh_attempts() -> None:
    retried = s.on_tick(s.on_tick(SAGAS["debiting"], T0 + 5, POLICY)[0], T0 + 15, POLICY)[0]
    assert retried.command_attempts == 3
    saga, outputs = event(retried, DEBIT_ID, "debited", now=T0 + 16)
    assert saga.state is State.CREDITING
    assert (saga.command_attempts, saga.next_retry_at) == (1, T0 + 21)
    assert outputs[0] == command("credit")


@pytest.mark.parametrize("name", [n for n, v in SAGAS.items() if v.is_final])
def test_tick_leaves_final_sagas_alone(name: str) -> None:
    before = SAGAS[name]
    saga, outputs = s.on_tick(before, T0 + 10**6, POLICY)
    assert saga is before and outputs == ()
    assert before.deadline() is None


# --------------------------------------------------------------------------------------
# final replies
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("completed", "ok", None),
        ("failed_insufficient", "error", "INSUFFICIENT_FUNDS"),
        ("failed_otp_locked", "error", "OTP_LOCKED"),
        ("failed_otp_expired_by_otp", "error", "OTP_EXPIRED"),
        ("failed_otp_expired_by_tick", "error", "OTP_EXPIRED"),
        ("failed_after_refund", "error", "ACCOUNT_NOT_FOUND"),
        ("manual_review", "error", "INTERNAL"),
    ],
)
def test_final_reply(name: str, status: str, code: str | None) -> None:
    saga = SAGAS[name]
    reply = saga.final_reply("r-any", "verifyOtp")
    assert (reply.request_id, reply.status, reply.code, reply.command_type) == (
        "r-any", status, code, "verifyOtp")
    assert reply.data == {"transferId": "tr-1", "state": saga.state.value}
    assert (reply.message is None) == (status == "ok")


def test_final_reply_without_a_code_is_internal() -> None:
    saga = replace(SAGAS["failed_insufficient"], code=None)
    reply = saga.final_reply("r", "transferConfirm")
    assert (reply.status, reply.code, reply.message) == ("error", "INTERNAL",
                                                         s.MESSAGES["INTERNAL"])


def test_the_final_reply_goes_to_the_request_that_moved_the_saga_last() -> None:
    assert [o for o in SAGAS["failed_otp_locked"].last_outputs if isinstance(o, SendReply)] == [
        SAGAS["failed_otp_locked"].final_reply("r-wrong-4", "verifyOtp")]
    completed = event(event(SAGAS["debiting_after_otp"], DEBIT_ID, "debited")[0],
                      CREDIT_ID, "credited")[0]
    assert completed.last_outputs[-1] == completed.final_reply("r-otp", "verifyOtp")


# --------------------------------------------------------------------------------------
# storage form
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAGAS))
def test_storage_round_trip(name: str) -> None:
    saga = SAGAS[name]
    assert s.saga_from_dict(s.saga_to_dict(saga)) == saga
    through_json = s.saga_from_dict(orjson.loads(orjson.dumps(s.saga_to_dict(saga))))
    assert through_json == saga
    assert through_json.state is saga.state
    assert [type(o) for o in through_json.last_outputs] == [type(o) for o in saga.last_outputs]


def test_every_state_is_round_tripped() -> None:
    assert {saga.state for saga in SAGAS.values()} == set(TRANSFER_STATES)


# --------------------------------------------------------------------------------------
# command ids
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_id", ["tr-1", "a-b-c", "6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01"])
@pytest.mark.parametrize("step", ["debit", "credit", "refund"])
@pytest.mark.parametrize("partition", [0, 7, 123])
def test_command_id_round_trip(transfer_id: str, step: str, partition: int) -> None:
    """Sagas started before attempts existed (attempt "") keep the old format."""
    transfer = replace(TRANSFER, transfer_id=transfer_id, home_partition=partition)
    cid = s.command_id(transfer, step)
    assert cid == f"{transfer_id}:{step}:{partition}"
    assert s.parse_command_id(cid) == (transfer_id, step, partition)


@pytest.mark.parametrize("step", ["debit", "credit", "refund"])
@pytest.mark.parametrize("partition", [0, 7, 123])
def test_command_id_with_attempt_round_trip(step: str, partition: int) -> None:
    transfer = replace(TRANSFER, transfer_id="6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01",
                       home_partition=partition, attempt="0123456789abcdef")
    cid = s.command_id(transfer, step)
    assert cid == f"6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01:0123456789abcdef:{step}:{partition}"
    assert s.parse_command_id(cid) == (transfer.transfer_id, step, partition)


def test_two_attempts_of_one_key_never_share_a_command_id() -> None:
    first = replace(TRANSFER, attempt="0123456789abcdef")
    second = replace(TRANSFER, attempt="fedcba9876543210")
    for step in ("debit", "credit", "refund"):
        assert s.command_id(first, step) != s.command_id(second, step)


@pytest.mark.parametrize("value", [
    "a:b:c:debit:0",  # a colon in the transfer id: neither format
    "tr-1:0123456789ABCDEF:debit:3",  # upper-case attempt
    "tr-1:0123456789abcde:debit:3",  # 15 digits
    "tr-1:0123456789abcdefa:debit:3",  # 17 digits
    ":0123456789abcdef:debit:3",
    "tr-1::debit:3",
])
def test_malformed_attempts_are_not_ours(value: str) -> None:
    assert s.parse_command_id(value) is None


@pytest.mark.parametrize(
    "value",
    ["", "tr-1", "tr-1:debit", "tr-1:debit:", "tr-1:debit:-1", "tr-1:debit:1a",
     "tr-1:transfer:3", "tr-1:Debit:3", "tr-1:debit:3 ", ":debit:3", "tr-1:debit:\u00b2",
     "tr-1:debit:\u0663", "acct-42-cmd-9", "tr-1:debited:3"],
)
def test_parse_command_id_rejects_foreign_ids(value: str) -> None:
    assert s.parse_command_id(value) is None


def test_a_sealed_otp_opens_only_with_the_pepper_and_its_digest() -> None:
    from app.domain import otp as otp_codes

    pepper, binding = b"pepper-0123456789", otp_codes.otp_binding("t1", 500, "acc-b", "k")
    digest = otp_codes.otp_digest(pepper, binding, "042917")
    sealed = otp_codes.seal_otp(pepper, binding, "042917", digest)
    assert "042917" not in sealed and sealed != b"042917".hex()
    assert otp_codes.unseal_otp(pepper, binding, sealed, digest) == "042917"
    assert otp_codes.unseal_otp(b"another-pepper-0123", binding, sealed, digest) is None
    other = otp_codes.otp_binding("t2", 500, "acc-b", "k")
    assert otp_codes.unseal_otp(pepper, other, sealed, digest) is None
    assert otp_codes.unseal_otp(pepper, binding, "zz", digest) is None
    # A new OTP of the same transfer gets another pad.
    digest2 = otp_codes.otp_digest(pepper, binding, "042918")
    assert otp_codes.seal_otp(pepper, binding, "042918", digest2)[:10] != sealed[:10]
