"""Unit tests of the operator commands' decisions (cli/operator_commands.py), without
Kafka or PostgreSQL: what ``sagas resolve`` answers without sending, its exit status by
outcome, how it reads the outcome from the saga's row (polled with a deadline), what an
operator sees of a saga, and the options of ``sagas list``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from app.domain import transfer_saga as s
from cli.operator_commands import (
    DEFAULT_LIST_LIMIT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PENDING,
    add_parsers,
    await_outcome,
    not_to_send,
    outcome_status,
    resolution_outcome,
    saga_view,
)

TRANSFER = s.Transfer(
    transfer_id="0f5e1d2c-0000-4000-8000-000000000001", operator_id="alice",
    idempotency_key="idem-1", fingerprint="fp-1", from_account_id="acc-a",
    to_account_id="acc-b", amount_minor=12_345, currency="EUR", note=None, home_partition=2,
)


def saga(state: s.State, seq: int = 5, **changes: Any) -> s.Saga:
    return s.Saga(transfer=TRANSFER, state=state, seq=seq, created_at=1.0,
                  updated_at=float(seq), origin_request_id="r-1", reply_to="r-1",
                  reply_type="transferConfirm", **changes)


def view(state: s.State, **changes: Any) -> dict[str, Any]:
    return saga_view(saga(state, **changes))


def test_complete_that_ended_failed_is_not_reported_resolved() -> None:
    """Finding F9: ``--complete`` whose credit was refused falls back to the refund and
    ends FAILED: the payee was never credited, so not exit 0 "already resolved"."""
    failed = view(s.State.FAILED, resolution_count=1, resolution_action="complete")
    status, result = not_to_send(failed, "complete", TRANSFER.transfer_id)  # type: ignore[misc]
    assert status == EXIT_NOT_FOUND
    assert "never credited" in result["outcome"] and "FAILED" in result["outcome"]
    # the matching cases are still exit 0
    completed = view(s.State.COMPLETED, resolution_count=1, resolution_action="complete")
    assert not_to_send(completed, "complete", TRANSFER.transfer_id)[:1] == (  # type: ignore[index]
        EXIT_OK,)
    refunded = view(s.State.FAILED, resolution_count=1, resolution_action="refund")
    assert not_to_send(refunded, "refund", TRANSFER.transfer_id)[:1] == (EXIT_OK,)  # type: ignore[index]
    # the other action on a resolved saga, and a saga never in review: exit 1
    assert not_to_send(refunded, "complete", TRANSFER.transfer_id)[:1] == (  # type: ignore[index]
        EXIT_NOT_FOUND,)
    assert not_to_send(view(s.State.COMPLETED), "refund", TRANSFER.transfer_id)[:1] == (  # type: ignore[index]
        EXIT_NOT_FOUND,)
    assert not_to_send(view(s.State.MANUAL_REVIEW), "refund", TRANSFER.transfer_id) is None
    assert not_to_send(None, "refund", TRANSFER.transfer_id)[:1] == (EXIT_NOT_FOUND,)  # type: ignore[index]
    # being resolved: exit 0, nothing sent again
    refunding = view(s.State.REFUNDING, resolution_count=1, resolution_action="refund")
    assert not_to_send(refunding, "refund", TRANSFER.transfer_id) == (
        EXIT_OK, {"outcome": "being resolved", "saga": {
            k: v for k, v in refunding.items() if k != "updatedAtEpoch"}})
    # a top-up in review is not resolvable by this command
    topup = saga_view(replace(saga(s.State.MANUAL_REVIEW),
                              transfer=replace(TRANSFER, kind=s.TOPUP)))
    assert not_to_send(topup, "refund", TRANSFER.transfer_id)[:1] == (EXIT_NOT_FOUND,)  # type: ignore[index]


@pytest.mark.parametrize(("action", "state", "status"), [
    ("refund", "FAILED", EXIT_OK), ("complete", "COMPLETED", EXIT_OK),
    ("complete", "FAILED", EXIT_NOT_FOUND), ("refund", "MANUAL_REVIEW", EXIT_NOT_FOUND),
    ("complete", "MANUAL_REVIEW", EXIT_NOT_FOUND),
])
def test_the_exit_status_of_a_seen_outcome(action: str, state: str, status: int) -> None:
    assert outcome_status(action, state) == status


REVIEW = view(s.State.MANUAL_REVIEW)  # before resolution 1 was sent


@pytest.mark.parametrize(("row", "expected"), [
    # resolution 1 (refund) not taken yet: the row still says MANUAL_REVIEW, count 0
    (REVIEW, None),
    (None, None),
    # taken, under way
    (view(s.State.REFUNDING, resolution_count=1, resolution_action="refund"), None),
    # finished as asked / refused again (back to MANUAL_REVIEW, count 1)
    (view(s.State.FAILED, resolution_count=1, resolution_action="refund"),
     (EXIT_OK, "FAILED")),
    (view(s.State.MANUAL_REVIEW, resolution_count=1, resolution_action="refund"),
     (EXIT_NOT_FOUND, "MANUAL_REVIEW")),
])
def test_the_outcome_of_resolution_1_read_from_the_row(
        row: dict[str, Any] | None, expected: tuple[int, str] | None) -> None:
    assert resolution_outcome(row, 1, "refund") == expected


def test_a_resolution_that_another_took_first_is_resolved_otherwise() -> None:
    """Two operators at once read count 0 and both send resolution 1: the saga decides the
    first it receives. The other's command reads that one's outcome, not its own."""
    theirs = view(s.State.COMPLETED, resolution_count=1, resolution_action="complete",
                  resolved_by="ops-bob")
    status, outcome = resolution_outcome(theirs, 1, "refund")  # type: ignore[misc]
    assert status == EXIT_NOT_FOUND
    assert outcome == "resolved otherwise: resolution 1 (complete by ops-bob) ended COMPLETED"
    # a later resolution finished (this one's number was taken and another followed)
    later = view(s.State.FAILED, resolution_count=2, resolution_action="refund")
    assert resolution_outcome(later, 1, "refund") == (
        EXIT_NOT_FOUND, "resolved otherwise: resolution 2 (refund by None) ended FAILED")


def reads(*rows: dict[str, Any] | Exception | None
          ) -> tuple[Callable[[], Awaitable[dict[str, Any] | None]], list[int]]:
    """A ``read`` answering ``rows`` in turn (an exception is raised), then the last one
    again; and the count of reads made."""
    made = [0]

    async def read() -> dict[str, Any] | None:
        row = rows[min(made[0], len(rows) - 1)]
        made[0] += 1
        if isinstance(row, Exception):
            raise row
        return row

    return read, made


async def test_the_outcome_is_polled_until_the_row_is_final() -> None:
    refunding = view(s.State.REFUNDING, resolution_count=1, resolution_action="refund")
    failed = view(s.State.FAILED, resolution_count=1, resolution_action="refund")
    read, made = reads(REVIEW, OSError("connection refused"), refunding, failed, REVIEW)
    status, outcome, last, error = await await_outcome(read, 1, "refund", wait=30,
                                                       interval=0.001)
    assert (status, outcome, last, error) == (EXIT_OK, "FAILED", failed, None)
    assert made[0] == 4  # a failed read is tried again; no read after the outcome


async def test_an_outcome_not_seen_by_the_deadline_is_pending() -> None:
    refunding = view(s.State.REFUNDING, resolution_count=1, resolution_action="refund")
    read, made = reads(refunding)
    assert await await_outcome(read, 1, "refund", wait=0.05, interval=0.001) == (
        EXIT_PENDING, "sent; started", refunding, None)
    read, made = reads(REVIEW)
    assert (await await_outcome(read, 1, "refund", wait=0, interval=0.001))[:2] == (
        EXIT_PENDING, "sent")
    assert made[0] == 1  # one read even without waiting
    # the row could not be read until the deadline: still pending (the input was sent),
    # with the last read's error
    read, made = reads(OSError("Connect call failed"))
    assert await await_outcome(read, 1, "refund", wait=0.05, interval=0.001) == (
        EXIT_PENDING, "sent", None, "OSError: Connect call failed")
    assert made[0] > 1


def test_what_an_operator_sees_of_a_saga_holds_no_secret() -> None:
    stored = saga(s.State.AWAITING_OTP, otp_digest="digest-that-must-not-show",
                  otp_sealed="sealed-otp-that-must-not-show", otp_expires_at=99.0,
                  last_outputs=(s.SendOtp(user_id="alice", otp="482913", expires_at=99.0,
                                          transfer_id=TRANSFER.transfer_id),))
    shown = json.dumps(saga_view(stored))
    for secret in ("digest-that-must-not-show", "sealed-otp-that-must-not-show", "482913"):
        assert secret not in shown
    assert saga_view(stored)["state"] == "AWAITING_OTP"
    assert saga_view(stored)["updatedAt"] == "1970-01-01T00:00:05Z"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_sagas_list_takes_a_positive_limit() -> None:
    assert parse("sagas", "list").limit == DEFAULT_LIST_LIMIT
    assert parse("sagas", "list", "--limit", "3").limit == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parse("sagas", "list", "--limit", bad)
