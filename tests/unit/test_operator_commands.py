"""Unit tests of the operator commands' decisions (cli/operator_commands.py), without
Kafka: what ``sagas resolve`` answers without sending, its exit status by outcome, and the
order of a saga's stored versions."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.domain import transfer_saga as s
from cli.operator_commands import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    Record,
    not_to_send,
    outcome_status,
    saga_versions,
    saga_view,
)

TRANSFER = s.Transfer(
    transfer_id="0f5e1d2c-0000-4000-8000-000000000001", operator_id="alice",
    idempotency_key="idem-1", fingerprint="fp-1", from_account_id="acc-a",
    to_account_id="acc-b", amount_minor=12_345, currency="EUR", note=None, home_partition=2,
)


def stored(state: s.State, seq: int, **changes: Any) -> dict[str, Any]:
    saga = s.Saga(transfer=TRANSFER, state=state, seq=seq, created_at=1.0,
                  updated_at=float(seq), origin_request_id="r-1", reply_to="r-1",
                  reply_type="transferConfirm", **changes)
    return s.saga_to_dict(saga)


def view(state: s.State, **changes: Any) -> dict[str, Any]:
    return saga_view(stored(state, 5, **changes))


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


@pytest.mark.parametrize(("action", "state", "status"), [
    ("refund", "FAILED", EXIT_OK), ("complete", "COMPLETED", EXIT_OK),
    ("complete", "FAILED", EXIT_NOT_FOUND), ("refund", "MANUAL_REVIEW", EXIT_NOT_FOUND),
    ("complete", "MANUAL_REVIEW", EXIT_NOT_FOUND),
])
def test_the_exit_status_of_a_seen_outcome(action: str, state: str, status: int) -> None:
    assert outcome_status(action, state) == status


def test_versions_are_ordered_by_changelog_offset_not_timestamp() -> None:
    """Finding F9: a writer whose clock is behind stamps a later version earlier; the
    changelog's offset is the order."""
    v1 = orjson.dumps(stored(s.State.MANUAL_REVIEW, 4))
    v2 = orjson.dumps(stored(s.State.REFUNDING, 5, resolution_count=1,
                             resolution_action="refund"))
    v3 = orjson.dumps(stored(s.State.FAILED, 6, resolution_count=1,
                             resolution_action="refund"))
    key = TRANSFER.transfer_id.encode()
    records = [Record(2, 30, key, v3, timestamp=1_000),  # the latest, stamped earliest
               Record(2, 10, key, v1, timestamp=3_000),
               Record(2, 20, key, v2, timestamp=2_000)]
    versions = saga_versions(records, TRANSFER.transfer_id)
    assert [v["state"] for v in versions] == ["MANUAL_REVIEW", "REFUNDING", "FAILED"]
    purged = saga_versions([*records, Record(2, 40, key, None, timestamp=0)],
                           TRANSFER.transfer_id)
    assert purged[-1]["state"] == "(purged)"
