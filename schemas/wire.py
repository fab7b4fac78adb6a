"""Wire contract v1: every message on every topic, as pydantic v2 models.

camelCase on the wire, snake_case in Python. The gateway and the account center are other
teams' software: field names here are the contract (docs/contract.md), change them only
by adding optional fields. Amounts are integers in minor units (cents).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128)]
#: An identifier that goes into derived ids (``transferId``, the transfer token's ``jti``,
#: the saved replies' keys are joined with U+001F): no control character (C0, DEL, C1), so
#: no separator, and two different pairs can never derive the same id.
KeyIdentifier = Annotated[str, StringConstraints(
    min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")]
#: Signed 64-bit: what PostgreSQL's bigint holds (a larger JSON integer is refused, not
#: left to fail in the database).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MinorUnits = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX,
                                  description="Integer amount in minor units (64-bit).")]


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        str_strip_whitespace=False,
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ErrorCode(StrEnum):
    """Stable error codes (docs/contract.md). Never rename; only add."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_ALREADY_USED = "TOKEN_ALREADY_USED"
    INVALID_PIN = "INVALID_PIN"
    PIN_LOCKED = "PIN_LOCKED"
    INVALID_OTP = "INVALID_OTP"
    OTP_EXPIRED = "OTP_EXPIRED"
    OTP_LOCKED = "OTP_LOCKED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    IN_PROGRESS = "IN_PROGRESS"
    OTP_REQUIRED = "OTP_REQUIRED"
    FUNDING_DECLINED = "FUNDING_DECLINED"
    FUNDING_TIMEOUT = "FUNDING_TIMEOUT"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL = "INTERNAL"


# --------------------------------------------------------------------------------------
# business.commands  (key = idempotencyKey when present, else requestId)
# --------------------------------------------------------------------------------------


class TransferInitPayload(WireModel):
    to_account_id: Identifier
    amount_minor: MinorUnits = Field(gt=0)
    currency: Currency
    note: Annotated[str, StringConstraints(max_length=140)] | None = None


class TransferConfirmPayload(WireModel):
    transfer_token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    pin: Annotated[str, StringConstraints(pattern=r"^[0-9]{4,12}$")] = Field(repr=False)


class VerifyOtpPayload(WireModel):
    otp: Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")] = Field(repr=False)


class TopUpPayload(WireModel):
    """Pull money from a linked bank account or card into the wallet."""

    funding_source_id: Identifier
    amount_minor: MinorUnits = Field(gt=0)
    currency: Currency
    pin: Annotated[str, StringConstraints(pattern=r"^[0-9]{4,12}$")] = Field(
        repr=False, description="The user's PIN: a top-up is confirmed like a transfer.")


class QueryBalancePayload(WireModel):
    """The caller's own balance: no parameters."""


class QueryTransactionDetailsPayload(WireModel):
    transfer_id: Identifier


class QueryTransactionHistoryPayload(WireModel):
    """A page of the caller's account history, newest first."""

    cursor: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,16}$")] | None = Field(
        None, description="`nextCursor` of the previous page; absent for the first page.",
    )
    limit: int = Field(20, strict=True, ge=1, le=100, description="Entries per page.")
    from_: AwareDatetime | None = Field(
        None, alias="from", description="Only entries that occurred at or after this time.",
    )
    to: AwareDatetime | None = Field(
        None, description="Only entries that occurred before this time.",
    )


class CommandType(StrEnum):
    TRANSFER_INIT = "transferInit"
    TRANSFER_CONFIRM = "transferConfirm"
    VERIFY_OTP = "verifyOtp"
    TOP_UP = "topUp"
    QUERY_BALANCE = "queryBalance"
    QUERY_TRANSACTION_DETAILS = "queryTransactionDetails"
    QUERY_TRANSACTION_HISTORY = "queryTransactionHistory"


class CommandEnvelope(WireModel):
    """What the gateway publishes on business.commands."""

    type: CommandType
    request_id: Identifier
    idempotency_key: KeyIdentifier | None = None
    operator_id: KeyIdentifier
    access_token: Annotated[str, StringConstraints(min_length=1, max_length=8192)] = Field(
        repr=False
    )
    sent_at: datetime
    payload: dict[str, Any]


