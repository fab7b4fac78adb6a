"""Property-based fuzzing of every topic the worker, the account center and the funding
provider consume (issue 9), against the real broker and PostgreSQL with the three processes
running as an operator runs them.

Hypothesis generates the records first (valid-looking messages built from the wire
contract, then broken: fields dropped, wrong types, unknown fields, huge strings, deep
nesting, truncated JSON, random bytes, text carrying a PIN, null and wrong keys, foreign
and out-of-range ids), they are produced in batches, and then:

- every process is alive and every consumer group has committed past every fuzzed record
  (no partition stalled on one);
- every fuzzed command with a readable ``requestId`` (docs/contract.md) got exactly one
  reply, an error, never ``INTERNAL``; every other one got exactly one dead letter;
- no dead letter is over 2 KiB, holds a value, a PIN or a token; no reply holds a secret;
- the users' balances did not move, and a normal transfer completes afterwards.

``FUZZ_RECORDS`` sets the number of records (default 10,000; e.g. ``FUZZ_RECORDS=100000``
for a longer run).

Over 400 lines: one test; the strategies for every topic and the oracle are its parts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from conftest import wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from system import PIN, System

from reference.gateway_client import TopicTail
from schemas.wire import AccountCommand, FundingCommand, WireModel

pytestmark = pytest.mark.integration

RECORDS = int(os.environ.get("FUZZ_RECORDS", "10000"))
MAX_RECORD_BYTES = 64 * 1024  # docs/contract.md, "Limits"
DLQ_LIMIT = 2048
PARTITIONS = 3  # System.build
BATCH = 100  # records per Hypothesis example

#: Share of the records per consumed topic (business.transfer-events is consumed by none of
#: the three processes any more: the saga engine writes the transfers' query rows itself).
SHARES = {
    "business.commands": 0.40, "account.events": 0.15, "funding.events": 0.09,
    "business.saga-inputs": 0.07, "business.queries": 0.13,
    "account.commands": 0.09, "funding.commands": 0.07,
}
COMMAND_TYPES = ["transferInit", "transferConfirm", "verifyOtp", "topUp", "queryBalance",
                 "queryTransactionDetails", "queryTransactionHistory"]
ENVELOPE_FIELDS = ["type", "requestId", "operatorId", "accessToken", "sentAt", "payload"]
RID = "\x00rid\x00"  # replaced by a unique requestId when the record is materialised


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------

_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd")
TEXT = st.text(_chars, max_size=24)
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), TEXT,
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(TEXT, st.integers(-5, 5), max_size=2),
)
#: Long strings; now and then one that makes the record larger than 64 KiB.
HUGE_SIZES = st.sampled_from([129, 200, 1_000, 5_000, 20_000] * 10 + [66_000, 70_000])
PARTITION_SUFFIX = st.one_of(st.integers(0, PARTITIONS - 1), st.integers(PARTITIONS, 5000),
                             st.integers(-5, -1), st.just("01"), st.just("²"))


@st.composite
def command_ids(draw: Any, steps: list[str]) -> str:
    """Ids of commands: ours (unknown transfers), ours with a partition out of range,
    other teams', and junk."""
    kind = draw(st.sampled_from(["ours", "ours", "foreign", "junk"]))
    if kind == "ours":
        step = draw(st.sampled_from([*steps, "charge", "debit", "bogus"]))
        return f"{draw(st.uuids())}:{step}:{draw(PARTITION_SUFFIX)}"
    if kind == "foreign":
        return draw(st.sampled_from(["payroll-2024:credit:2024", "payroll-2024:charge:1",
                                     "refund:2:9", "open:acc-fz-1", ":debit:1",
                                     "nul\x00in-the-id"]))  # PostgreSQL refuses NUL
    return draw(TEXT)


