"""``keys_of``: the saga engine's guess, from a light parse, of the saga and saved reply each
record of a cycle will read, so that the cycle reads them all in one statement
(agents/saga_engine.py ``_prefetch``).

What it must guarantee: a command names its saved reply (``operatorId ␟ requestId``) and its
saga (``transfer_id_for(operatorId, idempotencyKey)``); a saga input names its transfer
(from the account event's command id, the funding event's charge id, or the resolution's
transfer id); the topic decides how a record is read; and a record it cannot read adds
nothing and never raises: ``keys_of`` runs *before* the record guard, so an exception there
escapes the guard and crashes the worker, and the record, never committed, crashes it again
at every restart.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fakes import Harness  # type: ignore[import-not-found, unused-ignore]
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.saga_engine import (
    EVERY_SAGA,
    account_keys_of,
    chain_of,
    funding_keys_of,
    keys_of,
)
from app.adapters.saga_state import ROW_TABLES
from app.domain import transfer_saga as saga_core
from app.record_failures import SourceRecord
from app.transfers.ids import transfer_id_for

COMMANDS = "p.business.commands"
SAGA_INPUTS = "p.business.saga-inputs"
TRANSFER_ID = "0b5c8f5e-3f7d-5b8a-9c1e-2d4f6a8b0c1d"
ATTEMPT = "0123456789abcdef"


def _keys(topic: str, value: bytes | None) -> tuple[set[str], set[str]]:
    """(transfer ids, reply keys) that ``keys_of`` adds for one record."""
    transfer_ids: set[str] = set()
    reply_keys: set[str] = set()
    keys_of(SourceRecord(topic, 0, 0, None, value), COMMANDS, transfer_ids, reply_keys)
    return transfer_ids, reply_keys


def _transfer(**overrides: Any) -> saga_core.Transfer:
    values: dict[str, Any] = {
        "transfer_id": TRANSFER_ID, "operator_id": "alice", "idempotency_key": "k1",
        "fingerprint": "f" * 32, "from_account_id": "acc-alice", "to_account_id": "acc-bob",
        "amount_minor": 100, "currency": "EUR", "note": None, "home_partition": 2,
        "attempt": ATTEMPT}
    values.update(overrides)
    return saga_core.Transfer(**values)


# --------------------------------------------------------------------------------------
# what a readable record names
# --------------------------------------------------------------------------------------


def test_a_command_names_its_saved_reply_and_its_saga() -> None:
    """A command's reply key is ``operatorId ␟ requestId`` and its saga the scoped
    idempotency key, hashed (app/transfers/ids.py): the keys app/transfers/intake.py reads."""
    doc = {"type": "transferConfirm", "requestId": "r-1", "operatorId": "alice",
           "idempotencyKey": "k-1", "payload": {"pin": "1234"}}
    transfer_ids, reply_keys = _keys(COMMANDS, orjson.dumps(doc))
    assert reply_keys == {"alice\x1fr-1"}
    assert transfer_ids == {transfer_id_for("alice", "k-1")}
    # The operator scopes the key: the same idempotencyKey of another user is another saga.
    other, _ = _keys(COMMANDS, orjson.dumps({**doc, "operatorId": "bob"}))
    assert other == {transfer_id_for("bob", "k-1")} != transfer_ids


def test_a_command_without_an_idempotency_key_names_its_saved_reply_only() -> None:
    doc = {"type": "transferInit", "requestId": "r-2", "operatorId": "alice"}
    assert _keys(COMMANDS, orjson.dumps(doc)) == (set(), {"alice\x1fr-2"})


@pytest.mark.parametrize("field, value", [
    ("operatorId", 7), ("operatorId", None), ("requestId", ["r"]), ("idempotencyKey", 1.5),
])
def test_a_command_field_of_the_wrong_type_names_nothing_through_it(field: str,
                                                                    value: Any) -> None:
    """A key is only guessed from strings: a wrong type drops the keys it takes part in, and
    only those."""
    doc = {"requestId": "r-3", "operatorId": "alice", "idempotencyKey": "k-3", field: value}
    transfer_ids, reply_keys = _keys(COMMANDS, orjson.dumps(doc))
    expect_reply = set() if field in ("operatorId", "requestId") else {"alice\x1fr-3"}
    expect_saga = (set() if field in ("operatorId", "idempotencyKey")
                   else {transfer_id_for("alice", "k-3")})
    assert (transfer_ids, reply_keys) == (expect_saga, expect_reply)


@pytest.mark.parametrize("transfer", [
    _transfer(), _transfer(attempt=""), _transfer(kind=saga_core.TOPUP)])
@pytest.mark.parametrize("step", ["debit", "credit", "refund", "credit.r1", "refund.r12"])
def test_an_account_event_names_the_transfer_of_its_command_id(transfer: saga_core.Transfer,
                                                               step: str) -> None:
    """The command ids the saga emits, in both formats (with the attempt and without) and
    with an operator's resolution suffix, give back their transfer id."""
    doc = {"kind": "accountEvent", "accountEvent": {
        "commandId": saga_core.command_id(transfer, step), "type": "debited"}}
    assert _keys(SAGA_INPUTS, orjson.dumps(doc)) == ({TRANSFER_ID}, set())


