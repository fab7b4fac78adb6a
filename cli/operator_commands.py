"""Operator commands: ``bizcenter sagas list|show|resolve`` and ``bizcenter dlq list|show``.

Why one module: it answers the operator's one question, what happened to a transfer or a
record and how to finish it, from Kafka alone. ``sagas`` and ``dlq`` share the topic reading
(:func:`read_topic`, :class:`Record`), the exit statuses and the output conventions; split
by command group, the ``dlq`` half would be about 60 lines importing its reading from the
``sagas`` half.

They read Kafka directly, never a worker's memory, so they work with any number of workers
running (or none):

- **sagas** are the worker's Faust table ``sagas``, whose changelog topic
  ``<BIZ_APP_ID>-sagas-changelog`` holds every version of every saga (key transferId, value
  the stored saga; the latest per key is the table, a null value a purge). ``show`` adds the
  transfer's events from ``business.transfer-events`` (its audit trail).
- **resolve** does not touch a balance: it sends an ``operatorResolution`` input to the
  saga's home partition of ``business.saga-inputs``, which the saga agent decides through
  the pure saga (``transfer_saga.on_resolution``) like any input: the refund or the credit
  goes to the account center under a new command id, once. Its ``resolutionId`` is derived
  from the transfer, the resolution's number and the action, so the same command run twice
  is the same input twice (the second re-sends what the first decided); the number is in
  the input, and the saga acts only on the one after those it started. The input is
  signed (HMAC-SHA256 under ``BIZ_OPERATOR_SECRET``, app/domain/resolution_signing.py):
  the workers dead-letter any other.
- **dlq** reads ``business.dlq`` (docs/contract.md, "business.dlq": coordinates, sizes,
  digest and reason; never the original value).

Exit statuses: 0 done (found, listed, resolved as asked), 1 not found / not resolvable /
refused again / ended otherwise than asked (a ``--complete`` that ended FAILED), 2 Kafka
could not be read, 3 a resolution was sent but its outcome not seen in time.
What is printed holds no secret: a saga's OTP digest is never shown.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from app.settings import Settings
from events.topics import partition_of

EXIT_OK, EXIT_NOT_FOUND, EXIT_UNREADABLE, EXIT_PENDING = 0, 1, 2, 3
RESOLUTION_NS = uuid.UUID("9d3b7c1e-4a2f-4e8b-b6d1-7f0a5c3e2b14")
FINAL = ("COMPLETED", "FAILED", "MANUAL_REVIEW")
READ_TIMEOUT_SECONDS = 60.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


def sagas_changelog(settings: Settings) -> str:
    return f"{settings.app_id}-sagas-changelog"


def saga_view(raw: dict[str, Any]) -> dict[str, Any]:
    """What an operator sees of a stored saga (never its OTP digest)."""
    t = raw["transfer"]
    return {
        "transferId": t["transfer_id"], "kind": t.get("kind", "transfer"),
        "state": raw["state"], "code": raw.get("code"), "seq": raw["seq"],
        "operatorId": t["operator_id"], "fromAccountId": t["from_account_id"],
        "toAccountId": t["to_account_id"], "amountMinor": t["amount_minor"],
        "currency": t["currency"], "homePartition": t["home_partition"],
        "createdAt": iso(raw["created_at"]), "updatedAt": iso(raw["updated_at"]),
        "updatedAtEpoch": raw["updated_at"], "lastTrigger": raw.get("last_trigger", ""),
        "commandAttempts": raw.get("command_attempts", 0),
        "nextRetryAt": iso(raw.get("next_retry_at")),
        "resolutionCount": raw.get("resolution_count", 0),
        "resolutionAction": raw.get("resolution_action"),
        "resolvedBy": raw.get("resolved_by"), "resolutionReason": raw.get("resolution_reason"),
    }


async def latest_sagas(settings: Settings) -> dict[str, dict[str, Any]]:
    """The sagas table as the changelog holds it: the latest version per transferId."""
    latest: dict[str, dict[str, Any]] = {}
    for r in await read_topic(settings, sagas_changelog(settings)):
        if r.key is None:
            continue
        key = r.key.decode(errors="replace")
        if r.value is None:
            latest.pop(key, None)  # purged
        else:
            latest[key] = saga_view(orjson.loads(r.value))
    return latest


def saga_versions(records: list[Record], transfer_id: str) -> list[dict[str, Any]]:
    """The stored versions of one saga, oldest first, in the changelog's order: by offset
    within its partition (a saga is written from its home partition only, so into one
    changelog partition). Never by record timestamp: those are the writers' clocks, and a
    worker whose clock is behind would make an older version look like the latest."""
    return [saga_view(orjson.loads(r.value)) if r.value is not None else
            {"transferId": transfer_id, "state": "(purged)"}
            for r in sorted(records, key=lambda r: (r.partition, r.offset))]


async def saga_history(settings: Settings, transfer_id: str
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every stored version of the saga, oldest first; its transfer events)."""
    key = transfer_id.encode()
    versions = saga_versions(await read_topic(settings, sagas_changelog(settings),
                                              keep=lambda k: k == key), transfer_id)
    partition = partition_of(key, settings.topic_partitions)
    events = [orjson.loads(r.value) for r in await read_topic(
        settings, settings.topic("business.transfer-events"), partitions=[partition],
        keep=lambda k: k == key) if r.value is not None]
    events.sort(key=lambda e: e.get("seq", 0))
    return versions, events


