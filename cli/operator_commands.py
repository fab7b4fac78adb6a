"""Operator commands: ``bizcenter sagas list|show|resolve`` and ``bizcenter dlq list|show``.

Why one module: it answers the operator's one question, what happened to a transfer or a
record and how to finish it. ``sagas`` and ``dlq`` share the topic reading
(:func:`read_topic`, :class:`Record`), the exit statuses and the output conventions; split
by command group, the ``dlq`` half would be about 60 lines importing its reading from the
``sagas`` half.

They read the stores directly, never a worker's memory, so they work with any number of
workers running (or none):

- **sagas** are the rows of the table ``sagas`` in the business schema (``BIZ_DB_SCHEMA``),
  which the workers' saga engine writes (app/adapters/saga_state.py, read through
  ``PostgresSagaState``: straight from the table, no buffer, no cache). A row is the saga's
  one stored version, its latest: the table keeps no history. Its history is the audit
  trail that ``show`` adds: the transfer's events from ``business.transfer-events`` (Kafka).
  A finished saga's row is purged after its retention; its events stay for the topic's.
- **resolve** does not touch a balance: it sends an ``operatorResolution`` input to the
  saga's home partition of ``business.saga-inputs``, which the saga engine decides through
  the pure saga (``transfer_saga.on_resolution``) like any input: the refund or the credit
  goes to the account center under a new command id, once. Its ``resolutionId`` is derived
  from the transfer, the resolution's number and the action, so the same command run twice
  is the same input twice (the second re-sends what the first decided); the number is in
  the input, and the saga acts only on the one after those it started. The input is
  signed (HMAC-SHA256 under ``BIZ_OPERATOR_SECRET``, app/domain/resolution_signing.py):
  the workers dead-letter any other. The outcome is then read from the saga's row, polled
  until ``--wait`` runs out (:func:`resolution_outcome`).
- **dlq** reads ``business.dlq`` (docs/contract.md, "business.dlq": coordinates, sizes,
  digest and reason; never the original value).

Exit statuses: 0 done (found, listed, resolved as asked), 1 not found / not resolvable /
refused again / ended otherwise than asked (a ``--complete`` that ended FAILED), 2 a store
could not be read: PostgreSQL or Kafka (for ``resolve``: the saga not read, or its input's
send not acknowledged; running it again is harmless), 3 a resolution was sent but its
outcome not seen in time (a row that cannot be read after the send is this, not 2).
What is printed holds no secret: a saga's OTP digest is never shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from app.settings import Settings
from events.topics import partition_of

if TYPE_CHECKING:
    from app.adapters.saga_state import PostgresSagaState
    from app.domain.transfer_saga import Saga

EXIT_OK, EXIT_NOT_FOUND, EXIT_UNREADABLE, EXIT_PENDING = 0, 1, 2, 3
RESOLUTION_NS = uuid.UUID("9d3b7c1e-4a2f-4e8b-b6d1-7f0a5c3e2b14")
FINAL = ("COMPLETED", "FAILED", "MANUAL_REVIEW")
READ_TIMEOUT_SECONDS = 60.0
#: How often ``resolve`` reads the saga's row while it waits for the outcome.
POLL_INTERVAL_SECONDS = 0.2
#: ``sagas list`` shows at most this many sagas unless ``--limit`` says otherwise.
DEFAULT_LIST_LIMIT = 1000

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_T = TypeVar("_T")


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` → seconds (ValueError otherwise)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 30s, 10m, 2h, 1d)")
    return float(match.group(1)) * _UNIT[match.group(2) or "s"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Unreadable(Exception):
    """A store could not be read (or written); the message names it and says why in one
    line, without any value (exit status 2)."""


def one_line(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


async def reading(what: str, work: Awaitable[_T]) -> _T:
    """``work``'s result; any failure becomes :class:`Unreadable` naming ``what``."""
    try:
        return await work
    except Unreadable:
        raise
    except Exception as exc:
        raise Unreadable(f"{what}: {one_line(exc)}") from exc


# --------------------------------------------------------------------------------------
# reading topics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


