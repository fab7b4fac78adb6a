"""Unit tests of an operator's resolution of a MANUAL_REVIEW saga (``on_resolution`` in
app/domain/transfer_saga.py): new command ids, money moved once, idempotent, no reply."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from app.domain import transfer_saga as s
from app.domain.transfer_saga import (
    PublishTransferEvent,
    ReleaseLimit,
    Saga,
    SendAccountCommand,
    SendReply,
    State,
)

POLICY = s.Policy(otp_ttl_seconds=300.0, otp_max_attempts=5, otp_pepper=b"p" * 32,
                  command_timeout_seconds=5.0, command_max_backoff_seconds=40.0)
T0 = 1_000_000.0
TRANSFER = s.Transfer(
    transfer_id="0f5e1d2c-0000-4000-8000-000000000001", operator_id="alice",
    idempotency_key="idem-1", fingerprint="fp-1", from_account_id="acc-a",
    to_account_id="acc-b", amount_minor=12_345, currency="EUR", note=None, home_partition=2,
)


def cid(step: str) -> str:
    return s.command_id(TRANSFER, step)


def manual_review() -> Saga:
    saga, _ = s.start(TRANSFER, request_id="r-1", otp=None, user_id="alice", now=T0,
                      policy=POLICY)
    saga, _ = s.on_account_event(saga, cid("debit"), "debited", None, T0 + 1, POLICY)
    saga, _ = s.on_account_event(saga, cid("credit"), "rejected", "ACCOUNT_NOT_FOUND",
                                 T0 + 2, POLICY)
    saga, _ = s.on_account_event(saga, cid("refund"), "rejected", "ACCOUNT_NOT_FOUND",
                                 T0 + 3, POLICY)
    assert saga.state is State.MANUAL_REVIEW
    return saga


def resolve(saga: Saga, action: str, rid: str = "res-1", now: float = T0 + 100
            ) -> tuple[Saga, tuple[s.Output, ...]]:
    return s.on_resolution(saga, rid, action, "ops-anna", "payer account reopened", now,
                           POLICY)


def commands(outputs: tuple[s.Output, ...]) -> list[SendAccountCommand]:
    return [o for o in outputs if isinstance(o, SendAccountCommand)]


@pytest.mark.parametrize(("action", "step", "account", "state_after", "answer"), [
    ("refund", "refund", "acc-a", State.FAILED, "refunded"),
    ("complete", "credit", "acc-b", State.COMPLETED, "credited"),
])
def test_a_resolution_moves_the_money_once_under_a_new_id_and_sends_no_reply(
        action: str, step: str, account: str, state_after: State, answer: str) -> None:
    saga = manual_review()
    resolving, outputs = resolve(saga, action)
    assert resolving.state is (State.REFUNDING if action == "refund" else State.CREDITING)
    (command,) = commands(outputs)
    new_id = cid(f"{step}.r1")
    assert command == SendAccountCommand(new_id, step, account, 12_345, "EUR",
                                         TRANSFER.transfer_id)
    assert new_id not in (cid("refund"), cid("credit"))  # refused ids are remembered for ever
    assert s.parse_command_id(new_id) == (TRANSFER.transfer_id, step, 2)
    assert (resolving.resolved_by, resolving.resolution_reason, resolving.resolution_action
            ) == ("ops-anna", "payer account reopened", action)
    assert not any(isinstance(o, SendReply) for o in outputs)
    (event,) = [o for o in outputs if isinstance(o, PublishTransferEvent)]
    assert event.previous_state == "MANUAL_REVIEW"

    # the same resolution again (a redelivery, the command run twice): the same command
    again, outputs_again = resolve(resolving, action)
    assert again is resolving and outputs_again == outputs
    # another resolution (another id, or the other action) while it runs: nothing
    assert resolve(resolving, "complete", rid="res-2") == (resolving, ())
    assert resolve(resolving, "refund", rid="res-3") == (resolving, ())
    # the old ids' answers are stale now
    assert s.on_account_event(resolving, cid(step), answer, None, T0 + 101, POLICY) == (
        resolving, ())

    done, final = s.on_account_event(resolving, new_id, answer, None, T0 + 102, POLICY)
    assert done.state is state_after
    assert not any(isinstance(o, SendReply) for o in final)  # the request was answered
    assert any(isinstance(o, ReleaseLimit) for o in final) is (state_after is State.FAILED)
    assert done.code == ("INTERNAL" if action == "refund" else None)
    # resolving a finished saga again: nothing (money moved once)
    assert resolve(done, action, rid="res-4") == (done, ())
    assert resolve(done, "refund" if action == "complete" else "complete", rid="res-5") == (
        done, ())
    # the stored form keeps the resolution
    assert s.saga_from_dict(orjson.loads(orjson.dumps(s.saga_to_dict(done)))) == done


def test_a_refused_resolution_returns_to_manual_review_and_the_next_uses_new_ids() -> None:
    saga = manual_review()
    first, outputs = resolve(saga, "refund")
    (command,) = commands(outputs)
    back, final = s.on_account_event(first, command.command_id, "rejected",
                                     "ACCOUNT_NOT_FOUND", T0 + 101, POLICY)
    assert back.state is State.MANUAL_REVIEW and not any(
        isinstance(o, SendReply) for o in final)
    second, outputs2 = resolve(back, "complete", rid="res-2")
    (command2,) = commands(outputs2)
    assert command2.command_id == cid("credit.r2") and command2.type == "credit"
    # a complete whose credit is refused falls back to the refund (new id again)
    refunding, outputs3 = s.on_account_event(second, command2.command_id, "rejected",
                                             "ACCOUNT_NOT_FOUND", T0 + 102, POLICY)
    assert refunding.state is State.REFUNDING
    assert [c.command_id for c in commands(outputs3)] == [cid("refund.r2")]


def test_an_unanswered_resolution_is_re_sent_with_the_same_id() -> None:
    resolving, outputs = resolve(manual_review(), "refund")
    (command,) = commands(outputs)
    assert resolving.deadline() == T0 + 100 + 5.0
    later, resent = s.on_tick(resolving, T0 + 106, POLICY)
    assert commands(resent) == [command]
    assert later.state is State.REFUNDING


def test_only_a_manual_review_transfer_can_be_resolved() -> None:
    debiting, _ = s.start(TRANSFER, request_id="r-1", otp=None, user_id="alice", now=T0,
                          policy=POLICY)
    assert resolve(debiting, "refund") == (debiting, ())
    assert resolve(manual_review(), "delete-it") == (manual_review(), ())
    topup = s.Transfer(**{**s.saga_to_dict(manual_review())["transfer"], "kind": s.TOPUP})
    saga = manual_review()
    as_topup = replace(saga, transfer=topup)
    assert resolve(as_topup, "refund") == (as_topup, ())


def test_step_base() -> None:
    assert s.step_base("refund.r3") == "refund" and s.step_base("credit.r12") == "credit"
    assert s.step_base("debit.r1") == "debit.r1" and s.step_base("refund.rx") == "refund.rx"
    assert s.parse_command_id(f"{TRANSFER.transfer_id}:debit.r1:2") is None