# --------------------------------------------------------------------------------------
# sagas list / show
# --------------------------------------------------------------------------------------


def select_sagas(sagas: dict[str, dict[str, Any]], *, state: str | None,
                 older_than: float | None, now: float) -> list[dict[str, Any]]:
    rows = [s for s in sagas.values()
            if (state is None or s["state"] == state)
            and (older_than is None or now - s["updatedAtEpoch"] >= older_than)]
    rows.sort(key=lambda s: s["updatedAtEpoch"])
    return rows


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


async def _guarded(work: Any) -> tuple[int, Any]:
    try:
        return EXIT_OK, await asyncio.wait_for(work, READ_TIMEOUT_SECONDS)
    except LookupError as exc:
        return EXIT_UNREADABLE, f"{exc}"
    except Exception as exc:
        return EXIT_UNREADABLE, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def cmd_sagas_list(settings: Settings, args: Any) -> int:
    older = parse_duration(args.older_than) if args.older_than else None
    status, sagas = asyncio.run(_guarded(latest_sagas(settings)))
    if status != EXIT_OK:
        print(f"bizcenter sagas list: cannot read {sagas_changelog(settings)}: {sagas}",
              file=_stderr())
        return status
    now = time.time()
    rows = select_sagas(sagas, state=args.state, older_than=older, now=now)
    if args.json:
        print(json.dumps([_public(s) for s in rows], indent=2))
    else:
        print(sagas_table(rows, now))
    return EXIT_OK


def _public(saga: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in saga.items() if k != "updatedAtEpoch"}


def cmd_sagas_show(settings: Settings, args: Any) -> int:
    status, found = asyncio.run(_guarded(saga_history(settings, args.transfer_id)))
    if status != EXIT_OK:
        print(f"bizcenter sagas show: cannot read the sagas: {found}", file=_stderr())
        return status
    versions, events = found
    if not versions and not events:
        print(f"bizcenter sagas show: no saga {args.transfer_id}", file=_stderr())
        return EXIT_NOT_FOUND
    if args.json:
        print(json.dumps({"saga": _public(versions[-1]) if versions else None,
                          "versions": [_public(v) for v in versions],
                          "transferEvents": events}, indent=2))
        return EXIT_OK
    if versions and "kind" in versions[-1]:
        for key, value in _public(versions[-1]).items():
            if value not in (None, "", 0) or key in ("seq", "state"):
                print(f"{key:<18} {value}")
    print("\nhistory (stored versions, oldest first):")
    for v in versions:
        who = (f"  resolution {v.get('resolutionCount')}: {v.get('resolutionAction')} by "
               f"{v.get('resolvedBy')} ({v.get('resolutionReason')})"
               if v.get("resolutionCount") else "")
        print(f"  {v.get('updatedAt') or '':<21} seq {v.get('seq', '-')!s:<3} "
              f"{v['state']:<13} {v.get('code') or '':<18} {v.get('lastTrigger', '')}{who}")
    print("\ntransfer events:")
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
    if saga is None or "kind" not in saga:
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


