"""Unit tests of the top-up path of the pure saga (kind == "topup"): no I/O, no clock."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from app.domain import transfer_saga as s
from app.domain.transfer_saga import (
    PublishTransferEvent,
    Saga,
    SendAccountCommand,
    SendFundingCommand,
    SendReply,
    State,
)

POLICY = s.Policy(otp_ttl_seconds=300.0, otp_max_attempts=5, otp_pepper=b"p" * 32,
                  command_timeout_seconds=2.0, command_max_backoff_seconds=16.0,
                  funding_timeout_seconds=30.0)
T0 = 2_000_000.0
TOPUP = s.Transfer(
    transfer_id="tu-1", operator_id="alice", idempotency_key="idem-t", fingerprint="fp-t",
    from_account_id="card-1", to_account_id="acc-alice", amount_minor=5_000,
    currency="EUR", note=None, home_partition=2, kind=s.TOPUP,
)
CHARGE_ID = "tu-1:charge:2"
CREDIT_ID = "tu-1:credit:2"
CHARGE = SendFundingCommand(CHARGE_ID, "charge", "card-1", 5_000, "EUR")
REFUND_TO_SOURCE = SendFundingCommand(CHARGE_ID, "refund", "card-1", 5_000, "EUR")
CREDIT = SendAccountCommand(CREDIT_ID, "credit", "acc-alice", 5_000, "EUR", "tu-1",
                            origin="topup")


def start() -> tuple[Saga, tuple[s.Output, ...]]:
    return s.start(TOPUP, request_id="r-topup", otp=None, user_id="alice", now=T0,
                   policy=POLICY)


def funding(saga: Saga, status: str, now: float = T0 + 1, charge_id: str = CHARGE_ID
            ) -> tuple[Saga, tuple[s.Output, ...]]:
    return s.on_funding_event(saga, charge_id, status, now, POLICY)


def replies(outputs: tuple[s.Output, ...]) -> list[SendReply]:
    return [o for o in outputs if isinstance(o, SendReply)]


def test_a_top_up_charges_the_source_first() -> None:
    saga, outputs = start()
    assert saga.state is State.CHARGING
    assert outputs[0] == CHARGE
    assert saga.give_up_at == T0 + 30 and saga.deadline() == T0 + 2  # the first retry


def test_captured_then_credited_completes() -> None:
    saga, _ = start()
    saga, outputs = funding(saga, "captured")
    assert saga.state is State.CREDITING and outputs[0] == CREDIT
    assert saga.give_up_at is None
    saga, outputs = s.on_account_event(saga, CREDIT_ID, "credited", None, T0 + 2, POLICY)
    assert saga.state is State.COMPLETED
    assert replies(outputs) == [SendReply("r-topup", "ok", None, None,
                                          {"transferId": "tu-1", "state": "COMPLETED"},
                                          "topUp")]


def test_declined_fails_with_nothing_credited() -> None:
    saga, _ = start()
    saga, outputs = funding(saga, "declined")
    assert (saga.state, saga.code) == (State.FAILED, "FUNDING_DECLINED")
    assert not [o for o in outputs if isinstance(o, SendAccountCommand | SendFundingCommand)]
    assert replies(outputs)[0].code == "FUNDING_DECLINED"


def test_unanswered_charge_is_resent_with_the_same_id_then_gives_up() -> None:
    saga, _ = start()
    sent = []
    now = T0
    while saga.state is State.CHARGING:
        now = saga.deadline() or now
        saga, outputs = s.on_tick(saga, now, POLICY)
        sent += [o for o in outputs if isinstance(o, SendFundingCommand)]
    assert sent and set(sent) == {CHARGE}  # same charge id every time, no refund
    assert now == T0 + 30  # woken at the give-up time, not at a later retry
    assert (saga.state, saga.code) == (State.FAILED, "FUNDING_TIMEOUT")


def test_a_late_capture_is_given_back_not_credited() -> None:
    saga, _ = start()
    saga, _ = s.on_tick(saga, T0 + 30, POLICY)
    assert saga.code == "FUNDING_TIMEOUT"
    saga, outputs = funding(saga, "captured", now=T0 + 40)
    assert saga.state is State.REVERSING
    assert outputs[0] == REFUND_TO_SOURCE and not replies(outputs)
    # unanswered refund: re-sent on the deadline
    again, resent = s.on_tick(saga, saga.deadline() or 0, POLICY)
    assert resent == (REFUND_TO_SOURCE,)
    saga, outputs = funding(again, "refunded", now=T0 + 60)
    assert (saga.state, saga.code) == (State.FAILED, "FUNDING_TIMEOUT")
    assert [r.code for r in replies(outputs)] == ["FUNDING_TIMEOUT"]  # the same outcome


def test_a_rejected_credit_refunds_the_source() -> None:
    saga, _ = start()
    saga, _ = funding(saga, "captured")
    saga, outputs = s.on_account_event(saga, CREDIT_ID, "rejected", "ACCOUNT_NOT_FOUND",
                                       T0 + 2, POLICY)
    assert saga.state is State.REFUNDING and outputs[0] == REFUND_TO_SOURCE
    saga, outputs = funding(saga, "refunded", now=T0 + 3)
    assert (saga.state, saga.code) == (State.FAILED, "ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize("status", ["captured", "declined", "refunded"])
def test_redelivered_funding_event_resends_what_was_decided(status: str) -> None:
    saga, _ = start()
    moved, outputs = funding(saga, status)
    if moved is saga:
        assert outputs == ()  # "refunded" while charging: stale
        return
    again, resent = funding(moved, status, now=T0 + 99)
    assert again is moved and resent == moved.last_outputs == outputs


@pytest.mark.parametrize("charge_id", ["tu-2:charge:2", "tu-1:charge:3", "tu-1:credit:2"])
def test_foreign_charges_are_ignored(charge_id: str) -> None:
    saga, _ = start()
    assert funding(saga, "captured", charge_id=charge_id) == (saga, ())


def test_a_transfer_ignores_funding_events() -> None:
    transfer = replace(TOPUP, kind="transfer")
    saga, _ = s.start(transfer, request_id="r", otp=None, user_id="alice", now=T0,
                      policy=POLICY)
    assert s.on_funding_event(saga, CHARGE_ID, "captured", T0, POLICY) == (saga, ())


def test_topup_sagas_round_trip_in_every_state() -> None:
    charging, _ = start()
    failed, _ = s.on_tick(charging, T0 + 30, POLICY)
    reversing, _ = funding(failed, "captured", now=T0 + 31)
    crediting, _ = funding(charging, "captured")
    for saga in (charging, failed, reversing, crediting):
        data = orjson.loads(orjson.dumps(s.saga_to_dict(saga)))
        assert s.saga_from_dict(data) == saga
    assert {x.state for x in (charging, reversing)} == {State.CHARGING, State.REVERSING}


def test_transfer_events_name_the_top_up_states() -> None:
    _saga, outputs = start()
    events = [o for o in outputs if isinstance(o, PublishTransferEvent)]
    assert [(e.state, e.previous_state) for e in events] == [("CHARGING", None)]