@pytest.mark.parametrize("attempt", [ATTEMPT, ""])
def test_a_funding_event_names_the_top_up_of_its_charge_id(attempt: str) -> None:
    topup = _transfer(kind=saga_core.TOPUP, attempt=attempt)
    doc = {"kind": "fundingEvent", "fundingEvent": {
        "chargeId": saga_core.command_id(topup, "charge"), "status": "captured"}}
    assert _keys(SAGA_INPUTS, orjson.dumps(doc)) == ({TRANSFER_ID}, set())


def test_a_resolution_names_its_transfer() -> None:
    doc = {"kind": "operatorResolution", "resolution": {
        "transferId": TRANSFER_ID, "resolutionId": "res-1", "number": 1,
        "action": "refund", "operator": "ops", "reason": "refund rejected"}}
    assert _keys(SAGA_INPUTS, orjson.dumps(doc)) == ({TRANSFER_ID}, set())


def test_the_topic_decides_how_a_record_is_read() -> None:
    """A command-shaped saga input and a saga-input-shaped command name nothing: each topic
    has its own handler, which reads only its own fields."""
    command = {"requestId": "r-4", "operatorId": "alice", "idempotencyKey": "k-4"}
    saga_input = {"resolution": {"transferId": TRANSFER_ID},
                  "accountEvent": {"commandId": f"{TRANSFER_ID}:debit:0"}}
    assert _keys(SAGA_INPUTS, orjson.dumps(command)) == (set(), set())
    assert _keys(COMMANDS, orjson.dumps(saga_input)) == (set(), set())


def test_what_a_record_names_is_added_to_what_the_cycle_already_holds() -> None:
    transfer_ids, reply_keys = {"t-0"}, {"k-0"}
    keys_of(SourceRecord(COMMANDS, 0, 0, None, orjson.dumps(
        {"requestId": "r", "operatorId": "o", "idempotencyKey": "i"})), COMMANDS,
        transfer_ids, reply_keys)
    keys_of(SourceRecord(SAGA_INPUTS, 0, 0, None, b"not json"), COMMANDS, transfer_ids,
            reply_keys)
    assert transfer_ids == {"t-0", transfer_id_for("o", "i")}
    assert reply_keys == {"k-0", "o\x1fr"}


# --------------------------------------------------------------------------------------
# what it cannot read
# --------------------------------------------------------------------------------------