PAYLOAD_MODELS: dict[CommandType, type[WireModel]] = {
    CommandType.TRANSFER_INIT: TransferInitPayload,
    CommandType.TRANSFER_CONFIRM: TransferConfirmPayload,
    CommandType.VERIFY_OTP: VerifyOtpPayload,
    CommandType.TOP_UP: TopUpPayload,
    CommandType.QUERY_BALANCE: QueryBalancePayload,
    CommandType.QUERY_TRANSACTION_DETAILS: QueryTransactionDetailsPayload,
    CommandType.QUERY_TRANSACTION_HISTORY: QueryTransactionHistoryPayload,
}
#: Commands whose envelope must carry an idempotencyKey.
NEEDS_IDEMPOTENCY_KEY = frozenset({CommandType.TRANSFER_CONFIRM, CommandType.VERIFY_OTP,
                                   CommandType.TOP_UP})
#: Commands answered from the worker's tables (business.queries); their replies are never
#: saved, every request is answered afresh.
QUERY_COMMANDS = frozenset({CommandType.QUERY_BALANCE, CommandType.QUERY_TRANSACTION_DETAILS,
                            CommandType.QUERY_TRANSACTION_HISTORY})


# --------------------------------------------------------------------------------------
# business.replies  (key = requestId)
# --------------------------------------------------------------------------------------


class ReplyStatus(StrEnum):
    OK = "ok"
    PENDING = "pending"
    ERROR = "error"


class Reply(WireModel):
    # The fields in the order they travel (app/transfers/outbound.py serializes them so).
    request_id: Identifier
    type: str
    status: ReplyStatus
    idempotency_key: Identifier | None = None
    code: str | None = None
    message: str | None = None
    data: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------
# account.commands / account.events  (key = accountId)
# --------------------------------------------------------------------------------------