@st.composite
def mutated(draw: Any, doc: dict[str, Any], *, nested: str | None = None,
            required: list[str] | None = None) -> dict[str, Any]:
    """``doc`` broken in one to three ways (possibly inside ``doc[nested]``)."""
    doc = dict(doc)
    for _ in range(draw(st.integers(1, 3))):
        target = doc
        if nested and isinstance(doc.get(nested), dict) and draw(st.booleans()):
            target = doc[nested] = dict(doc[nested])
        op = draw(st.sampled_from(["drop", "wrong", "extra", "huge", "deep", "none"]))
        fields = list(target) or ["x"]
        if target is doc and required and op == "drop":
            fields = required
        name = draw(st.sampled_from(fields))
        if op == "drop":
            target.pop(name, None)
        elif op == "wrong":
            target[name] = draw(WRONG)
        elif op == "extra":
            target["x-" + draw(TEXT)] = draw(WRONG)
        elif op == "huge":
            target[name] = "h" * draw(HUGE_SIZES)
        elif op == "deep":
            depth = draw(st.sampled_from([10, 33, 100, 1100]))
            target[name] = f"\x00deep:{depth}\x00"  # spliced in by _dumps
    return doc


@dataclass
class Spec:
    """A record to produce; ``doc`` is serialised by :func:`materialise`."""

    topic: str
    doc: Any
    key: str  # "proper", "null", "wrong", "long", or a literal key
    encoding: str  # "json", "truncated", "bytes", "pin_text", "not_object", "none"
    cut: float = 0.5
    noise: bytes = b""
    partition: int | None = None
    idem_key: str | None = None


ENCODINGS = st.sampled_from(["json"] * 17 + ["truncated", "bytes", "pin_text", "not_object",
                                             "none"])
KEYS = st.sampled_from(["proper"] * 6 + ["null", "null", "wrong", "long"])


@st.composite
def specs_of(draw: Any, topic: str, doc: Any, *, key: str | None = None,
             partition: int | None = None) -> Spec:
    return Spec(topic, doc, key or draw(KEYS), draw(ENCODINGS), draw(st.floats(0.05, 0.95)),
                draw(st.binary(max_size=64)), partition)


@st.composite
def commands(draw: Any, users: list[str], tokens: dict[str, str]) -> Spec:
    ctype = draw(st.sampled_from([*COMMAND_TYPES, "withdraw"]))
    user = draw(st.sampled_from([*users, "nobody"]))
    valid_token = user in tokens and draw(st.booleans())
    payloads: dict[str, dict[str, Any]] = {
        "transferInit": {"toAccountId": f"acc-{users[-1]}", "amountMinor": 100,
                         "currency": "USD", "note": "fuzz"},
        "transferConfirm": {"transferToken": "eyJx.eyJy.z", "pin": PIN},
        "verifyOtp": {"otp": "123456"},
        "topUp": {"fundingSourceId": "card-fz", "amountMinor": 100, "currency": "USD",
                  "pin": PIN},
        "queryBalance": {},
        "queryTransactionDetails": {"transferId": str(draw(st.uuids()))},
        "queryTransactionHistory": {"limit": 5},
    }
    env: dict[str, Any] = {
        "requestId": RID, "type": ctype, "operatorId": user,
        "accessToken": tokens[user] if valid_token else draw(st.sampled_from(
            ["x.y.z", "", "garbage", "eyJhbGciOiJub25lIn0.e30."])),
        # now: a sentAt beyond the clock-skew bound is refused before anything else is
        # looked at (docs/contract.md, "Requests older than the window")
        "sentAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "payload": payloads.get(ctype, {"a": 1}),
    }
    if ctype in ("transferConfirm", "verifyOtp", "topUp") or draw(st.booleans()):
        env["idempotencyKey"] = "fz-" + draw(st.text(_chars, min_size=1, max_size=20))
    env = draw(mutated(env, nested="payload", required=ENVELOPE_FIELDS))
    key = draw(KEYS)
    if valid_token:
        # A genuine access token must never make a fuzzed command succeed: an unknown
        # field in the envelope, or a record key that is not the idempotency key, always
        # refuses it (and nothing else is tried first that could move money).
        if draw(st.booleans()):
            env["x-fuzz"] = 1
        else:
            key = draw(st.sampled_from(["null", "wrong"]))
    return Spec("business.commands", env, key, draw(ENCODINGS), draw(st.floats(0.05, 0.95)),
                draw(st.binary(max_size=64)))