GARBAGE: list[bytes | None] = [
    None, b"", b"   ", b"\xff\xfe", b"not json", b"{", b'{"requestId": "r",}', b"[]",
    b"[1, 2]", b"42", b'"a string"', b"null", b"true", b"NaN",
    b'{"requestId": "\\ud800", "operatorId": "o"}',  # a lone surrogate
    b'{"requestId": "r", "operatorId": "o"' + b'\xc3\x28"}',  # invalid UTF-8
    b"[" * 100_000 + b"]" * 100_000,  # nested beyond any parser's recursion limit
    b'{"requestId": ' + b"9" * 5_000 + b"}",  # an integer over the digit limit
    orjson.dumps({"accountEvent": "debited"}),
    orjson.dumps({"accountEvent": {"commandId": 12}}),
    orjson.dumps({"accountEvent": {"commandId": None}}),
    orjson.dumps({"accountEvent": {"commandId": ""}}),
    orjson.dumps({"accountEvent": {"commandId": "payroll-2024"}}),
    orjson.dumps({"accountEvent": {"commandId": "::"}}),
    orjson.dumps({"accountEvent": {"commandId": f"{TRANSFER_ID}:teleport:0"}}),
    orjson.dumps({"accountEvent": {"commandId": f"{TRANSFER_ID}:debit:-1"}}),
    orjson.dumps({"accountEvent": {"commandId": f"{TRANSFER_ID}:debit:²"}}),
    orjson.dumps({"accountEvent": {"commandId": f"{TRANSFER_ID}:xyz:debit:0"}}),
    orjson.dumps({"accountEvent": ["commandId"]}),
    orjson.dumps({"fundingEvent": {"chargeId": 3.5}}),
    orjson.dumps({"fundingEvent": {"chargeId": {"id": "x"}}}),
    orjson.dumps({"resolution": "refund"}),
    orjson.dumps({"resolution": {"transferId": 7}}),
    orjson.dumps({"resolution": {"transferId": None}}),
    orjson.dumps({"resolution": [TRANSFER_ID]}),
]


@pytest.mark.parametrize("topic", [COMMANDS, SAGA_INPUTS])
@pytest.mark.parametrize("value", GARBAGE, ids=lambda v: repr(v)[:40])
def test_garbage_names_nothing_and_never_raises(topic: str, value: bytes | None) -> None:
    assert _keys(topic, value) == (set(), set())


def test_a_saga_input_naming_a_partition_of_4301_digits_does_not_raise() -> None:
    """Python refuses to convert a string of more than 4300 digits to an int
    (``sys.set_int_max_str_digits``); ``parse_command_id`` checks ``isdigit`` and then calls
    ``int``. A 5 KB saga input whose command id ends in 5,000 digits makes ``keys_of`` raise
    ``ValueError`` outside the guard: the engine crashes the worker, and the record, never
    committed, crashes it again after every restart."""
    doc = {"kind": "accountEvent", "accountEvent": {
        "commandId": f"{TRANSFER_ID}:debit:" + "1" * 5_000, "type": "debited"}}
    assert _keys(SAGA_INPUTS, orjson.dumps(doc)) == (set(), set())



# --------------------------------------------------------------------------------------
# account and funding events, read where they arrive
# --------------------------------------------------------------------------------------


def _event_keys(topic: str, value: bytes | None) -> tuple[set[str], dict[str, set[str]]]:
    transfer_ids: set[str] = set()
    rows: dict[str, set[str]] = {table: set() for table in ROW_TABLES}
    record = SourceRecord(topic, 0, 0, None, value)
    if topic == "account.events":
        account_keys_of(record, transfer_ids, rows)
    else:
        funding_keys_of(record, transfer_ids)
    return transfer_ids, rows


@pytest.mark.parametrize("step", ["debit", "credit", "refund"])
def test_an_account_event_names_its_account_s_rows_and_its_saga(step: str) -> None:
    """What AccountProjection reads (the balance row and the seen mark) and the saga its
    command id names; a command id of another service names rows only."""
    command = saga_core.command_id(_transfer(), step)
    doc = {"commandId": command, "accountId": "acc-bob", "type": "credited"}
    assert _event_keys("account.events", orjson.dumps(doc)) == ({TRANSFER_ID}, {
        "query_balances": {"acc-bob"}, "query_history": set(),
        "query_events_seen": {f"acc-bob\x1f{command}"}, "query_transfers": set()})
    foreign = {**doc, "commandId": "billing-42"}
    assert _event_keys("account.events", orjson.dumps(foreign)) == (set(), {
        "query_balances": {"acc-bob"}, "query_history": set(),
        "query_events_seen": {"acc-bob\x1fbilling-42"}, "query_transfers": set()})