async def read_topic(settings: Settings, topic: str, *, partitions: list[int] | None = None,
                     keep: Callable[[bytes | None], bool] | None = None) -> list[Record]:
    """Every record of ``topic`` (or of ``partitions``) from the beginning to the end
    offsets taken at the start; with ``keep``, only those whose key it accepts."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, client_id="bizcenter-operator")
    await consumer.start()
    try:
        if topic not in await consumer.topics():  # a metadata request
            raise LookupError(f"topic {topic} does not exist")
        # every topic of the system has BIZ_TOPIC_PARTITIONS partitions (ensure_topics)
        chosen = list(range(settings.topic_partitions)) if partitions is None else partitions
        tps = [TopicPartition(topic, p) for p in chosen]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Record] = []
        todo = {tp for tp in tps if ends[tp] > 0}
        for tp in tps:
            if tp in todo and await consumer.position(tp) >= ends[tp]:
                todo.discard(tp)
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp] and (keep is None or keep(r.key)):
                        out.append(Record(r.partition, r.offset, r.key, r.value,
                                          r.timestamp))
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp]:
                    todo.discard(tp)
        return out
    finally:
        await consumer.stop()


async def transfer_events(settings: Settings, transfer_id: str) -> list[dict[str, Any]]:
    """The transfer's events (``business.transfer-events``, its partition), by seq."""
    key = transfer_id.encode()
    partition = partition_of(key, settings.topic_partitions)
    events = [orjson.loads(r.value) for r in await read_topic(
        settings, settings.topic("business.transfer-events"), partitions=[partition],
        keep=lambda k: k == key) if r.value is not None]
    events.sort(key=lambda e: e.get("seq", 0))
    return events


# --------------------------------------------------------------------------------------
# reading sagas (PostgreSQL)
# --------------------------------------------------------------------------------------


def postgres(settings: Settings) -> str:
    """How messages name the sagas' store: ``PostgreSQL (<schema>.sagas)``."""
    return f"PostgreSQL ({settings.db_schema}.sagas)"


@contextlib.asynccontextmanager
async def saga_store(settings: Settings) -> AsyncIterator[PostgresSagaState]:
    """The sagas table's reads on an engine of one connection, disposed at the end. No
    migration: an operator's read runs no DDL (a missing table is an unreadable store)."""
    from app.adapters.db import make_engine
    from app.adapters.saga_state import PostgresSagaState

    engine = make_engine(settings.database_url, settings.db_schema, pool_size=1)
    try:
        yield PostgresSagaState(engine, settings.db_schema)
    finally:
        await engine.dispose()


def saga_view(saga: Saga) -> dict[str, Any]:
    """What an operator sees of a stored saga (never its OTP digest, sealed OTP or saved
    outputs)."""
    t = saga.transfer
    return {
        "transferId": t.transfer_id, "kind": t.kind,
        "state": saga.state.value, "code": saga.code, "seq": saga.seq,
        "operatorId": t.operator_id, "fromAccountId": t.from_account_id,
        "toAccountId": t.to_account_id, "amountMinor": t.amount_minor,
        "currency": t.currency, "homePartition": t.home_partition,
        "createdAt": iso(saga.created_at), "updatedAt": iso(saga.updated_at),
        "updatedAtEpoch": saga.updated_at, "lastTrigger": saga.last_trigger,
        "commandAttempts": saga.command_attempts,
        "nextRetryAt": iso(saga.next_retry_at),
        "resolutionCount": saga.resolution_count,
        "resolutionAction": saga.resolution_action,
        "resolvedBy": saga.resolved_by, "resolutionReason": saga.resolution_reason,
    }


async def listed_sagas(settings: Settings, *, state: str | None, older_than: float | None,
                       now: float, limit: int) -> list[dict[str, Any]]:
    """Sagas in ``state`` unchanged for at least ``older_than`` seconds, the oldest update
    first, at most ``limit``."""
    before = None if older_than is None else now - older_than

    async def read() -> list[Saga]:
        async with saga_store(settings) as store:
            return await store.list_sagas(state, before, limit)

    return [saga_view(s) for s in await reading(postgres(settings), read())]


