"""Unit tests of an operator's resolution of a MANUAL_REVIEW saga (``on_resolution`` in
app/domain/transfer_saga.py): new command ids, money moved once, idempotent, no reply."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from fakes import Delivery, Harness
from pydantic import ValidationError

from app.domain import transfer_saga as s
from app.domain.transfer_saga import (
    PublishTransferEvent,
    ReleaseLimit,
    Saga,
    SendAccountCommand,
    SendReply,
    State,
)
from cli.operator_commands import resolution_input

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


def resolve(saga: Saga, action: str, rid: str = "res-1", now: float = T0 + 100,
            number: int = 1) -> tuple[Saga, tuple[s.Output, ...]]:
    return s.on_resolution(saga, rid, number, action, "ops-anna", "payer account reopened",
                           now, POLICY)


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
    assert resolve(resolving, "complete", rid="res-2", number=2) == (resolving, ())
    assert resolve(resolving, "refund", rid="res-3", number=2) == (resolving, ())
    # the old ids' answers are stale now
    assert s.on_account_event(resolving, cid(step), answer, None, T0 + 101, POLICY) == (
        resolving, ())

    done, final = s.on_account_event(resolving, new_id, answer, None, T0 + 102, POLICY)
    assert done.state is state_after
    assert not any(isinstance(o, SendReply) for o in final)  # the request was answered
    assert any(isinstance(o, ReleaseLimit) for o in final) is (state_after is State.FAILED)
    assert done.code == ("INTERNAL" if action == "refund" else None)
    # resolving a finished saga again: nothing (money moved once)
    assert resolve(done, action, rid="res-4", number=2) == (done, ())
    assert resolve(done, "refund" if action == "complete" else "complete", rid="res-5",
                   number=2) == (done, ())
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
    second, outputs2 = resolve(back, "complete", rid="res-2", number=2)
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


def test_a_replayed_resolution_never_decides_again_after_a_refusal() -> None:
    """Finding F3: resolution 1 refused brings the saga back to MANUAL_REVIEW; the same
    resolution arriving again (a replay of business.saga-inputs, a redelivery) must not
    start resolution 2: only ``resolution_count + 1`` is decided."""
    first, outputs = resolve(manual_review(), "refund")
    (command,) = commands(outputs)
    back, _ = s.on_account_event(first, command.command_id, "rejected", "ACCOUNT_NOT_FOUND",
                                 T0 + 101, POLICY)
    assert back.state is State.MANUAL_REVIEW and back.resolution_count == 1
    # the same input again, and the same number under another id or action: nothing
    assert resolve(back, "refund", now=T0 + 200) == (back, ())
    assert resolve(back, "complete", rid="res-x", now=T0 + 200) == (back, ())
    # a number that skips one: nothing either
    assert resolve(back, "refund", rid="res-3", now=T0 + 200, number=3) == (back, ())
    # the next one is decided, under the ids of resolution 2
    second, outputs2 = resolve(back, "refund", rid="res-2", now=T0 + 200, number=2)
    assert [c.command_id for c in commands(outputs2)] == [cid("refund.r2")]
    assert second.resolution_count == 2
    # while it is the saga's last input, the same resolution re-sends what it decided
    assert resolve(second, "refund", rid="res-2", now=T0 + 201, number=2) == (
        second, outputs2)


def test_a_saga_stored_by_a_later_version_still_reads() -> None:
    """Finding F5: unknown keys (a field a later version added) are ignored when a saga
    is read back, in the saga, its transfer and its outputs."""
    saga, _ = resolve(manual_review(), "refund")
    stored = s.saga_to_dict(saga)
    stored["added_later"] = {"x": 1}
    stored["transfer"]["added_later"] = "y"
    stored["last_outputs"] = [{**o, "added_later": 2} for o in stored["last_outputs"]]
    assert s.saga_from_dict(orjson.loads(orjson.dumps(stored))) == saga


# --------------------------------------------------------------------------------------
# the worker: signed resolutions on business.saga-inputs (TransferService on fakes)
# --------------------------------------------------------------------------------------


async def _manual_review_on(h: Harness) -> Saga:
    """alice → bob with bob's account closed (the credit refused) and alice's closed
    after her debit (the refund refused): MANUAL_REVIEW, 1,000 held in clearing."""
    h.sim.close("acc-bob")
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    await h.confirm("alice", token, "k-review", run=False)
    await h.step()  # the debit, applied by the account center
    alice = h.sim.balance("acc-alice")
    h.sim.close("acc-alice")
    await h.run_until_quiet()
    saga = h.saga("alice", "k-review")
    assert saga is not None and saga.state is State.MANUAL_REVIEW
    h.sim.open("acc-alice", alice)  # the cause fixed: the payer's account reopened
    return saga


def _resolution(h: Harness, saga: Saga, number: int, action: str = "refund", *,
                operator: str = "ops-anna", reason: str = "payer account reopened",
                secret: bytes | None = None, **tamper: Any) -> bytes:
    key = secret if secret is not None else (
        h.settings.operator_secret.get_secret_value().encode())
    item = resolution_input(key, saga.transfer.transfer_id, number, action, operator, reason)
    doc = item.to_wire()
    doc["resolution"].update(tamper)
    return orjson.dumps(doc)


async def _send_input(h: Harness, saga: Saga, raw: bytes) -> list[Any]:
    return await h.process(Delivery(h.topics.saga_inputs, raw,
                                    saga.transfer.transfer_id.encode(),
                                    saga.transfer.home_partition))


@pytest.mark.parametrize("forgery", [
    "unsigned", "another secret", "action changed", "operator changed",
    "reason changed", "number changed", "transferId changed", "not hex",
])
async def test_a_resolution_without_a_valid_signature_is_dead_lettered_and_moves_nothing(
        forgery: str) -> None:
    """Finding F2: business.saga-inputs is on a shared bus; only a resolution signed under
    BIZ_OPERATOR_SECRET over every field that decides anything moves money."""
    h = Harness()
    saga = await _manual_review_on(h)
    good = orjson.loads(_resolution(h, saga, 1))
    sig = good["resolution"]["signature"]
    raw = {
        "unsigned": _resolution(h, saga, 1, signature=None),
        "another secret": _resolution(h, saga, 1, secret=b"k" * 48),
        "action changed": _resolution(h, saga, 1, action="complete",
                                                   signature=sig),
        "operator changed": _resolution(h, saga, 1, operator="mallory", signature=sig),
        "reason changed": _resolution(h, saga, 1, reason="because", signature=sig),
        "number changed": _resolution(h, saga, 2, signature=sig),
        "transferId changed": _resolution(h, saga, 1, signature=sig,
                                          transferId=saga.transfer.transfer_id.upper()),
        "not hex": _resolution(h, saga, 1, signature="z" * 64),
    }[forgery]
    if forgery == "unsigned":
        doc = orjson.loads(raw)
        doc["resolution"].pop("signature", None)
        raw = orjson.dumps(doc)
    letters, commands_before = len(h.dead_letters), len(h.account_commands)
    outs = await _send_input(h, saga, raw)
    await h.run_until_quiet()
    assert [o.topic for o in outs] == [h.topics.dlq]
    assert len(h.dead_letters) == letters + 1
    assert len(h.account_commands) == commands_before  # nothing moves
    assert h.saga("alice", "k-review") == saga
    assert h.service.counters["refused_resolutions"] == 1
    # the control: the genuine resolution is decided and refunds the payer, once
    await _send_input(h, saga, _resolution(h, saga, 1))
    await h.run_until_quiet()
    done = h.saga("alice", "k-review")
    assert done is not None and done.state is State.FAILED and done.resolved_by == "ops-anna"
    assert len(h.sim.applied_of(saga.transfer.transfer_id, "refund")) == 2  # refused, r1


@pytest.mark.parametrize(("field", "value"), [
    ("operator", "ops\nanna"), ("operator", "x" * 129), ("reason", "fine\r\nFAKE LOG LINE"),
    ("reason", "tab\tinside"), ("reason", "\x85"),
])
def test_an_operator_or_reason_with_control_characters_is_refused(field: str,
                                                                  value: str) -> None:
    """No log injection through what the saga records and logs."""
    args = {"operator": "ops-anna", "reason": "why", field: value}
    with pytest.raises(ValidationError):
        resolution_input(b"s" * 32, TRANSFER.transfer_id, 1, "refund", args["operator"],
                         args["reason"])


async def test_a_replayed_resolution_is_not_decided_again_after_a_refusal() -> None:
    """Finding F3 through the worker: resolution 1 refused, the saga back in
    MANUAL_REVIEW; the same signed input again (a replay) moves nothing."""
    h = Harness()
    saga = await _manual_review_on(h)
    h.sim.close("acc-alice")  # the resolution's refund is refused too
    first = _resolution(h, saga, 1)
    await _send_input(h, saga, first)
    await h.run_until_quiet()
    back = h.saga("alice", "k-review")
    assert back is not None and back.state is State.MANUAL_REVIEW
    assert back.resolution_count == 1
    h.sim.open("acc-alice", 0)
    commands_before = len(h.account_commands)
    assert await _send_input(h, saga, first) == []  # the replay: nothing decided
    await h.run_until_quiet()
    assert len(h.account_commands) == commands_before
    assert h.saga("alice", "k-review") == back
    # resolution 2, asked for, is decided
    await _send_input(h, saga, _resolution(h, saga, 2))
    await h.run_until_quiet()
    done = h.saga("alice", "k-review")
    assert done is not None and done.state is State.FAILED and done.resolution_count == 2
    assert h.sim.balance("acc-alice") == 1_000