def test_a_funding_event_names_its_top_up() -> None:
    topup = _transfer(kind=saga_core.TOPUP)
    doc = {"chargeId": saga_core.command_id(topup, "charge"), "status": "captured"}
    assert _event_keys("funding.events", orjson.dumps(doc))[0] == {TRANSFER_ID}


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from(["account.events", "funding.events"]),
       value=st.binary(max_size=200) | st.recursive(
           st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40),
           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
               st.sampled_from(["accountId", "commandId", "chargeId", "x"]), inner,
               max_size=4), max_leaves=12).map(orjson.dumps))
def test_any_account_or_funding_record_never_raises(topic: str, value: bytes) -> None:
    """They run before the record guard, as ``keys_of`` does (see the module docstring)."""
    transfer_ids, rows = _event_keys(topic, value)
    assert all(isinstance(k, str) for k in transfer_ids.union(*rows.values()))
    long_id = {"commandId": f"{TRANSFER_ID}:debit:" + "1" * 5_000, "accountId": "a",
               "chargeId": f"{TRANSFER_ID}:charge:" + "1" * 5_000}
    assert _event_keys(topic, orjson.dumps(long_id))[0] == set()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["requestId", "operatorId", "idempotencyKey",
                                        "accountEvent", "fundingEvent", "resolution",
                                        "commandId", "chargeId", "transferId", "x"]),
                      inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from([COMMANDS, SAGA_INPUTS]),
       value=st.binary(max_size=200) | _JSON.map(orjson.dumps))
def test_any_bytes_or_any_json_of_the_fields_it_reads_never_raise(topic: str,
                                                                  value: bytes) -> None:
    """Arbitrary bytes, and arbitrary JSON built from the very field names it looks at with
    values of any type: no exception (what is added is checked by the tests above)."""
    _keys(topic, value)


# --------------------------------------------------------------------------------------
# the guess against what the handlers really read
# --------------------------------------------------------------------------------------


async def test_the_guess_names_every_saga_and_reply_the_handlers_read() -> None:
    """Through the real TransferService (tests/fakes.py): transfers with and without an
    OTP, a wrong OTP, duplicates of a confirm (same and another requestId), a repeated
    init and a redelivered account event. Every saga and saved reply that the handling of
    a ``business.commands`` or ``business.saga-inputs`` record asks for is one that
    ``keys_of`` named for that record: the prefetch serves every read of a cycle, and a
    change of either key's format on one side only fails here."""
    h = Harness()
    reads: list[tuple[str, str]] = []
    saga_get, reply_get = h.sagas.get, h.reply_cache.get

    async def read_saga(transfer_id: str) -> saga_core.Saga | None:
        reads.append(("saga", transfer_id))
        saga: saga_core.Saga | None = await saga_get(transfer_id)
        return saga

    async def read_reply(key: str) -> bytes | None:
        reads.append(("reply", key))
        reply: bytes | None = await reply_get(key)
        return reply

    h.sagas.get = read_saga  # type: ignore[method-assign, unused-ignore]
    h.reply_cache.get = read_reply  # type: ignore[method-assign, unused-ignore]
    unguessed: list[tuple[str, str, str]] = []
    handled: dict[str, int] = {COMMANDS: 0, SAGA_INPUTS: 0}
    process = h.process

    async def guessed_process(item: Any, *, deliver: bool = True) -> Any:
        if item.topic not in (h.topics.commands, h.topics.saga_inputs):
            return await process(item, deliver=deliver)
        transfer_ids: set[str] = set()
        reply_keys: set[str] = set()
        keys_of(SourceRecord(item.topic, item.partition, item.offset, item.key, item.value),
                h.topics.commands, transfer_ids, reply_keys)
        reads.clear()
        outs = await process(item, deliver=deliver)
        unguessed.extend((item.topic, kind, key) for kind, key in reads
                         if key not in (transfer_ids if kind == "saga" else reply_keys))
        handled[COMMANDS if item.topic == h.topics.commands else SAGA_INPUTS] += len(reads)
        return outs

    h.process = guessed_process  # type: ignore[method-assign, unused-ignore]

    assert (await h.transfer("alice", "acc-bob", 5_000))["status"] == "ok"
    token = await h.transfer_token("alice", "acc-carol", 150_000)  # over the OTP threshold
    pending = await h.confirm("alice", token, "k-otp", request_id="r-c")
    assert pending is not None and pending["code"] == "OTP_REQUIRED"
    await h.confirm("alice", token, "k-otp", request_id="r-c")  # the same request again
    await h.confirm("alice", token, "k-otp", request_id="r-c2")  # another request, same key
    otp = h.otp_for(pending["data"]["transferId"])
    await h.verify_otp("alice", "000000" if otp != "000000" else "111111", "k-otp")
    await h.send(h.command("verifyOtp", "alice", {"otp": otp}, idem="k-otp"))
    await h.step(keep=True)  # the debit, delivered twice: its event comes twice
    await h.run_until_quiet()
    await h.init("bob", "acc-carol", 10, request_id="r-i")
    await h.init("bob", "acc-carol", 10, request_id="r-i")
    assert h.reply(h.replies[-1]["requestId"]) is not None
    assert unguessed == []
    # Not vacuous: both topics' handlers read through the ports, many times.
    assert handled[COMMANDS] >= 10 and handled[SAGA_INPUTS] >= 4, handled


