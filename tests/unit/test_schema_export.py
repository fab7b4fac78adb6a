"""The exported JSON Schema files are current, and the wire models accept their examples.

No broker, no database: pure checks of ``schemas/`` and of the examples in
``docs/contract.md``. When the first test fails after a change to ``schemas/wire.py``, run
``python -m schemas.export`` and commit the files it rewrites.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.transfers.ids import transfer_id_for
from schemas.export import SCHEMA_DIR, export, render
from schemas.wire import (
    PAYLOAD_MODELS,
    WIRE_MODELS,
    AccountCommand,
    AccountEvent,
    CommandEnvelope,
    DeadLetter,
    FundingCommand,
    FundingEvent,
    InboundWireModel,
    OtpNotification,
    QueryBalancePayload,
    QueryRequest,
    QueryTransactionDetailsPayload,
    QueryTransactionHistoryPayload,
    Reply,
    SagaInput,
    TopUpPayload,
    TransferConfirmPayload,
    TransferEvent,
    TransferInitPayload,
    VerifyOtpPayload,
    WireModel,
)

#: transfer_id_for("alice", "idem-7c1d"), the id used in docs/contract.md as well.
TRANSFER_ID = "1851defb-98fc-5209-b7ad-ce8c9185319e"
CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"
#: An example in docs/contract.md: a ```json block right after `<!-- wire: ModelName -->`.
DOC_EXAMPLE = re.compile(r"<!-- wire: (\w+) -->\s*```json\n(.*?)```", re.DOTALL)

#: One example message per wire model, exactly as it travels (camelCase, no null fields).
EXAMPLES: dict[type[WireModel], dict[str, Any]] = {
    CommandEnvelope: {
        "type": "transferConfirm",
        "requestId": "req-0002",
        "idempotencyKey": "idem-7c1d",
        "operatorId": "alice",
        "accessToken": "<access token JWT>",
        "sentAt": "2025-01-15T10:00:05Z",
        "payload": {"transferToken": "<transfer token JWT>", "pin": "123456"},
    },
    TransferInitPayload: {
        "toAccountId": "acc-bob",
        "amountMinor": 1250,
        "currency": "USD",
        "note": "lunch",
    },
    TransferConfirmPayload: {"transferToken": "<transfer token JWT>", "pin": "123456"},
    VerifyOtpPayload: {"otp": "042917"},
    Reply: {
        "requestId": "req-0002",
        "idempotencyKey": "idem-7c1d",
        "type": "transferConfirm",
        "status": "pending",
        "code": "OTP_REQUIRED",
        "message": "enter the one-time password sent to your phone",
        "data": {"transferId": TRANSFER_ID, "otpExpiresAt": "2025-01-15T10:05:05Z"},
    },
    AccountCommand: {
        "commandId": f"{TRANSFER_ID}:debit:4",
        "type": "debit",
        "accountId": "acc-alice",
        "amountMinor": 75000,
        "currency": "USD",
        "transferId": TRANSFER_ID,
    },
    AccountEvent: {
        "commandId": f"{TRANSFER_ID}:debit:4",
        "type": "debited",
        "accountId": "acc-alice",
        "amountMinor": 75000,
        "balanceAfterMinor": 925000,
        "occurredAt": "2025-01-15T10:00:31Z",
    },
    TopUpPayload: {"fundingSourceId": "card-alice-visa", "amountMinor": 20000,
                   "currency": "USD", "pin": "123456"},
    QueryBalancePayload: {},
    QueryTransactionDetailsPayload: {"transferId": TRANSFER_ID},
    QueryTransactionHistoryPayload: {"cursor": "1187", "limit": 20,
                                     "from": "2025-01-01T00:00:00Z",
                                     "to": "2025-02-01T00:00:00Z"},
    QueryRequest: {
        "requestId": "req-0007",
        "operatorId": "alice",
        "accountId": "acc-alice",
        "currency": "USD",
        "type": "queryTransactionHistory",
        "params": {"limit": 20},
    },
    FundingCommand: {"chargeId": f"{TRANSFER_ID}:charge:4", "type": "charge",
                     "fundingSourceId": "card-alice-visa", "amountMinor": 20000,
                     "currency": "USD"},
    FundingEvent: {"chargeId": f"{TRANSFER_ID}:charge:4", "status": "captured"},
    OtpNotification: {
        "userId": "alice",
        "phone": "+15550000001",
        "otp": "042917",
        "expiresAt": "2025-01-15T10:05:05Z",
        "transferId": TRANSFER_ID,
    },
    TransferEvent: {
        "eventId": f"{TRANSFER_ID}:2",
        "transferId": TRANSFER_ID,
        "seq": 2,
        "state": "DEBITING",
        "previousState": "AWAITING_OTP",
        "operatorId": "alice",
        "fromAccountId": "acc-alice",
        "toAccountId": "acc-bob",
        "amountMinor": 75000,
        "currency": "USD",
        "occurredAt": "2025-01-15T10:00:30Z",
    },
    DeadLetter: {
        "sourceTopic": "business.commands",
        "sourcePartition": 4,
        "sourceOffset": 1187,
        "keyB64": "aWRlbS03YzFk",
        "keySize": 9,
        "valueSize": 8,
        "valueSha256": "7ccfa1fbf3940e6f0c0375d87c0f9235a50514e14cb427bdfaf5077987b26ccf",
        "reason": "undecodable: invalid JSON: unexpected character: line 1 column 1 (char 0)",
        "failedAt": "2025-01-15T10:00:06Z",
    },
    SagaInput: {
        "kind": "accountEvent",
        "accountEvent": {
            "commandId": f"{TRANSFER_ID}:credit:4",
            "type": "rejected",
            "accountId": "acc-bob",
            "amountMinor": 75000,
            "reason": "ACCOUNT_NOT_FOUND",
            "occurredAt": "2025-01-15T10:00:32Z",
        },
    },
}


def test_committed_schema_files_are_current() -> None:
    problems = export(check=True)
    assert problems == [], (
        "schemas/json is out of date with schemas/wire.py; run `python -m schemas.export`: "
        + ", ".join(problems)
    )


def test_one_file_per_wire_model() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(
        f"{m.__name__}.json" for m in WIRE_MODELS
    )


def test_check_mode_reports_missing_changed_and_stale_files_and_writes_nothing(
    tmp_path: Path,
) -> None:
    assert export(tmp_path) == [f"missing: {m.__name__}.json" for m in sorted(
        WIRE_MODELS, key=lambda m: m.__name__)]
    assert export(tmp_path, check=True) == []

    (tmp_path / "Reply.json").write_text("{}\n")
    (tmp_path / "VerifyOtpPayload.json").unlink()
    (tmp_path / "Retired.json").write_text("{}\n")
    expected = ["differs: Reply.json", "missing: VerifyOtpPayload.json", "stale: Retired.json"]
    assert export(tmp_path, check=True) == expected
    assert export(tmp_path, check=True) == expected  # check mode changed nothing

    assert export(tmp_path) == expected  # writing repairs all three
    assert export(tmp_path, check=True) == []
    assert not (tmp_path / "Retired.json").exists()


def test_rendering_is_canonical() -> None:
    text = render(Reply)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert '"requestId"' in text and '"request_id"' not in text  # camelCase, as on the wire


def test_every_wire_model_has_an_example() -> None:
    assert set(EXAMPLES) == set(WIRE_MODELS)


@pytest.mark.parametrize("model", WIRE_MODELS, ids=lambda m: m.__name__)
def test_example_validates_and_round_trips(model: type[WireModel]) -> None:
    example = EXAMPLES[model]
    parsed = model.model_validate(example)
    assert parsed.to_wire() == example
    from_json = model.model_validate_json(json.dumps(example))
    assert from_json == parsed
    assert model.model_validate(from_json.to_wire()) == parsed


@pytest.mark.parametrize("model", WIRE_MODELS, ids=lambda m: m.__name__)
def test_example_matches_the_exported_schema_fields(model: type[WireModel]) -> None:
    """Without a JSON Schema validator: the example has every required property and no other
    property than the schema lists. ``additionalProperties`` is false for what this service
    consumes from its own side, open for the events other teams produce."""
    schema = json.loads((SCHEMA_DIR / f"{model.__name__}.json").read_text())
    example = EXAMPLES[model]
    inbound = issubclass(model, InboundWireModel)
    assert schema.get("additionalProperties", True) is (True if inbound else False)
    assert set(schema.get("required", [])) <= set(example)
    assert set(example) <= set(schema["properties"])


@pytest.mark.parametrize(
    ("model", "change"),
    [
        (TransferInitPayload, {"amountMinor": "1250"}),  # amounts are JSON integers
        (TransferInitPayload, {"amountMinor": 12.5}),
        (TransferInitPayload, {"amountMinor": 0}),
        (TransferInitPayload, {"currency": "usd"}),
        (TransferConfirmPayload, {"pin": "12ab"}),
        (VerifyOtpPayload, {"otp": "12345"}),
        (CommandEnvelope, {"type": "withdraw"}),
        (CommandEnvelope, {"unknownField": 1}),  # extra fields are refused
        (AccountCommand, {"type": "withdraw"}),
        (Reply, {"status": "done"}),
        (SagaInput, {"kind": "other"}),
        (DeadLetter, {"valueB64": "bm90IGpzb24="}),  # dead letters never hold the value
        (DeadLetter, {"reason": "r" * 513}),  # bounded
        (QueryTransactionHistoryPayload, {"limit": 0}),
        (QueryTransactionHistoryPayload, {"limit": 101}),
        (QueryTransactionHistoryPayload, {"limit": "20"}),
        (QueryTransactionHistoryPayload, {"cursor": "abc"}),
        (QueryTransactionHistoryPayload, {"from": "2025-01-01T00:00:00"}),  # no time zone
        (QueryBalancePayload, {"accountId": "acc-bob"}),  # nothing to choose
        (QueryRequest, {"type": "transferInit"}),
    ],
)
def test_invalid_variants_are_refused(model: type[WireModel], change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        model.model_validate({**EXAMPLES[model], **change})


def test_example_ids_are_the_documented_derivation() -> None:
    assert transfer_id_for("alice", "idem-7c1d") == TRANSFER_ID
    assert transfer_id_for("bob", "idem-7c1d") != TRANSFER_ID  # keys are scoped per operator


def _doc_examples() -> list[tuple[str, dict[str, Any]]]:
    return [(name, json.loads(body)) for name, body in DOC_EXAMPLE.findall(CONTRACT.read_text())]


def test_contract_examples_validate_and_cover_every_model() -> None:
    models = {m.__name__: m for m in WIRE_MODELS}
    examples = _doc_examples()
    assert examples, f"no `<!-- wire: Model -->` examples found in {CONTRACT}"
    covered: set[str] = set()
    for name, example in examples:
        assert name in models, f"docs/contract.md names an unknown wire model {name}"
        parsed = models[name].model_validate(example)
        assert parsed.to_wire() == example, f"{name} example is not in canonical wire form"
        covered.add(name)
        if isinstance(parsed, CommandEnvelope):
            payload_model = PAYLOAD_MODELS[parsed.type]
            assert payload_model.model_validate(parsed.payload).to_wire() == parsed.payload
            covered.add(payload_model.__name__)
    assert covered == set(models), f"models without an example: {set(models) - covered}"


@pytest.mark.parametrize("model", [AccountEvent, FundingEvent])
def test_other_teams_may_add_fields_to_their_events(model: type[WireModel]) -> None:
    """The account center and the funding provider may add optional fields (the contract
    allows it); their events must still be understood, not dead-lettered."""
    event = model.model_validate({**EXAMPLES[model], "addedLater": "x"})
    assert event.to_wire() == model.model_validate(EXAMPLES[model]).to_wire()