async def stored_saga(settings: Settings, transfer_id: str) -> dict[str, Any] | None:
    async def read() -> Saga | None:
        async with saga_store(settings) as store:
            return await store.saga(transfer_id)

    found = await reading(postgres(settings), read())
    return None if found is None else saga_view(found)


async def saga_and_events(settings: Settings, transfer_id: str
                          ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the saga's stored version or None; its transfer events, by seq)."""
    saga = await stored_saga(settings, transfer_id)
    events = await reading(f"Kafka ({settings.topic('business.transfer-events')})",
                           transfer_events(settings, transfer_id))
    return saga, events


# --------------------------------------------------------------------------------------
# sagas list / show
# --------------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def sagas_table(rows: list[dict[str, Any]], now: float) -> str:
    header = (f"{'transferId':<36}  {'kind':<8} {'state':<13} {'code':<18} {'amount':>14} "
              f"{'cur':<3}  {'from':<20} {'to':<20} {'in state':>8}")
    lines = [header]
    for s in rows:
        lines.append(
            f"{s['transferId']:<36}  {s['kind']:<8} {s['state']:<13} {s['code'] or '':<18} "
            f"{s['amountMinor']:>14} {s['currency']:<3}  {s['fromAccountId'][:20]:<20} "
            f"{s['toAccountId'][:20]:<20} {_age(now - s['updatedAtEpoch']):>8}")
    lines.append(f"{len(rows)} saga(s)")
    return "\n".join(lines)


async def _guarded(work: Awaitable[_T]) -> tuple[int, _T | str]:
    """(EXIT_OK, the result) or (EXIT_UNREADABLE, why in one line)."""
    try:
        return EXIT_OK, await asyncio.wait_for(work, READ_TIMEOUT_SECONDS)
    except (Unreadable, LookupError) as exc:
        return EXIT_UNREADABLE, f"{exc}"
    except Exception as exc:
        return EXIT_UNREADABLE, one_line(exc)


def cmd_sagas_list(settings: Settings, args: Any) -> int:
    older = parse_duration(args.older_than) if args.older_than else None
    now = time.time()
    status, found = asyncio.run(_guarded(listed_sagas(
        settings, state=args.state, older_than=older, now=now, limit=args.limit + 1)))
    if not isinstance(found, list):
        print(f"bizcenter sagas list: cannot read the sagas: {found}", file=_stderr())
        return status
    rows = found[:args.limit]
    if len(found) > args.limit:
        print(f"bizcenter sagas list: more sagas match; the {args.limit} least recently "
              "updated are shown (--limit)", file=_stderr())
    if args.json:
        print(json.dumps([_public(s) for s in rows], indent=2))
    else:
        print(sagas_table(rows, now))
    return EXIT_OK


def _public(saga: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in saga.items() if k != "updatedAtEpoch"}


def cmd_sagas_show(settings: Settings, args: Any) -> int:
    status, found = asyncio.run(_guarded(saga_and_events(settings, args.transfer_id)))
    if not isinstance(found, tuple):
        print(f"bizcenter sagas show: cannot read the sagas: {found}", file=_stderr())
        return status
    saga, events = found
    if saga is None and not events:
        print(f"bizcenter sagas show: no saga {args.transfer_id}", file=_stderr())
        return EXIT_NOT_FOUND
    if args.json:
        # "versions": the stored versions; the table keeps one, the row (none once purged)
        print(json.dumps({"saga": None if saga is None else _public(saga),
                          "versions": [] if saga is None else [_public(saga)],
                          "transferEvents": events}, indent=2))
        return EXIT_OK
    if saga is None:
        print("(no stored saga: purged after it finished, or never stored)")
    else:
        for key, value in _public(saga).items():
            if value not in (None, "", 0) or key in ("seq", "state"):
                print(f"{key:<18} {value}")
    print("\ntransfer events (the history, oldest first):")
    for e in events:
        print(f"  {e.get('occurredAt', ''):<27} seq {e.get('seq')!s:<3} "
              f"{e.get('previousState') or 'start'} -> {e.get('state')} {e.get('code') or ''}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# sagas resolve
# --------------------------------------------------------------------------------------


def resolution_id(transfer_id: str, number: int, action: str) -> str:
    """The same for the same resolution asked again (so a repeat is a duplicate)."""
    return str(uuid.uuid5(RESOLUTION_NS, f"{transfer_id}\x1f{number}\x1f{action}"))


#: The final state each action ends in when it succeeds.
RESOLVED_STATE = {"refund": "FAILED", "complete": "COMPLETED"}


def outcome_status(action: str, state: str) -> int:
    """The exit status of a resolution that ended in ``state``: 0 only when it is what the
    action asked (a ``complete`` whose credit was refused ends FAILED, the payer refunded:
    the payee was never credited)."""
    return EXIT_OK if RESOLVED_STATE[action] == state else EXIT_NOT_FOUND


def not_to_send(saga: dict[str, Any] | None, action: str, transfer_id: str
                ) -> tuple[int, dict[str, Any]] | None:
    """The answer when no resolution is to be sent (unknown saga, not in MANUAL_REVIEW,
    already resolved), or None when one is."""
    if saga is None:
        return EXIT_NOT_FOUND, {"outcome": "not found", "transferId": transfer_id}
    state = saga["state"]
    if state != "MANUAL_REVIEW":
        if saga["resolutionCount"] and saga["resolutionAction"] == action:
            if state not in FINAL:
                return EXIT_OK, {"outcome": "being resolved", "saga": _public(saga)}
            if state == RESOLVED_STATE[action]:
                return EXIT_OK, {"outcome": "already resolved", "saga": _public(saga)}
            return EXIT_NOT_FOUND, {
                "outcome": f"resolved otherwise: the {action} ended {state}"
                + (" (the payee's credit was refused and the payer refunded: the payee was "
                   "never credited)" if action == "complete" else ""),
                "saga": _public(saga)}
        return EXIT_NOT_FOUND, {"outcome": f"not in MANUAL_REVIEW (state {state})",
                                "saga": _public(saga)}
    if saga["kind"] != "transfer":
        return EXIT_NOT_FOUND, {"outcome": "only transfers can be resolved",
                                "saga": _public(saga)}
    return None


def resolution_outcome(saga: dict[str, Any] | None, number: int, action: str
                       ) -> tuple[int, str] | None:
    """What the saga's row says of resolution ``number`` (``action``) sent to it: None
    while it has not finished (not started yet, or under way), else (exit status, outcome):
    the final state it ended in, or, when another resolution took that number first (two
    operators at once: the saga decides only one), that it was resolved otherwise."""
    if saga is None or saga["resolutionCount"] < number or saga["state"] not in FINAL:
        return None
    state = str(saga["state"])
    if saga["resolutionCount"] == number and saga["resolutionAction"] == action:
        return outcome_status(action, state), state
    return EXIT_NOT_FOUND, (
        f"resolved otherwise: resolution {saga['resolutionCount']} "
        f"({saga['resolutionAction']} by {saga['resolvedBy']}) ended {state}")


def resolution_input(secret: bytes, transfer_id: str, number: int, action: str,
                     operator: str, reason: str) -> Any:
    """The signed ``operatorResolution`` saga input (schemas.wire.SagaInput); a
    ValidationError when the operator or the reason is not acceptable."""
    from app.domain.resolution_signing import sign_resolution
    from schemas.wire import OperatorResolution, SagaInput

    rid = resolution_id(transfer_id, number, action)
    return SagaInput(kind="operatorResolution", resolution=OperatorResolution(
        transfer_id=transfer_id, resolution_id=rid, number=number, action=action,
        operator=operator, reason=reason,
        signature=sign_resolution(secret, transfer_id=transfer_id, resolution_id=rid,
                                  number=number, action=action, operator=operator,
                                  reason=reason)))


async def send_input(settings: Settings, item: Any, transfer_id: str, partition: int) -> None:
    """``item`` to ``partition`` of ``business.saga-inputs``, acknowledged by all replicas."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("business.saga-inputs"),
                                     orjson.dumps(item.to_wire()), key=transfer_id.encode(),
                                     partition=partition)
    finally:
        await producer.stop()


async def await_outcome(read: Callable[[], Awaitable[dict[str, Any] | None]], number: int,
                        action: str, wait: float, *,
                        interval: float = POLL_INTERVAL_SECONDS
                        ) -> tuple[int, str, dict[str, Any] | None, str | None]:
    """Read the saga (``read``) every ``interval`` until :func:`resolution_outcome` has
    one or ``wait`` seconds have passed (at least one read): (exit status, outcome, the
    saga last read, the last read's error). A failed read is tried again until the
    deadline: the input is sent, so the answer is then EXIT_PENDING, not EXIT_UNREADABLE."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    saga: dict[str, Any] | None = None
    error: str | None = None
    while True:
        try:
            saga = await asyncio.wait_for(read(), max(deadline - loop.time(), interval))
            error = None
        except Exception as exc:
            error = one_line(exc)
        else:
            seen = resolution_outcome(saga, number, action)
            if seen is not None:
                return seen[0], seen[1], saga, None
        left = deadline - loop.time()
        if left <= 0:
            break
        await asyncio.sleep(min(interval, left))
    started = saga is not None and saga["resolutionCount"] >= number
    return EXIT_PENDING, "sent; started" if started else "sent", saga, error


async def resolve(settings: Settings, transfer_id: str, action: str, operator: str,
                  reason: str, wait: float) -> tuple[int, dict[str, Any]]:
    """Send the resolution if the saga's row calls for one, then wait for its outcome in
    the row. An :class:`Unreadable` before the input is sent."""
    async with saga_store(settings) as store:
        async def read() -> dict[str, Any] | None:
            found = await store.saga(transfer_id)
            return None if found is None else saga_view(found)

        saga = await reading(postgres(settings),
                             asyncio.wait_for(read(), READ_TIMEOUT_SECONDS))
        answer = not_to_send(saga, action, transfer_id)
        if answer is not None:
            return answer
        assert saga is not None
        number = saga["resolutionCount"] + 1
        item = resolution_input(settings.operator_secret.get_secret_value().encode(),
                                transfer_id, number, action, operator, reason)
        await reading(f"Kafka ({settings.topic('business.saga-inputs')})", asyncio.wait_for(
            send_input(settings, item, transfer_id, saga["homePartition"]),
            READ_TIMEOUT_SECONDS))
        sent = {"transferId": transfer_id, "action": action, "operator": operator,
                "resolutionId": item.resolution.resolution_id if item.resolution else None,
                "resolution": number, "homePartition": saga["homePartition"]}
        status, outcome, last, error = await await_outcome(read, number, action, wait)
    result = {**sent, "outcome": outcome}
    if last is not None and status != EXIT_PENDING:
        result["saga"] = _public(last)
    if error is not None:
        result["lastReadError"] = f"{postgres(settings)}: {error}"
    return status, result


def cmd_sagas_resolve(settings: Settings, args: Any) -> int:
    from pydantic import ValidationError

    action = "refund" if args.refund else "complete"
    try:  # the operator and the reason checked before anything is read or sent
        resolution_input(b"", args.transfer_id, 1, action, args.operator, args.reason)
    except ValidationError as exc:
        fields = sorted({str(e["loc"][-1]) for e in exc.errors(include_input=False)})
        print(f"bizcenter sagas resolve: refused: {', '.join(fields)}: an identifier of 1 "
              "to 128 characters (operator, transferId) and a reason of 1 to 512, without "
              "control characters", file=_stderr())
        return EXIT_NOT_FOUND
    try:
        status, result = asyncio.run(asyncio.wait_for(
            resolve(settings, args.transfer_id, action, args.operator, args.reason,
                    args.wait), 2 * READ_TIMEOUT_SECONDS + args.wait))
    except Exception as exc:
        why = str(exc) if isinstance(exc, Unreadable) else one_line(exc)
        print(f"bizcenter sagas resolve: cannot read the saga or send the resolution: {why} "
              "(running the command again is harmless: the same resolution is the same "
              "input)", file=_stderr())
        return EXIT_UNREADABLE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        outcome = result.get("outcome")
        messages = {
            "COMPLETED": "resolved: the payee was credited (COMPLETED)",
            "FAILED": "resolved: the payer was refunded (FAILED)" if action == "refund"
            else "NOT completed: the payee's credit was refused and the payer refunded "
                 "(FAILED); the payee was never credited",
            "MANUAL_REVIEW": "refused again by the account center: still MANUAL_REVIEW "
                             "(see bizcenter sagas show)",
        }
        print(f"{args.transfer_id}: {messages.get(str(outcome), outcome)}")
        if status == EXIT_PENDING:
            print("the resolution is on its way; follow it with: bizcenter sagas show "
                  f"{args.transfer_id}")
            if "lastReadError" in result:
                print(f"(the saga could not be read: {result['lastReadError']})")
    return status


# --------------------------------------------------------------------------------------
# dlq list / show
# --------------------------------------------------------------------------------------


async def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    letters = []
    for r in await read_topic(settings, settings.topic("business.dlq")):
        try:
            letter = orjson.loads(r.value or b"")
        except orjson.JSONDecodeError:
            letter = {"reason": "(not a dead letter: undecodable)"}
        if not isinstance(letter, dict):
            letter = {"reason": "(not a dead letter)"}
        letters.append({"id": f"{r.partition}:{r.offset}", **letter})
    letters.sort(key=lambda d: (str(d.get("failedAt", "")), d["id"]))
    return letters


def cmd_dlq_list(settings: Settings, args: Any) -> int:
    status, letters = asyncio.run(_guarded(dead_letters(settings)))
    if not isinstance(letters, list):
        print(f"bizcenter dlq list: cannot read {settings.topic('business.dlq')}: {letters}",
              file=_stderr())
        return status
    if args.topic:
        letters = [d for d in letters if d.get("sourceTopic") in (
            args.topic, settings.topic(args.topic))]
    if args.limit:
        letters = letters[-args.limit:]
    if args.json:
        print(json.dumps(letters, indent=2))
        return EXIT_OK
    print(f"{'id':<10} {'failedAt':<27} {'source':<48} reason")
    for d in letters:
        source = f"{d.get('sourceTopic')}[{d.get('sourcePartition')}]@{d.get('sourceOffset')}"
        print(f"{d['id']:<10} {d.get('failedAt', '')!s:<27} {source:<48} "
              f"{str(d.get('reason', ''))[:100]}")
    print(f"{len(letters)} dead letter(s)")
    return EXIT_OK


def cmd_dlq_show(settings: Settings, args: Any) -> int:
    status, letters = asyncio.run(_guarded(dead_letters(settings)))
    if not isinstance(letters, list):
        print(f"bizcenter dlq show: cannot read {settings.topic('business.dlq')}: {letters}",
              file=_stderr())
        return status
    letter = next((d for d in letters if d["id"] == args.id), None)
    if letter is None:
        print(f"bizcenter dlq show: no dead letter {args.id} (ids: bizcenter dlq list)",
              file=_stderr())
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps(letter, indent=2))
    else:
        for key, value in letter.items():
            print(f"{key:<16} {value}")
        print(f"\nthe original: {letter.get('sourceTopic')} partition "
              f"{letter.get('sourcePartition')} offset {letter.get('sourceOffset')} (for the "
              "topic's retention; compare its SHA-256 with valueSha256). docs/operations.md, "
              "Dead letters, says what to do by source topic.")
    return EXIT_OK


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _stderr() -> Any:
    import sys

    return sys.stderr


def add_parsers(sub: Any) -> None:
    """The ``sagas`` and ``dlq`` subcommands (cli/main.py)."""
    import argparse

    sagas = sub.add_parser("sagas", help="list, show and resolve transfer sagas",
                           description="Sagas as the workers store them: the table sagas of "
                           "the business schema in PostgreSQL, one row (the latest version) "
                           "per saga; show adds the transfer's events from Kafka "
                           "(business.transfer-events), its history. Exit 0 ok, 1 not found "
                           "or not resolvable, 2 PostgreSQL or Kafka unreadable, 3 a "
                           "resolution sent but not seen finished.")
    ssub = sagas.add_subparsers(dest="sagas_command", required=True)
    lst = ssub.add_parser("list", help="sagas by state and age")
    lst.add_argument("--state", help="only this state, e.g. MANUAL_REVIEW, DEBITING")
    lst.add_argument("--older-than", metavar="AGE",
                     help="only sagas unchanged for at least AGE (30s, 10m, 2h, 1d)")
    lst.add_argument("--limit", type=_positive, default=DEFAULT_LIST_LIMIT, metavar="N",
                     help="at most N sagas, the least recently updated (default "
                     f"{DEFAULT_LIST_LIMIT}; a line on stderr says when more match)")
    lst.add_argument("--json", action="store_true", help="as a JSON list")
    lst.set_defaults(fn=cmd_sagas_list)
    show = ssub.add_parser(
        "show", help="one saga: its stored version (the row) and its transfer events",
        description="The saga's row (its one stored version: the table keeps the latest "
        "only; none once a finished saga is purged) and the transfer's events from "
        "business.transfer-events, its history. In --json, \"versions\" lists the stored "
        "versions: the row, or none.")
    show.add_argument("transfer_id", metavar="TRANSFER_ID")
    show.add_argument("--json", action="store_true", help="as a JSON object")
    show.set_defaults(fn=cmd_sagas_show)
    res = ssub.add_parser(
        "resolve", help="settle a MANUAL_REVIEW transfer: refund the payer or credit the payee",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sends an operatorResolution input to the saga (business.saga-inputs): "
        "the saga sends the refund or the credit to the account center under a new command "
        "id, once, and records the operator and the reason; never a direct balance edit. "
        "Running it again is harmless. The outcome is read from the saga's row in "
        "PostgreSQL until --wait runs out. Exit 0 resolved (or already), 1 not resolvable "
        "or refused again by the account center, 2 PostgreSQL or Kafka unreadable (the "
        "saga not read or the input not sent), 3 sent, outcome not seen within --wait.")
    what = res.add_mutually_exclusive_group(required=True)
    what.add_argument("--refund", action="store_true",
                      help="give the amount held in clearing back to the payer")
    what.add_argument("--complete", action="store_true", help="credit the payee")
    res.add_argument("transfer_id", metavar="TRANSFER_ID")
    res.add_argument("--operator", required=True, help="your name (recorded in the saga)")
    res.add_argument("--reason", required=True, help="why (recorded in the saga)")
    res.add_argument("--wait", type=float, default=30.0,
                     help="seconds to wait for the outcome (default 30)")
    res.add_argument("--json", action="store_true", help="the outcome as JSON")
    res.set_defaults(fn=cmd_sagas_resolve)

    dlq = sub.add_parser("dlq", help="list and show dead letters (business.dlq)",
                         description="Dead letters: where the original record is and why it "
                         "was set aside, never its value. Exit 0 ok, 1 not found, 2 Kafka "
                         "unreadable.")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dsub.add_parser("list", help="dead letters, oldest first")
    dl.add_argument("--topic", help="only those from this source topic (e.g. "
                    "business.commands)")
    dl.add_argument("--limit", type=int, default=0, help="only the newest N")
    dl.add_argument("--json", action="store_true", help="as a JSON list")
    dl.set_defaults(fn=cmd_dlq_list)
    ds = dsub.add_parser("show", help="one dead letter by its id (PARTITION:OFFSET in "
                         "business.dlq, as dlq list shows it)")
    ds.add_argument("id", metavar="ID")
    ds.add_argument("--json", action="store_true", help="as a JSON object")
    ds.set_defaults(fn=cmd_dlq_show)