# --------------------------------------------------------------------------------------
# chain_of: whose state a record touches (records of one user stay in offset order)
# --------------------------------------------------------------------------------------


def _chain(topic: str, doc: Any) -> str:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return chain_of(SourceRecord(topic, 0, 7, b"k", value), COMMANDS)


def test_a_command_belongs_to_its_operator() -> None:
    assert _chain(COMMANDS, {"type": "transferConfirm", "operatorId": "alice",
                             "requestId": "r", "idempotencyKey": "k"}) == "user:alice"


def test_a_saga_input_belongs_to_its_saga_by_the_field_its_kind_names() -> None:
    debit = f"{TRANSFER_ID}:debit:3"
    assert _chain(SAGA_INPUTS, {"kind": "accountEvent",
                                "accountEvent": {"commandId": debit}}) == f"transfer:{TRANSFER_ID}"
    assert _chain(SAGA_INPUTS, {"kind": "fundingEvent",
                                "fundingEvent": {"chargeId": debit}}) == f"transfer:{TRANSFER_ID}"
    assert _chain(SAGA_INPUTS, {"kind": "operatorResolution",
                                "resolution": {"transferId": TRANSFER_ID}}) == \
        f"transfer:{TRANSFER_ID}"


@pytest.mark.parametrize("doc", [
    # The wire models accept snake_case names too: the handler may read another operator.
    {"type": "verifyOtp", "operator_id": "alice", "request_id": "r", "idempotency_key": "k"},
    {"type": "verifyOtp", "operatorId": "bob", "operator_id": "alice"},
    {"type": "verifyOtp", "operatorId": 5},
    {"type": "verifyOtp"},
])
def test_a_command_whose_operator_is_not_sure_keeps_the_order(doc: Any) -> None:
    assert _chain(COMMANDS, doc) == EVERY_SAGA


