"""Poison or outage: the one rule every consumer of the worker, the account center and the
funding provider follows (docs/architecture.md, "A record never stops a process").

Why one module: it answers one question for every process (the worker, the account center,
the funding provider), what becomes of a record that fails, and the answer has to be read
whole: the limits, the poison/outage test, the bounded decoding (with the scan of a record
too large to parse: a third of the lines), the dead letter and the guard that applies them
all work with the same limits and exception types. The decoding half is the one seam, but it
raises this module's ``Refused`` against this module's limits, and the consumers that decode
(the command intake, the relay, the saga inputs, the query agent, the account center, the
funding provider) import both halves together: a split would add an import to each and take
nothing out of any.

- A failure that belongs to **one record** (*poison*: too large, not JSON, nested too deep,
  invalid, an unknown type, a foreign id, an output that cannot be sent, a constraint the
  database refuses for its data, or a bug that only this record triggers) never stops,
  stalls or restarts a process: the record gets its error reply or its dead letter and the
  partition moves on.
- A failure of the **infrastructure** (*outage*: the broker or PostgreSQL unreachable, a
  timeout, a transient database state) is retried with back-off, and nothing is skipped or
  acknowledged past it.

:class:`RecordGuard` runs one record through that rule in two phases:

1. **decide**: the consumer's :class:`RecordHandler` turns the record into outputs; an outage
   is retried (the handlers are idempotent: a retry is a redelivery), any other exception
   makes the handler's ``poison`` outputs (error reply, dead letter) the record's outputs.
   The outputs are checked before anything is sent (size, partition), so an output that
   cannot be sent is poison too, found before any of them left.
2. **deliver**: the outputs are sent; an outage is retried with the *same* outputs (the
   decision is taken and its state written: deciding again could find nothing left to
   send), a send refused for the record's sake is replaced by its poison outputs.

Dead letters hold the original's coordinates and a digest, never its value: the original
stays in its topic for the retention period, and nothing can leak a PIN, an OTP or a token
from a record that is not even JSON.

No Faust and no aiokafka consumer here: the exceptions are recognised by their types.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from app import metrics
from app.domain.frozen import quick
from schemas.wire import DeadLetter

log = logging.getLogger(__name__)

#: The largest record (key and value together) any consumer reads; larger ones are refused
#: before they are parsed (docs/contract.md, "Limits").
MAX_RECORD_BYTES = 64 * 1024
#: The deepest JSON nesting accepted (objects and arrays).
MAX_JSON_DEPTH = 32
#: The largest output record (key and value) a consumer may send: well under the
#: producers' 1 MiB request limit (``max_request_size``) and the broker's message limit.
MAX_OUTPUT_BYTES = 900_000
#: ``requestId`` and ``idempotencyKey`` are echoed only when they are 1 to 128 characters:
#: a longer one is not readable (cutting it would address another request).
MAX_ID_CHARS = 128
#: An echoed ``type`` is cut to this many characters.
MAX_TYPE_CHARS = 64
#: Error messages and dead-letter reasons are cut to this many characters.
MAX_REASON_CHARS = 512
#: A dead letter keeps at most this many bytes of the original key.
DEAD_LETTER_KEY_BYTES = 128
#: A record over :data:`MAX_RECORD_BYTES` is not parsed: its ``requestId`` is looked for in
#: this many first bytes only.
PREFIX_SCAN_BYTES = 4096

BACKOFF_INITIAL_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0


# --------------------------------------------------------------------------------------
# records in, records out
# --------------------------------------------------------------------------------------


@quick
@dataclass(frozen=True, slots=True)
class Outbound:
    """A record to send. ``topic`` is the full topic name. ``model``: the validated wire
    model ``value`` was written from, when the builder kept it, for a consumer in this
    very process (the saga engine's transfer projection and in-process saga inputs), which
    then need not parse the bytes back; never part of what is sent or compared."""

    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None
    model: Any = field(default=None, compare=False, repr=False)


@quick
@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A consumed record: where it is and what it holds."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: What ``value`` holds, already validated, for a record made in this process (an
    #: in-process saga input: the model its bytes were written from); None for a record
    #: consumed from Kafka, whose value is parsed as untrusted.
    parsed: Any = field(default=None, compare=False, repr=False)
    #: The consumed record a record made in this process comes from (an in-process saga
    #: input: its account or funding event). Its dead letter points there: it is the one
    #: record in Kafka that holds it, and the one an operator can find and replay.
    origin: SourceRecord | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, message: Any) -> SourceRecord:
        """From a Faust ``Message`` or an aiokafka ``ConsumerRecord`` (same attributes)."""
        return cls(message.topic, message.partition, message.offset, message.key,
                   message.value)

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"")


class Poison(Exception):
    """A failure that belongs to one record: it gets its error reply or dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = cut(reason, MAX_REASON_CHARS)


class Refused(Poison):
    """The record breaks the contract (too large, not JSON, too deep, invalid): the
    sender's fault, answered ``INVALID_REQUEST`` when it has a readable ``requestId``.
    ``reply_message`` is what the sender is told (it may name the fields it sent);
    ``reason``, for the dead letter, names no field that is not in the contract."""

    def __init__(self, reason: str, reply_message: str | None = None) -> None:
        super().__init__(reason)
        self.reply_message = cut(reply_message or reason, MAX_REASON_CHARS)


class RecordHandler(Protocol):
    """What one consumer does with its records."""

    async def decide(self, record: SourceRecord) -> list[Outbound]:
        """The outputs of the record. Raises on failure; never sends."""
        ...

    def poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        """The outputs of a record that failed for its own sake (error reply, dead letter)."""
        ...


# --------------------------------------------------------------------------------------
# poison or outage
# --------------------------------------------------------------------------------------

#: Exceptions (by class name, anywhere in the MRO) that belong to the record, even when an
#: infrastructure layer wraps them: an output too large, a partition that does not exist.
_POISON_NAMES = frozenset({
    "MessageSizeTooLargeError", "RecordTooLargeError", "InvalidMessageError",
    "CorruptRecordException", "UnsupportedCodecError",
    # DB-API: "errors due to problems with the processed data" (asyncpg's DataError, e.g. a
    # value out of the int64 range, is also an InterfaceError: the data decides).
    "DataError", "IntegrityError",
})
#: Infrastructure exceptions by class name (so that this module needs no database driver).
_OUTAGE_NAMES = frozenset({
    "KafkaError",  # aiokafka's base: broker unreachable, timeouts, leadership changes, ...
    "OperationalError", "InterfaceError", "DisconnectionError",  # SQLAlchemy / DB-API
    "PostgresConnectionError", "ConnectionDoesNotExistError", "CannotConnectNowError",
    "TooManyConnectionsError", "ConnectionFailureError", "InternalClientError",  # asyncpg
    "PoolTimeout", "TimeoutError",  # SQLAlchemy's pool timeout is not the builtin one
    "NotReady", "ConsumerNotStarted", "ProducerSendError",  # Faust
})
#: SQLSTATE classes caused by the data of the statement (retrying cannot succeed).
DATA_SQLSTATE_CLASSES = ("22", "23")


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a database error (SQLAlchemy wrapping asyncpg, or
    asyncpg itself), else None."""
    for candidate in (getattr(exc, "orig", None), exc):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it: ``__cause__``, ``__context__`` (unless suppressed, as
    Python shows them) and SQLAlchemy's ``orig`` (the driver's error), breadth first, at
    most 16."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 16:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        context = None if current.__suppress_context__ else current.__context__
        for nxt in (current.__cause__, context, getattr(current, "orig", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_outage(exc: BaseException) -> bool:
    """True for a failure of the infrastructure (retry, skip nothing), False for a failure
    that belongs to the record (poison).

    Poison wins: anything in the chain that names the record (an output too large, an
    unknown partition, a data error of the database, a :class:`Poison`) makes it poison
    even when a client library wraps it. Then the infrastructure: connections and
    timeouts (``OSError``, ``TimeoutError``), Kafka errors, database errors of any other
    SQLSTATE class (connection, resources, serialization, operator intervention, missing
    tables). Anything else is a bug that this record triggered: poison, so that the
    partition moves on and the record is dead-lettered."""
    chain = _chain(exc)
    for item in chain:
        if isinstance(item, Poison | AssertionError) or _names(item) & _POISON_NAMES:
            return False  # AssertionError: aiokafka's "Unrecognized partition"
        state = sqlstate(item)
        if state is not None and state[:2] in DATA_SQLSTATE_CLASSES:
            return False
    for item in chain:
        if isinstance(item, OSError | TimeoutError) or _names(item) & _OUTAGE_NAMES:
            return True
        if sqlstate(item) is not None or "DBAPIError" in _names(item):
            return True
    return False


def describe(exc: BaseException) -> str:
    """A reason that holds no data of the record: the :class:`Poison` reason, else the
    exception's type (and SQLSTATE). Exception messages are never used: they may quote
    input values."""
    if isinstance(exc, Poison):
        return exc.reason
    state = sqlstate(exc)
    return type(exc).__name__ + (f" (sqlstate {state})" if state else "")


# --------------------------------------------------------------------------------------
# reading records within bounds
# --------------------------------------------------------------------------------------


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_size(record: SourceRecord, limit: int = MAX_RECORD_BYTES) -> None:
    if record.size > limit:
        raise Refused(f"too large: the record is {record.size} bytes, over the {limit}-byte "
                      "limit")


def json_deeper_than(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests objects/arrays more than ``limit`` levels (iterative)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def decode_json_object(raw: bytes | None, *, max_bytes: int = MAX_RECORD_BYTES,
                       max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object within the limits, or :class:`Refused` with the reason (no value in
    it). The size is checked before any parsing."""
    if raw is not None and len(raw) > max_bytes:
        raise Refused(f"too large: the value is {len(raw)} bytes, over the {max_bytes}-byte "
                      "limit")
    text = raw or b""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise Refused(f"undecodable: {_json_error(exc)}") from None
    if not isinstance(doc, dict):
        raise Refused("undecodable: not a JSON object")
    # Each level opens with a bracket of the text (one inside a string only overcounts):
    # with no more brackets than the limit, the document cannot be deeper (no walk).
    if text.count(b"{") + text.count(b"[") > max_depth and json_deeper_than(doc, max_depth):
        raise Refused(f"too deep: JSON nested deeper than {max_depth} levels")
    return doc


def _json_error(exc: orjson.JSONDecodeError) -> str:
    """orjson's reason and position, never the document (``msg`` holds no input)."""
    return cut(f"invalid JSON: {exc.msg}: line {exc.lineno} column {exc.colno} "
               f"(char {exc.pos})", 200)


def readable_fields(raw: bytes | None, names: Sequence[str]) -> dict[str, str]:
    """The top-level string fields ``names`` of a JSON object record, when readable without
    parsing more than the limits allow: a record within :data:`MAX_RECORD_BYTES` is parsed
    (orjson); a larger one only has its first :data:`PREFIX_SCAN_BYTES` scanned."""
    if not raw:
        return {}
    if len(raw) > MAX_RECORD_BYTES:
        return scan_top_level_strings(raw[:PREFIX_SCAN_BYTES], names)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {n: doc[n] for n in names if isinstance(doc.get(n), str)}


def readable_id(fields: dict[str, str], name: str) -> str | None:
    """An id field that can be echoed: 1 to :data:`MAX_ID_CHARS` characters."""
    value = fields.get(name)
    return value if value is not None and 0 < len(value) <= MAX_ID_CHARS else None


_WS = " \t\r\n"


def scan_top_level_strings(prefix: bytes, names: Sequence[str]) -> dict[str, str]:
    """The string values of the top-level keys ``names`` found in ``prefix``, the first
    bytes of a JSON object too large to parse. Stops at the end of the prefix or at
    anything that is not JSON; a key seen twice is not trusted."""
    text = prefix.decode("utf-8", errors="replace")
    found: dict[str, str] = {}
    twice: set[str] = set()
    n = len(text)

    def ws(i: int) -> int:
        while i < n and text[i] in _WS:
            i += 1
        return i

    def string_end(i: int) -> int:
        """Index after the closing quote of the string opening at ``i``; -1 if cut."""
        i += 1
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i + 1
            i += 1
        return -1

    def value_end(i: int) -> int:
        """Index after the JSON value starting at ``i``; -1 if cut or not JSON."""
        if i >= n:
            return -1
        if text[i] == '"':
            return string_end(i)
        if text[i] in "{[":
            depth = 0
            while i < n:
                c = text[i]
                if c == '"':
                    i = string_end(i)
                    if i < 0:
                        return -1
                    continue
                if c in "{[":
                    depth += 1
                elif c in "}]":
                    depth -= 1
                    if depth == 0:
                        return i + 1
                i += 1
            return -1
        j = i
        while j < n and text[j] not in ",}]" + _WS:
            j += 1
        return j if j < n and j > i else -1

    i = ws(0)
    if i >= n or text[i] != "{":
        return {}
    i = ws(i + 1)
    while i < n and text[i] == '"':
        end = string_end(i)
        if end < 0:
            break
        try:
            key = json.loads(text[i:end])
        except ValueError:
            break
        i = ws(end)
        if i >= n or text[i] != ":":
            break
        i = ws(i + 1)
        end = value_end(i)
        if end < 0:
            break
        if key in names:
            if key in found or key in twice:
                twice.add(key)
                found.pop(key, None)
            elif text[i] == '"':
                try:
                    value = json.loads(text[i:end])
                except ValueError:
                    value = None
                if isinstance(value, str) and "\ufffd" not in value:
                    found[key] = value
        i = ws(end)
        if i < n and text[i] == ",":
            i = ws(i + 1)
            continue
        break
    return found


def validation_reason(exc: ValidationError, *, name_unknown: bool = False) -> str:
    """Field paths and reasons only: never echo input values (they may hold a PIN). With
    ``name_unknown`` a field that is not in the contract is not named either (dead-letter
    reasons: its name is the sender's data)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:5]:
        loc = [cut(str(p), 64) for p in err.get("loc", ())]
        if name_unknown and err.get("type") == "extra_forbidden" and loc:
            loc[-1] = "<unknown field>"
        where = ".".join(loc) or "message"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return cut("; ".join(parts), MAX_REASON_CHARS)


# --------------------------------------------------------------------------------------
# dead letters
# --------------------------------------------------------------------------------------


#: The reason's first words in the dead letter of a record made in this process from a
#: consumed one (``SourceRecord.origin``: only the saga engine's in-process saga inputs).
IN_PROCESS_PREFIX = "in-process saga input: "


def where(record: SourceRecord) -> str:
    """``topic[partition]@offset`` for the logs; a record made in this process also names
    the consumed record it was made from (its dead letter points there)."""
    at = f"{record.topic}[{record.partition}]@{record.offset}"
    origin = record.origin
    if origin is None:
        return at
    return f"{at} (made from {origin.topic}[{origin.partition}]@{origin.offset})"


def dead_letter(record: SourceRecord, reason: str, now: datetime | None = None) -> DeadLetter:
    """The dead letter of ``record``: coordinates, sizes, the SHA-256 of the value, the
    reason; never the value. A record made in this process from a consumed one (its
    ``origin``: a saga input decided in the cycle that read its account event) was never
    in a topic: its letter points at the consumed record, and says so."""
    metrics_reason = reason  # its category is read from its first words
    if record.origin is not None:
        reason = IN_PROCESS_PREFIX + reason
        record = record.origin
    key = record.key
    value = record.value
    metrics.dead_lettered(record.topic, metrics_reason)
    return DeadLetter(
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        key_b64=None if key is None else base64.b64encode(
            key[:DEAD_LETTER_KEY_BYTES]).decode("ascii"),
        key_size=None if key is None else len(key),
        value_size=None if value is None else len(value),
        value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
        reason=cut(reason, MAX_REASON_CHARS),
        failed_at=now or datetime.now(UTC),
    )


def dead_letter_out(dlq_topic: str, record: SourceRecord, reason: str,
                    now: datetime | None = None) -> Outbound:
    """The dead letter as a record of ``dlq_topic``, keyed by the original key (cut to
    :data:`DEAD_LETTER_KEY_BYTES`)."""
    letter = dead_letter(record, reason, now)
    log.warning("dead letter from %s[%s]@%s: %s", letter.source_topic,
                letter.source_partition, letter.source_offset, letter.reason)
    record = record.origin or record
    key = None if record.key is None else record.key[:DEAD_LETTER_KEY_BYTES]
    return Outbound(dlq_topic, key, orjson.dumps(letter.to_wire()))


# --------------------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------------------


class RecordGuard:
    """Runs records through the poison/outage rule (module docstring). One per process."""

    def __init__(
        self,
        *,
        dlq_topic: str,
        partitions: int,
        clock: Callable[[], float] | None = None,
        pause: Callable[[float], Awaitable[None]] | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
    ) -> None:
        self.dlq_topic = dlq_topic
        self.partitions = partitions
        self.clock = clock
        self.pause = pause or asyncio.sleep
        self.max_record_bytes = max_record_bytes
        self.max_output_bytes = max_output_bytes
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        #: ``poison``, ``outage_retries``, ``send_refused``: for logs and tests.
        self.counters: Counter[str] = Counter()

    def _now(self) -> datetime | None:
        return None if self.clock is None else datetime.fromtimestamp(self.clock(), UTC)

    @staticmethod
    def _ids(record: SourceRecord) -> dict[str, str]:
        """The request's ids for a log line's ``extra`` (app/log_format.py), when the record
        holds readable ones: read only on the rare lines (poison, outage), never per record."""
        fields = readable_fields(record.value, ("requestId", "operatorId", "transferId"))
        return {name: value for name in ("requestId", "operatorId", "transferId")
                if (value := readable_id(fields, name)) is not None}

    def check_outputs(self, outs: Iterable[Outbound]) -> None:
        """Raise :class:`Poison` when an output could never be sent: over the size limit,
        or to a partition the topic does not have."""
        for out in outs:
            size = len(out.key or b"") + len(out.value)
            if size > self.max_output_bytes:
                raise Poison(f"output to {out.topic} of {size} bytes, over the "
                             f"{self.max_output_bytes}-byte limit")
            if out.partition is not None and not 0 <= out.partition < self.partitions:
                raise Poison(f"output to {out.topic} partition {out.partition}, which does "
                             f"not exist ({self.partitions} partitions)")

    async def _wait_out(self, record: SourceRecord, exc: BaseException, delay: float,
                        what: str) -> float:
        self.counters["outage_retries"] += 1
        log.warning("%s: %s failed on the infrastructure (%s), retried in %.1fs",
                    where(record), what, describe(exc), delay,
                    exc_info=delay == self.backoff_initial, extra=self._ids(record))
        await self.pause(delay)
        return min(delay * 2, self.backoff_max)

    def poisoned(self, record: SourceRecord, handler: RecordHandler,
                 exc: BaseException) -> list[Outbound]:
        """The outputs of a poison record: the handler's, or a bare dead letter if even
        those cannot be made or sent."""
        self.counters["poison"] += 1
        if isinstance(exc, Refused):
            log.info("%s refused: %s", where(record), exc.reason, extra=self._ids(record))
        else:
            log.error("%s failed for its own sake (%s): answered and dead-lettered",
                      where(record), describe(exc),
                      exc_info=not isinstance(exc, Poison), extra=self._ids(record))
        try:
            outs = handler.poison(record, exc)
            self.check_outputs(outs)
            return outs
        except Exception:
            log.exception("the poison outputs of %s failed; bare dead letter", where(record))
            return [dead_letter_out(self.dlq_topic, record, describe(exc), self._now())]

    async def decide(self, record: SourceRecord, handler: RecordHandler) -> list[Outbound]:
        """Phase 1: the record's outputs (retrying outages; poison → poison outputs)."""
        delay = self.backoff_initial
        while True:
            try:
                check_size(record, self.max_record_bytes)
                outs = await handler.decide(record)
                self.check_outputs(outs)
                return outs
            except Exception as exc:  # CancelledError is not an Exception: it stops us
                if is_outage(exc):
                    delay = await self._wait_out(record, exc, delay, "handling")
                    continue
                return self.poisoned(record, handler, exc)

    def decide_now(self, record: SourceRecord, decide: Callable[[SourceRecord], list[Outbound]],
                   handler: RecordHandler) -> list[Outbound]:
        """Phase 1 for a decision that does no I/O (a relay): anything it raises is poison
        (an outage raised here is raised on, to be retried by :meth:`decide`)."""
        try:
            check_size(record, self.max_record_bytes)
            outs = decide(record)
            self.check_outputs(outs)
            return outs
        except Exception as exc:
            if is_outage(exc):
                raise
            return self.poisoned(record, handler, exc)

    async def deliver(
        self, record: SourceRecord, outs: list[Outbound], handler: RecordHandler,
        send: Callable[[list[Outbound]], Awaitable[None]],
    ) -> None:
        """Phase 2: send ``outs``; an outage re-sends the same outputs (duplicates are
        absorbed downstream: every output has a deterministic id), a refused output is
        replaced by the record's poison outputs."""
        delay = self.backoff_initial
        replaced = False
        while True:
            try:
                await send(outs)
                return
            except Exception as exc:
                if is_outage(exc):
                    delay = await self._wait_out(record, exc, delay, "sending")
                    continue
                self.counters["send_refused"] += 1
                if replaced:
                    log.error("%s: even its dead letter was refused (%s); moving on",
                              where(record), describe(exc))
                    return
                outs = self.poisoned(record, handler,
                                     Poison(f"an output was refused: {describe(exc)}"))
                replaced = True

    async def process(
        self, record: SourceRecord, handler: RecordHandler,
        send: Callable[[list[Outbound]], Awaitable[None]],
    ) -> None:
        """Decide, then deliver. Returns when the record may be acknowledged."""
        outs = await self.decide(record, handler)
        await self.deliver(record, outs, handler, send)


@dataclass(frozen=True, slots=True)
class Handler:
    """A :class:`RecordHandler` made of two functions."""

    decide_with: Callable[[SourceRecord], Awaitable[list[Outbound]]]
    poison_with: Callable[[SourceRecord, BaseException], list[Outbound]]

    async def decide(self, record: SourceRecord) -> list[Outbound]:
        return await self.decide_with(record)

    def poison(self, record: SourceRecord, exc: BaseException) -> list[Outbound]:
        return self.poison_with(record, exc)