@st.composite
def account_events(draw: Any) -> Spec:
    doc = {"commandId": draw(command_ids(["debit", "credit", "refund"])),
           "type": draw(st.sampled_from(["debited", "credited", "refunded", "rejected",
                                         "stolen"])),
           "accountId": f"acc-fz-{draw(st.integers(0, 9))}",
           "amountMinor": draw(st.integers(1, 10**6)),
           "balanceAfterMinor": draw(st.integers(0, 10**6)),
           "occurredAt": "2030-01-02T00:00:00Z"}
    if draw(st.booleans()):
        doc = draw(mutated(doc))
    return draw(specs_of("account.events", doc))


@st.composite
def funding_events(draw: Any) -> Spec:
    doc = {"chargeId": draw(command_ids(["charge"])),
           "status": draw(st.sampled_from(["captured", "declined", "refunded", "lost"]))}
    if draw(st.booleans()):
        doc = draw(mutated(doc))
    return draw(specs_of("funding.events", doc))


@st.composite
def saga_inputs(draw: Any) -> Spec:
    kind = draw(st.sampled_from(["tick", "accountEvent", "fundingEvent", "other"]))
    doc: dict[str, Any] = {"kind": kind}
    if kind == "accountEvent":
        doc["accountEvent"] = draw(account_events()).doc
    elif kind == "fundingEvent":
        doc["fundingEvent"] = draw(funding_events()).doc
    if draw(st.booleans()):
        doc = draw(mutated(doc))
    return draw(specs_of("business.saga-inputs", doc,
                         partition=draw(st.integers(0, PARTITIONS - 1))))


@st.composite
def queries(draw: Any) -> Spec:
    doc = {"requestId": f"fq-{draw(st.uuids())}", "operatorId": "nobody",
           "accountId": f"acc-fz-{draw(st.integers(0, 9))}", "currency": "USD",
           "type": draw(st.sampled_from(["queryBalance", "queryTransactionDetails",
                                         "queryTransactionHistory", "transferInit"])),
           "params": draw(st.sampled_from([{}, {"limit": 3}, {"transferId": "t"},
                                           {"cursor": "x"}]))}
    if draw(st.booleans()):
        doc = draw(mutated(doc))
    return draw(specs_of("business.queries", doc))


@st.composite
def account_commands(draw: Any) -> Spec:
    """Only to accounts that do not exist: a fuzzed command must not move real money."""
    doc = {"commandId": draw(command_ids(["debit", "credit", "refund"])),
           "type": draw(st.sampled_from(["debit", "credit", "refund", "steal"])),
           "accountId": f"acc-fz-{draw(st.integers(0, 9))}",
           "amountMinor": draw(st.one_of(st.integers(1, 10**6),
                                         st.integers(2**62, 2**64))),
           "currency": draw(st.sampled_from(["USD", "EUR", "usd"])),
           "transferId": str(draw(st.uuids()))}
    if draw(st.booleans()):
        doc["origin"] = draw(st.sampled_from(["topup", "transfer", "elsewhere"]))
    if draw(st.booleans()):
        doc = draw(mutated(doc))
        doc["accountId"] = f"acc-fz-{draw(st.integers(0, 9))}"
    return draw(specs_of("account.commands", doc))


@st.composite
def funding_commands(draw: Any) -> Spec:
    doc = {"chargeId": draw(command_ids(["charge"])),
           "type": draw(st.sampled_from(["charge", "refund", "steal"])),
           "fundingSourceId": "card-fz", "amountMinor": draw(st.integers(1, 10**6)),
           "currency": "USD"}
    if draw(st.booleans()):
        doc = draw(mutated(doc))
    return draw(specs_of("funding.commands", doc))


