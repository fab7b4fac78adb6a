"""``app.replies.wire``: pydantic-core writes an outgoing message in one pass; the bytes
must be those of ``orjson.dumps(model.to_wire())`` (the dict form the contract documents:
camelCase, no null field, the model's field order), for every kind of value a message can
hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from app.replies import wire
from schemas.wire import (
    AccountCommand,
    AccountEvent,
    ErrorCode,
    OtpNotification,
    Reply,
    SagaInput,
    TransferEvent,
    WireModel,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20)


def _by_dict(model: WireModel) -> bytes:
    return orjson.dumps(model.to_wire())


def test_every_outgoing_kind_is_written_as_its_dict() -> None:
    at = datetime(2026, 12, 1, 5, 0, 0, 412133, tzinfo=UTC)
    event = AccountEvent.model_validate({
        "commandId": "c:debit:3", "accountId": "acc-1", "type": "debited",
        "amountMinor": 1, "balanceAfterMinor": 9, "occurredAt": "2026-12-01T05:00:00Z"})
    models: list[WireModel] = [
        Reply(request_id="r\u2028\x00\x1f\"\\/é😀", type="transferConfirm", status="error",
              code=ErrorCode.INTERNAL, message="line\nbreak\t", data={
                  "at": at, "offset": datetime(2026, 1, 2, tzinfo=timezone(timedelta(hours=2))),
                  "ints": [-(2**63), 2**63 - 1, 0], "code": ErrorCode.LIMIT_EXCEEDED,
                  "floats": [1.5, 1e16, 0.1, 1e-7], "none": None, "bytes": b"raw"}),
        Reply(request_id="r", type="queryBalance", status="ok"),
        TransferEvent(event_id="t:1", transfer_id="t", seq=1, state="DEBITING",
                      operator_id="u", from_account_id="a", to_account_id="b",
                      amount_minor=2**63 - 1, currency="EUR", occurred_at=at),
        AccountCommand(command_id="c", type="debit", account_id="a", amount_minor=5,
                       currency="EUR", transfer_id="t", origin="transfer"),
        OtpNotification(user_id="u", phone="+1", otp="123456", expires_at=at,
                        transfer_id="t"),
        SagaInput(kind="accountEvent", account_event=event),
        SagaInput(kind="tick"),
    ]
    for model in models:
        assert wire(model) == _by_dict(model), model


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(TEXT, JSON_VALUES, max_size=6), message=st.none() | TEXT,
       request_id=TEXT.filter(bool))
def test_any_reply_data_is_written_as_its_dict(data: dict[str, Any], message: str | None,
                                               request_id: str) -> None:
    reply = Reply(request_id=request_id, type="queryTransactionHistory", status="ok",
                  message=message, data=data)
    assert wire(reply) == _by_dict(reply)