@pytest.mark.parametrize("doc", [
    {"kind": "tick"},
    # A tick that also carries an event: the handler dispatches on kind (a tick).
    {"kind": "tick", "accountEvent": {"commandId": f"{TRANSFER_ID}:debit:3"}},
    {"kind": "accountEvent", "account_event": {"commandId": f"{TRANSFER_ID}:debit:3"}},
    {"kind": "accountEvent", "accountEvent": {"command_id": f"{TRANSFER_ID}:debit:3"}},
    {"kind": "fundingEvent", "accountEvent": {"commandId": f"{TRANSFER_ID}:debit:3"}},
    {"kind": "operatorResolution", "resolution": {"transfer_id": TRANSFER_ID}},
    {"kind": "accountEvent", "accountEvent": {"commandId": "not-ours"}},
    {"kind": "accountEvent", "accountEvent": {"commandId": f"{TRANSFER_ID}:debit:" + "1" * 5000}},
    {"kind": "somethingElse"},
    {"kind": 5},
])
def test_a_saga_input_whose_saga_is_not_sure_keeps_the_order(doc: Any) -> None:
    assert _chain(SAGA_INPUTS, doc) == EVERY_SAGA


@pytest.mark.parametrize("value", [b"", b"not json", b"[1, 2]", b'"a string"', b"\xff"])
def test_a_value_no_handler_reads_is_a_chain_of_its_own(value: bytes) -> None:
    for topic in (COMMANDS, SAGA_INPUTS):
        assert _chain(topic, value) == f"record:{topic}:7"


# --------------------------------------------------------------------------------------
# the leases an assignment takes
# --------------------------------------------------------------------------------------


class _LeaseRecorder:
    def __init__(self) -> None:
        self.taken: list[set[int]] = []

    async def take_leases(self, partitions: Any, owner: str) -> dict[int, int]:
        self.taken.append(set(partitions))
        return dict.fromkeys(partitions, 1)


async def test_an_assignment_leases_the_co_partitioned_topics_numbers_only() -> None:
    """funding.events is the provider's topic, of any partition count: the range assignor
    may give a worker funding.events partition numbers that are another worker's home
    partitions; leasing them would take that worker's leases and fence it. Only the
    numbers of the co-partitioned topics (commands, saga inputs, account events) are
    leased."""
    from aiokafka import TopicPartition

    from agents.saga_engine import SagaEngine

    h = Harness()
    state = _LeaseRecorder()

    async def crash(exc: BaseException) -> None:
        raise AssertionError(exc)

    engine = SagaEngine(h.settings, h.service, state, crash=crash)  # type: ignore[arg-type]
    t = h.service.topics
    await engine._take_leases_of([
        TopicPartition(t.commands, 0), TopicPartition(t.saga_inputs, 0),
        TopicPartition(t.account_events, 1), TopicPartition(t.funding_events, 2),
        TopicPartition(t.funding_events, 0)])
    assert state.taken == [{0, 1}]


# --------------------------------------------------------------------------------------
# a stop while a cycle's write waits out an outage
# --------------------------------------------------------------------------------------


async def test_a_stop_leaves_no_cycle_tail_running_even_when_the_next_cycle_was_cancelled(
) -> None:
    """A cycle's write waits out an outage of the database for as long as it lasts, and the
    cycle after it waits for that write before sealing its own. At a stop the waiting cycle
    is cancelled after the grace; the tail it waited for must be cancelled too (nothing of
    it committed, its records delivered again), or the consumer's stop, whose revoke waits
    for a write in flight, would wait for the database for ever."""
    import asyncio

    from agents.saga_engine import SagaEngine

    h = Harness()
    settings = h.settings.model_copy(update={"saga_stop_grace_seconds": 0.1})

    async def crash(exc: BaseException) -> None:
        raise AssertionError(exc)

    engine = SagaEngine(settings, h.service, _LeaseRecorder(), crash=crash)  # type: ignore[arg-type]
    database_back = asyncio.Event()

    async def write_waiting_out_the_outage() -> list[tuple[int, Any]] | None:
        await database_back.wait()
        return []

    engine._writing = asyncio.create_task(write_waiting_out_the_outage())
    engine._completion = asyncio.create_task(engine._complete(engine._writing, [], {}))
    engine._task = asyncio.create_task(engine._wait_completions())  # the next cycle
    await asyncio.wait_for(engine.stop(), timeout=30)
    assert engine._task.cancelled()
    assert engine._writing.cancelled() and engine._completion.cancelled()
    assert not database_back.is_set()