def generate(users: list[str], tokens: dict[str, str], total: int) -> list[Spec]:
    """Run Hypothesis to draw ``total`` records, in batches of :data:`BATCH`."""
    strategies = {
        "business.commands": commands(users, tokens), "account.events": account_events(),
        "funding.events": funding_events(), "business.saga-inputs": saga_inputs(),
        "business.queries": queries(),
        "account.commands": account_commands(), "funding.commands": funding_commands(),
    }
    out: list[Spec] = []
    for topic, share in SHARES.items():
        wanted = max(BATCH, int(total * share))
        drawn: list[Spec] = []

        @settings(max_examples=wanted // BATCH + 1, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(strategies[topic], min_size=BATCH, max_size=BATCH))
        def collect(batch: list[Spec]) -> None:
            drawn.extend(batch)  # noqa: B023 (called in this iteration only)

        while len(drawn) < wanted:
            collect()
        out.extend(drawn[:wanted])
    return out


# --------------------------------------------------------------------------------------
# materialising and the oracle
# --------------------------------------------------------------------------------------


@dataclass
class Record:
    spec: Spec
    key: bytes | None
    value: bytes | None
    readable: str | None = None  # the readable requestId of a command (the oracle)


_DEEP = re.compile(rb'"\\u0000deep:(\d+)\\u0000"')


def _dumps(doc: Any) -> bytes:
    """Compact JSON, key order kept; deep nesting spliced in as text (json.dumps itself
    would recurse too deep)."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    return _DEEP.sub(lambda m: b"[" * int(m.group(1)) + b"]" * int(m.group(1)), text)


def materialise(spec: Spec, index: int) -> Record:
    doc = spec.doc
    if isinstance(doc, dict) and isinstance(doc.get("requestId"), str) and \
            spec.topic == "business.commands":
        # unique, so that replies can be counted per request (a mutated one keeps its
        # length class: a huge one stays unreadable)
        rid = doc["requestId"]
        doc = {**doc, "requestId": f"fz-{index}" if rid == RID else f"fz-{index}-{rid}"}
    value: bytes | None = _dumps(doc)
    if spec.encoding == "truncated":
        assert value is not None
        value = value[: max(1, int(len(value) * spec.cut))]
    elif spec.encoding == "bytes":
        value = spec.noise
    elif spec.encoding == "pin_text":
        value = f"pin={PIN} requestId=fz-{index} ".encode() + spec.noise
    elif spec.encoding == "not_object":
        value = _dumps([doc])
    elif spec.encoding == "none":
        value = None
    proper = None
    if isinstance(doc, dict):
        ident = doc.get("idempotencyKey") or doc.get("requestId") or doc.get("accountId") \
            or doc.get("chargeId") or doc.get("transferId")
        proper = ident.encode() if isinstance(ident, str) else None
    key = {"proper": proper, "null": None, "wrong": b"wrong-" + spec.noise,
           "long": b"k" * 300}[spec.key]
    if key is None and value is None:
        key = b"tombstone"  # a Kafka record needs one of the two
    return Record(spec, key, value, readable_request_id(value))


_FIRST_ID = re.compile(rb'^\{"requestId":("(?:[^"\\]|\\.)*")[,}]')


def readable_request_id(value: bytes | None) -> str | None:
    """The contract's readable requestId, computed independently of the service: a
    top-level string of 1-128 characters of the parsed value when it is within 64 KiB;
    of a larger one (serialised compactly, requestId first) when it opens the value."""
    if not value:
        return None
    if len(value) > MAX_RECORD_BYTES:
        match = _FIRST_ID.match(value)
        found: Any = json.loads(match.group(1)) if match else None
    else:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        found = doc.get("requestId") if isinstance(doc, dict) else None
    return found if isinstance(found, str) and 0 < len(found) <= 128 else None


def _depth(doc: Any) -> int:
    if isinstance(doc, dict):
        return 1 + max((_depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((_depth(v) for v in doc), default=0)
    return 0


def _has_nul(doc: Any) -> bool:
    if isinstance(doc, str):
        return "\x00" in doc
    if isinstance(doc, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in doc.items())
    if isinstance(doc, list):
        return any(_has_nul(v) for v in doc)
    return False


def refused(record: Record, model: type[WireModel], *, database: bool = False) -> bool:
    """Whether the record is refused (docs/contract.md, "Limits"), with the wire model as
    the oracle: those are dead-lettered, every other one is handled. With ``database``,
    also a text PostgreSQL cannot store (a NUL character: SQLSTATE 22021, a poison the
    account center dead-letters after isolating it)."""
    key, value = record.key, record.value
    if value is None or len(key or b"") + len(value) > MAX_RECORD_BYTES:
        return True
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(doc, dict) or _depth(doc) > 32:
        return True
    try:
        model.model_validate(doc)
    except ValidationError:
        return True
    return database and _has_nul(doc)


def _digests(records: list[Record]) -> Counter[str | None]:
    return Counter(None if r.value is None else hashlib.sha256(r.value).hexdigest()
                   for r in records)


# --------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("fuzz"))
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


async def _end_offsets(system: System, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def _committed_past(system: System, group: str,
                          ends: dict[TopicPartition, int]) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=system.settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return all((m := committed.get(tp)) is not None and m.offset >= end
               for tp, end in ends.items() if end > 0)


async def _same_letters(actual: Any, expected: Counter[str | None], records: list[Record],
                        what: str, timeout: float = 60) -> None:
    """Wait until the dead letters' digests are exactly ``expected``; else say which
    records differ, and how."""
    try:
        await wait_for(lambda: actual() == expected, timeout=timeout, what=what)
    except AssertionError:
        got: Counter[str | None] = actual()
        by_digest = {None if r.value is None else hashlib.sha256(r.value).hexdigest(): r
                     for r in records}
        missing, extra = expected - got, got - expected
        lines = [f"{what}: {sum(missing.values())} missing, {sum(extra.values())} extra"]
        for label, diff in (("missing", missing), ("extra", extra)):
            for digest in list(diff)[:5]:
                r = by_digest.get(digest)
                lines.append(f"  {label}: {None if r is None else (r.key, (r.value or b'')[:300])}")
        raise AssertionError("\n".join(lines)) from None


def _without_keys(letter: dict[str, Any]) -> str:
    """A dead letter as text with its key decoded (a secret could hide in base64)."""
    shown = dict(letter)
    if isinstance(shown.get("keyB64"), str):
        shown["keyB64"] = base64.b64decode(shown["keyB64"]).decode("latin-1")
    return json.dumps(shown, ensure_ascii=False)


async def test_fuzzed_records_on_every_topic(system: System) -> None:
    assert system.client is not None and system.ledger is not None
    s = system.settings
    users = [f"fz{uuid.uuid4().hex[:6]}{i}" for i in range(3)]
    for user in users:
        await system.add_user(user, balance=50_000)
    tokens = {u: system.token(u, ttl_seconds=3600) for u in users}
    accounts = [f"acc-{u}" for u in users]
    before = await system.balances(*accounts)
    total_before = await system.ledger.total_balances("USD")

    started = time.monotonic()
    specs = generate(users, tokens, RECORDS)
    records = [materialise(spec, i) for i, spec in enumerate(specs)]
    generated = time.monotonic()
    assert len(records) >= RECORDS
    dlq = TopicTail(s, s.topic("business.dlq"), from_beginning=True)
    await dlq.start()
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap_servers, linger_ms=20,
                                max_request_size=2 * 1024 * 1024, acks="all")
    await producer.start()
    try:
        for start in range(0, len(records), 1000):
            futures = [await producer.send(s.topic(r.spec.topic), r.value, key=r.key,
                                           partition=r.spec.partition)
                       for r in records[start:start + 1000]]
            await asyncio.gather(*futures)
        produced = time.monotonic()

        # Every consumer group commits past every fuzzed record: nothing stalled.
        by_group = {
            **system.worker_groups(),
            s.account_center_group: [s.topic("account.commands")],
            s.funding_provider_group: [s.topic("funding.commands")],
        }
        for group, topics in by_group.items():
            ends = await _end_offsets(system, topics)
            await wait_for(lambda g=group, e=ends: _committed_past(system, g, e),
                           timeout=600, interval=1.0, what=f"{group} past the fuzz")
        consumed = time.monotonic()
        alive = {name: proc.poll() for name, proc in system.processes.items()}
        assert set(alive.values()) == {None}, alive

        # Commands: a readable requestId gets exactly one reply, an error; the others
        # exactly one dead letter each.
        fuzzed = [r for r in records if r.spec.topic == "business.commands"]
        readable = [r.readable for r in fuzzed if r.readable is not None]
        assert len(readable) == len(set(readable)) and len(readable) > len(fuzzed) / 3
        client = system.client
        try:
            await wait_for(lambda: all(rid in client.replies for rid in readable),
                           timeout=120, what="a reply to every readable fuzzed command")
        except AssertionError as exc:  # which requests, so that a failure says whose
            unanswered = [r for r in fuzzed if r.readable and r.readable not in client.replies]
            raise AssertionError(f"{exc}: {len(unanswered)} unanswered, e.g. " + "; ".join(
                f"{(r.key or b'')[:60]!r} {(r.value or b'')[:200]!r}" for r in unanswered[:5])
            ) from None
        for rid in readable:
            replies = client.replies[rid]
            assert len(replies) == 1, replies
            assert replies[0]["status"] == "error" and replies[0]["code"] != "INTERNAL", \
                replies
        unreadable = _digests([r for r in fuzzed if r.readable is None])

        def letters_from(topic: str) -> Counter[str | None]:
            return Counter(v.get("valueSha256") for _k, v in dlq.messages
                           if v.get("sourceTopic") == s.topic(topic))

        await _same_letters(lambda: letters_from("business.commands"), unreadable, fuzzed,
                            "one dead letter per unreadable command")
        # The account center and the funding provider: a dead letter for each record the
        # contract refuses, none for the others (handled, not skipped).
        for topic, model, database in (("account.commands", AccountCommand, True),
                                       ("funding.commands", FundingCommand, False)):
            expected = _digests([r for r in records if r.spec.topic == topic
                                 and refused(r, model, database=database)])
            assert sum(expected.values()) > 10
            await _same_letters(lambda t=topic: letters_from(t), expected,
                                [r for r in records if r.spec.topic == topic],
                                f"one dead letter per refused record of {topic}")

        # Dead letters: bounded, no value, no secret (PINs and tokens were in the fuzz).
        secrets = [PIN, *tokens.values()]
        assert dlq.messages
        for _k, letter in dlq.messages:
            assert len(orjson.dumps(letter)) < DLQ_LIMIT and "valueB64" not in letter
            text = _without_keys(letter)
            assert not [x for x in secrets if x in text], letter
        for rid in readable:
            text = json.dumps(client.replies[rid])
            assert not [x for x in secrets if x in text] and len(text) < 2048

        # Money: nothing moved; then a normal transfer completes.
        assert await system.balances(*accounts) == before
        done = await system.transfer(users[0], accounts[1], 1_234)
        assert done["status"] == "ok" and done["data"]["state"] == "COMPLETED", done
        assert await system.ledger.total_balances("USD") == total_before
        assert await system.balances(*accounts) == {
            **before, accounts[0]: before[accounts[0]] - 1_234,
            accounts[1]: before[accounts[1]] + 1_234}
        assert set(p.poll() for p in system.processes.values()) == {None}
    finally:
        await producer.stop()
        await dlq.stop()
    per_topic = Counter(r.spec.topic for r in records)
    print(f"\nfuzz: {len(records)} records ({dict(per_topic)}); "
          f"{len(readable)} commands with a readable requestId, "
          f"{sum(unreadable.values())} without; {len(dlq.messages)} dead letters; "
          f"generated in {generated - started:.1f}s, produced in {produced - generated:.1f}s, "
          f"consumed in {consumed - produced:.1f}s")