async def resolve(settings: Settings, transfer_id: str, action: str, operator: str,
                  reason: str, wait: float) -> tuple[int, dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    versions, _events = await saga_history(settings, transfer_id)
    saga = versions[-1] if versions else None
    answer = not_to_send(saga, action, transfer_id)
    if answer is not None:
        return answer
    assert saga is not None
    number = saga["resolutionCount"] + 1
    item = resolution_input(settings.operator_secret.get_secret_value().encode(),
                            transfer_id, number, action, operator, reason)

    events_topic = settings.topic("business.transfer-events")
    tp = TopicPartition(events_topic,
                        partition_of(transfer_id.encode(), settings.topic_partitions))
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, client_id="bizcenter-operator")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)  # fixed before the input is sent: no event is missed
        await producer.send_and_wait(settings.topic("business.saga-inputs"),
                                     orjson.dumps(item.to_wire()), key=transfer_id.encode(),
                                     partition=saga["homePartition"])
        sent = {"transferId": transfer_id, "action": action, "operator": operator,
                "resolutionId": item.resolution.resolution_id if item.resolution else None,
                "resolution": number, "homePartition": saga["homePartition"]}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        started = False
        while loop.time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for records in batch.values():
                for r in records:
                    if r.key != transfer_id.encode() or r.value is None:
                        continue
                    event = orjson.loads(r.value)
                    if event.get("previousState") == "MANUAL_REVIEW":
                        started = True
                    elif started and event.get("state") in FINAL:
                        outcome = event["state"]
                        return (outcome_status(action, outcome),
                                {**sent, "outcome": outcome, "event": event})
        return EXIT_PENDING, {**sent, "outcome": "sent; started" if started else "sent"}
    finally:
        await producer.stop()
        await consumer.stop()


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
                    args.wait), READ_TIMEOUT_SECONDS + args.wait))
    except Exception as exc:
        print(f"bizcenter sagas resolve: Kafka could not be read or written: "
              f"{type(exc).__name__}", file=_stderr())
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
    if status != EXIT_OK:
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
    if status != EXIT_OK:
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


def _stderr() -> Any:
    import sys

    return sys.stderr


def add_parsers(sub: Any) -> None:
    """The ``sagas`` and ``dlq`` subcommands (cli/main.py)."""
    import argparse

    sagas = sub.add_parser("sagas", help="list, show and resolve transfer sagas",
                           description="Sagas as the worker's table holds them (read from its "
                           "changelog topic). Exit 0 ok, 1 not found or not resolvable, 2 "
                           "Kafka unreadable, 3 a resolution sent but not seen finished.")
    ssub = sagas.add_subparsers(dest="sagas_command", required=True)
    lst = ssub.add_parser("list", help="sagas by state and age")
    lst.add_argument("--state", help="only this state, e.g. MANUAL_REVIEW, DEBITING")
    lst.add_argument("--older-than", metavar="AGE",
                     help="only sagas unchanged for at least AGE (30s, 10m, 2h, 1d)")
    lst.add_argument("--json", action="store_true", help="as a JSON list")
    lst.set_defaults(fn=cmd_sagas_list)
    show = ssub.add_parser("show", help="one saga, its stored versions and transfer events")
    show.add_argument("transfer_id", metavar="TRANSFER_ID")
    show.add_argument("--json", action="store_true", help="as a JSON object")
    show.set_defaults(fn=cmd_sagas_show)
    res = ssub.add_parser(
        "resolve", help="settle a MANUAL_REVIEW transfer: refund the payer or credit the payee",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sends an operatorResolution input to the saga (business.saga-inputs): "
        "the saga sends the refund or the credit to the account center under a new command "
        "id, once, and records the operator and the reason; never a direct balance edit. "
        "Running it again is harmless. Exit 0 resolved (or already), 1 not resolvable or "
        "refused again by the account center, 2 Kafka unreadable, 3 sent, outcome not seen "
        "within --wait.")
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