class AccountCommandType(StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"
    REFUND = "refund"


class AccountCommand(WireModel):
    command_id: Identifier
    type: AccountCommandType
    account_id: Identifier
    amount_minor: MinorUnits = Field(gt=0)
    currency: Currency
    transfer_id: Identifier
    origin: Literal["transfer", "topup"] | None = Field(
        None, description="Where a credit's money comes from: `topup` = an external "
        "funding source (journaled from the funding account), else the transfer clearing.",
    )


class AccountEventType(StrEnum):
    DEBITED = "debited"
    CREDITED = "credited"
    REFUNDED = "refunded"
    REJECTED = "rejected"


class InboundWireModel(WireModel):
    """A message another team produces. Our contract lets them add optional fields, so
    unknown fields are ignored here: refusing them would dead-letter every answer and leave
    sagas re-sending commands forever with money held in clearing."""

    model_config = ConfigDict(extra="ignore")


class AccountEvent(InboundWireModel):
    command_id: Identifier
    type: AccountEventType
    account_id: Identifier
    amount_minor: MinorUnits
    balance_after_minor: MinorUnits | None = None
    reason: str | None = None
    occurred_at: datetime


# --------------------------------------------------------------------------------------
# funding.commands / funding.events  (key = chargeId): the funding provider
# --------------------------------------------------------------------------------------


class FundingCommand(WireModel):
    """Charge a linked bank account or card, or give a capture back (``refund``)."""

    charge_id: Identifier
    type: Literal["charge", "refund"] = "charge"
    funding_source_id: Identifier
    amount_minor: MinorUnits = Field(gt=0)
    currency: Currency


class FundingEvent(InboundWireModel):
    charge_id: Identifier
    status: Literal["captured", "declined", "refunded"]
    reason: str | None = None


# --------------------------------------------------------------------------------------
# notifications.otp (key = userId), business.transfer-events (key = transferId)
# --------------------------------------------------------------------------------------


class OtpNotification(WireModel):
    user_id: Identifier
    phone: str
    otp: str = Field(repr=False)
    expires_at: datetime
    transfer_id: Identifier


class TransferEvent(WireModel):
    """Every state change of a transfer saga (audit trail and downstream feeds)."""

    # The fields in the order they travel (app/transfers/outbound.py serializes them so).
    event_id: Identifier = Field(description="`<transferId>:<seq>`, unique per change.")
    transfer_id: Identifier
    seq: int
    state: str
    operator_id: Identifier
    from_account_id: Identifier
    to_account_id: Identifier
    amount_minor: MinorUnits
    currency: Currency
    occurred_at: datetime
    previous_state: str | None = None
    code: str | None = None


# --------------------------------------------------------------------------------------
# business.dlq
# --------------------------------------------------------------------------------------


class DeadLetter(WireModel):
    """A record set aside: where it is, how to recognise it, and why. Never its value: the
    original stays in its topic for the retention period, and the coordinates point at it
    (a value cannot leak a PIN, an OTP or a token from here, JSON or not)."""

    source_topic: str
    source_partition: int
    source_offset: int = Field(description="-1 when the record is not a consumed one.")
    key_b64: str | None = Field(
        None, description="The original key, base64, cut to its first 128 bytes.")
    key_size: int | None = Field(None, description="Bytes of the original key (none: null).")
    value_size: int | None = Field(
        None, description="Bytes of the original value (none: a null value).")
    value_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = Field(
        None, description="SHA-256 of the original value, hex.")
    reason: Annotated[str, StringConstraints(max_length=512)]
    failed_at: datetime


# --------------------------------------------------------------------------------------
# business.saga-inputs (internal; explicit partition = the saga's home partition)
# --------------------------------------------------------------------------------------


class OperatorResolution(WireModel):
    """Internal: an operator's resolution of a MANUAL_REVIEW transfer (``bizcenter sagas
    resolve``), sent to the saga's home partition of ``business.saga-inputs``."""

    transfer_id: Identifier
    resolution_id: Identifier = Field(description="The same for the same resolution asked "
                                      "again: a repeat re-sends what it decided.")
    number: int = Field(strict=True, ge=1, le=1_000_000, description="Which resolution of "
                        "the saga this is (1 for the first): the saga acts only on the one "
                        "after those it started.")
    action: Literal["refund", "complete"] = Field(
        description="`refund`: the amount held in clearing back to the payer; `complete`: "
        "credited to the payee.")
    operator: KeyIdentifier = Field(description="Who resolved it (recorded in the saga).")
    reason: Annotated[str, StringConstraints(
        min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")] = Field(
        description="Why (recorded in the saga); no control character.")
    signature: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="HMAC-SHA256 (hex) under BIZ_OPERATOR_SECRET of the transferId, "
        "resolutionId, number, action, operator and reason "
        "(app/domain/resolution_signing.py): a resolution without a valid one is "
        "dead-lettered.")


class SagaInput(WireModel):
    """Internal: an account event routed to its saga's partition, a timer tick, or an
    operator's resolution."""

    kind: Literal["accountEvent", "fundingEvent", "tick", "operatorResolution"]
    account_event: AccountEvent | None = None
    funding_event: FundingEvent | None = None
    resolution: OperatorResolution | None = None


# --------------------------------------------------------------------------------------
# business.queries (internal; key = accountId, or transferId for details)
# --------------------------------------------------------------------------------------


class QueryRequest(WireModel):
    """Internal: an authenticated query (the saga engine checked its access token), answered
    from the PostgreSQL query tables by the worker whose `answer_queries` agent reads it."""

    request_id: Identifier
    idempotency_key: Identifier | None = Field(None, description="Echoed in the reply.")
    operator_id: Identifier
    account_id: Identifier = Field(description="The caller's own account (directory).")
    currency: Currency = Field(description="The currency of the caller's account.")
    type: Literal["queryBalance", "queryTransactionDetails", "queryTransactionHistory"]
    params: dict[str, Any] = Field(description="The validated payload, as on the wire.")


WIRE_MODELS: tuple[type[WireModel], ...] = (
    CommandEnvelope,
    TransferInitPayload,
    TransferConfirmPayload,
    VerifyOtpPayload,
    TopUpPayload,
    QueryBalancePayload,
    QueryTransactionDetailsPayload,
    QueryTransactionHistoryPayload,
    Reply,
    AccountCommand,
    AccountEvent,
    FundingCommand,
    FundingEvent,
    OtpNotification,
    TransferEvent,
    DeadLetter,
    SagaInput,
    QueryRequest,
)
