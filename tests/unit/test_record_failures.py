"""The poison/outage rule (app/record_failures.py) without a broker or a database: which
failures belong to the record, the limits, the bounded dead letters, and the guard's two
phases."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
)
from faust.exceptions import ProducerSendError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.record_failures import (
    MAX_JSON_DEPTH,
    MAX_RECORD_BYTES,
    PREFIX_SCAN_BYTES,
    Handler,
    Outbound,
    Poison,
    RecordGuard,
    Refused,
    SourceRecord,
    dead_letter,
    dead_letter_out,
    decode_json_object,
    is_outage,
    readable_fields,
    scan_top_level_strings,
    where,
)
from schemas.wire import AccountCommand, DeadLetter


class _PgError(Exception):
    def __init__(self, state: str) -> None:
        super().__init__(f"sqlstate {state}")
        self.sqlstate = state


def _wrapped(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised ``from inner``, as client libraries wrap errors."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as final:
        return final


def _validation_error() -> ValidationError:
    try:
        AccountCommand.model_validate({"commandId": 1})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


class _AsyncpgDataError(ValueError):
    """asyncpg.exceptions.DataError: a value the driver cannot encode (int64 overflow)."""


_AsyncpgDataError.__name__ = "DataError"


OUTAGES = {
    "connection refused": ConnectionRefusedError("refused"),
    "timeout": TimeoutError(),
    "kafka timeout": KafkaTimeoutError(),
    "kafka connection": KafkaConnectionError("down"),
    "leader moved": NotLeaderForPartitionError(),
    "faust wraps a kafka timeout": _wrapped(ProducerSendError("send"), KafkaTimeoutError()),
    "db connection lost": DBAPIError("SELECT", {}, ConnectionResetError("reset")),
    "db operational": OperationalError("SELECT", {}, _PgError("57P01")),
    "db serialization failure": DBAPIError("UPDATE", {}, _PgError("40001")),
    "db missing table": DBAPIError("SELECT", {}, _PgError("42P01")),
}
POISONS = {
    "output too large": MessageSizeTooLargeError("big"),
    "faust wraps too large": _wrapped(ProducerSendError("send"), MessageSizeTooLargeError()),
    "unknown partition": AssertionError("Unrecognized partition"),
    "bad data": ValueError("x"),
    "a bug": KeyError("k"),
    "invalid": _validation_error(),
    "db data error": DBAPIError("UPDATE", {}, _PgError("22003")),
    "db constraint": DBAPIError("INSERT", {}, _PgError("23505")),
    "driver data error wrapped as an interface error": _wrapped(
        InterfaceError("INSERT", {}, Exception("wrapped")), _AsyncpgDataError("int64")),
    "refused": Refused("too large"),
    "poison": Poison("output"),
}


@pytest.mark.parametrize("name", OUTAGES)
def test_infrastructure_failures_are_outages(name: str) -> None:
    assert is_outage(OUTAGES[name])


@pytest.mark.parametrize("name", POISONS)
def test_failures_of_the_record_are_poison(name: str) -> None:
    assert not is_outage(POISONS[name])


# --------------------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------------------


def _nested(levels: int) -> bytes:
    return b'{"a": ' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def test_json_depth_limit() -> None:
    assert decode_json_object(_nested(MAX_JSON_DEPTH))
    with pytest.raises(Refused, match="too deep"):
        decode_json_object(_nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(Refused, match="too deep"):
        decode_json_object(b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}")
    # Brackets inside strings count in the quick bound, not in the depth.
    assert decode_json_object(b'{"a": "' + b"{[" * 40 + b'", "b": [{}]}')
    with pytest.raises(Refused, match="too deep"):
        decode_json_object(b'{"s": "{{{", "a": ' + _nested(MAX_JSON_DEPTH) + b"}")
    assert decode_json_object(b'{"s": "{{{", "a": ' + _nested(MAX_JSON_DEPTH - 1) + b"}")


def test_size_limit_is_checked_before_parsing() -> None:
    huge = b"{" * (MAX_RECORD_BYTES + 1)  # would fail parsing; refused for its size first
    with pytest.raises(Refused, match="too large"):
        decode_json_object(huge)


@pytest.mark.parametrize("raw", [b"", None, b"[1]", b'"s"', b"\xff", b'{"pin": "123456",}'])
def test_undecodable_reasons_hold_no_data(raw: bytes | None) -> None:
    with pytest.raises(Refused) as caught:
        decode_json_object(raw)
    assert caught.value.reason.startswith("undecodable")
    assert "123456" not in caught.value.reason


_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"),
               max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_names = ("requestId", "type", "idempotencyKey")
_docs = st.dictionaries(st.sampled_from(_names) | _text, _json | _text, max_size=6)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, ascii_only=st.booleans(), spaced=st.booleans())
def test_the_prefix_scan_reads_what_a_parser_reads(
        doc: dict[str, Any], ascii_only: bool, spaced: bool) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only,
                      separators=(", ", ": ") if spaced else (",", ":")).encode()
    truth = {n: doc[n] for n in _names if isinstance(doc.get(n), str)}
    if len(text) <= PREFIX_SCAN_BYTES:
        assert scan_top_level_strings(text, _names) == truth
    # any prefix: never a wrong value, only fewer
    for cut_at in (len(text) // 3, len(text) // 2, len(text) - 1):
        partial = scan_top_level_strings(text[:cut_at], _names)
        assert all(truth.get(k) == v for k, v in partial.items()), (text[:cut_at], partial)


def test_readable_fields_of_a_large_record_come_from_its_prefix_only() -> None:
    first = b'{"requestId": "r-1", "type": "transferInit", "payload": "' + b"x" * 900_000
    assert readable_fields(first + b'"}', _names) == {"requestId": "r-1",
                                                     "type": "transferInit"}
    late = b'{"payload": "' + b"x" * 900_000 + b'", "requestId": "r-1"}'
    assert readable_fields(late, _names) == {}
    nested = b'{"payload": {"requestId": "not-top-level"}, "x": "' + b"y" * 70_000 + b'"}'
    assert readable_fields(nested, _names) == {}
    twice = b'{"requestId": "a", "requestId": "b", "x": "' + b"y" * 70_000 + b'"}'
    assert readable_fields(twice, _names) == {}


# --------------------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------------------


def test_a_dead_letter_holds_coordinates_never_the_value() -> None:
    value = b'not json, pin=73910482 accessToken=eyJhbGciOi' + b"x" * 900_000
    record = SourceRecord("business.commands", 2, 41, b"k" * 1000, value)
    letter = dead_letter(record, "undecodable " + "r" * 5000)
    wire = orjson.dumps(letter.to_wire())
    assert len(wire) < 2048 and b"73910482" not in wire and b"eyJ" not in wire
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    assert (letter.value_size, letter.key_size) == (len(value), 1000)
    assert len(letter.key_b64 or "") <= 172 and len(letter.reason) == 512
    assert DeadLetter.model_validate_json(wire) == letter
    null = dead_letter(SourceRecord("t", 0, 0, None, None), "empty")
    assert null.to_wire().keys() == {"sourceTopic", "sourcePartition", "sourceOffset",
                                     "reason", "failedAt"}


# --------------------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------------------

RECORD = SourceRecord("in", 1, 7, b"key", b'{"requestId": "r-1"}')


class Recorder:
    def __init__(self, decide: Any, poison: Any = None) -> None:
        self.pauses: list[float] = []
        self.sent: list[list[Outbound]] = []
        self.guard = RecordGuard(dlq_topic="dlq", partitions=3, pause=self.pause,
                                 max_output_bytes=1000)
        self.handler = Handler(decide, poison or (lambda record, exc: [
            Outbound("dlq", None, b"poison:" + type(exc).__name__.encode())]))

    async def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


def _out(value: bytes = b"v", partition: int | None = None) -> Outbound:
    return Outbound("out", b"k", value, partition)


async def test_an_outage_is_retried_with_back_off_then_decided() -> None:
    failures = 8

    async def decide(record: SourceRecord) -> list[Outbound]:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionRefusedError("PostgreSQL is away")
        return [_out()]

    r = Recorder(decide)
    assert await r.guard.decide(RECORD, r.handler) == [_out()]
    assert r.pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert r.guard.counters["poison"] == 0


@pytest.mark.parametrize("outs", [[_out(b"x" * 1001)], [_out(partition=3)],
                                  [_out(partition=-1)], [_out(), _out(partition=2024)]])
async def test_an_output_that_cannot_be_sent_makes_the_record_poison(
        outs: list[Outbound]) -> None:
    async def decide(record: SourceRecord) -> list[Outbound]:
        return outs

    r = Recorder(decide)
    assert await r.guard.decide(RECORD, r.handler) == [
        Outbound("dlq", None, b"poison:Poison")]
    assert r.pauses == []


async def test_a_record_over_the_limit_is_refused_unread() -> None:
    async def decide(record: SourceRecord) -> list[Outbound]:
        raise AssertionError("must not be decided")

    r = Recorder(decide)
    big = SourceRecord("in", 0, 0, None, b"x" * (MAX_RECORD_BYTES + 1))
    assert await r.guard.decide(big, r.handler) == [Outbound("dlq", None, b"poison:Refused")]


async def test_poison_outputs_that_fail_become_a_bare_dead_letter() -> None:
    async def decide(record: SourceRecord) -> list[Outbound]:
        raise KeyError("bug")

    def poison(record: SourceRecord, exc: BaseException) -> list[Outbound]:
        raise RuntimeError("bug in the poison path too")

    r = Recorder(decide, poison)
    [out] = await r.guard.decide(RECORD, r.handler)
    letter = orjson.loads(out.value)
    assert out.topic == "dlq" and letter["reason"] == "KeyError"
    assert letter["sourceOffset"] == 7


async def test_delivery_resends_the_same_outputs_through_an_outage() -> None:
    attempts: list[list[Outbound]] = []

    async def send(outs: list[Outbound]) -> None:
        attempts.append(outs)
        if len(attempts) < 3:
            raise _wrapped(ProducerSendError("send"), KafkaTimeoutError())

    async def decide(record: SourceRecord) -> list[Outbound]:
        return [_out()]

    r = Recorder(decide)
    await r.guard.process(RECORD, r.handler, send)
    assert attempts == [[_out()]] * 3 and r.pauses == [0.1, 0.2]


async def test_a_send_refused_for_the_record_is_replaced_by_its_dead_letter() -> None:
    attempts: list[list[Outbound]] = []

    async def send(outs: list[Outbound]) -> None:
        attempts.append(outs)
        if outs[0].topic == "out":
            raise _wrapped(ProducerSendError("send"), MessageSizeTooLargeError())

    async def decide(record: SourceRecord) -> list[Outbound]:
        return [_out()]

    r = Recorder(decide)
    await r.guard.process(RECORD, r.handler, send)
    assert attempts == [[_out()], [Outbound("dlq", None, b"poison:Poison")]]
    assert r.guard.counters["send_refused"] == 1


async def test_a_record_whose_dead_letter_is_refused_too_is_given_up() -> None:
    async def send(outs: list[Outbound]) -> None:
        raise AssertionError("Unrecognized partition")

    async def decide(record: SourceRecord) -> list[Outbound]:
        return [_out()]

    r = Recorder(decide)
    await asyncio.wait_for(r.guard.process(RECORD, r.handler, send), 5)
    assert r.guard.counters["send_refused"] == 2


async def test_cancellation_is_not_swallowed() -> None:
    async def decide(record: SourceRecord) -> list[Outbound]:
        raise asyncio.CancelledError

    r = Recorder(decide)
    with pytest.raises(asyncio.CancelledError):
        await r.guard.decide(RECORD, r.handler)


def test_a_record_made_in_the_worker_is_dead_lettered_at_the_record_it_came_from() -> None:
    """A saga input decided in the cycle that read its account event was never in a topic
    (offset -1): its dead letter points at the account event, the record in Kafka that
    holds it, keyed by the event's key, and says what failed."""
    event = SourceRecord("account.events", 3, 41, b"acc-1",
                         b'{"commandId": "c", "accountId": "acc-1"}')
    made = SourceRecord("business.saga-inputs", 5, -1, b"t-1", b'{"kind": "accountEvent"}',
                        origin=event)
    out = dead_letter_out("dlq", made, "invalid saga input: boom")
    letter = orjson.loads(out.value)
    assert (letter["sourceTopic"], letter["sourcePartition"], letter["sourceOffset"]) == (
        "account.events", 3, 41)
    assert letter["valueSha256"] == hashlib.sha256(event.value or b"").hexdigest()
    assert (letter["valueSize"], out.key) == (len(event.value or b""), b"acc-1")
    assert letter["reason"] == "in-process saga input: invalid saga input: boom"
    # A record consumed from a topic keeps its own coordinates; the logs name both.
    assert orjson.loads(dead_letter_out("dlq", event, "x").value)["sourceOffset"] == 41
    assert where(made) == ("business.saga-inputs[5]@-1 (made from account.events[3]@41)")
    assert where(event) == "account.events[3]@41"
