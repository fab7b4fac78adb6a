"""The AsyncAPI 3 document of the wire contract, ``docs/asyncapi.yaml``, generated.

    python -m app.asyncapi            write (or rewrite) docs/asyncapi.yaml
    python -m app.asyncapi --check    exit 1 when the file is not what would be written

One channel per topic of :data:`events.topics.TOPIC_SPECS` (its address, its key, whether
it is internal), one message per channel whose payload is the JSON Schema file exported by
``python -m schemas.export`` (``schemas/json/<Model>.json``, referenced, not copied), and
the business center's operations on it: ``send`` what it publishes, ``receive`` what it
consumes (both for the internal topics it writes and reads itself). The facts that are not
in ``TOPIC_SPECS`` (which model, which direction, who is on the other side) are in
:data:`CHANNELS` below; a topic missing there stops the generation.

The YAML is written by a small emitter of our own (block style, every string
double-quoted), so that the package needs no YAML library; ``tests/unit/test_asyncapi.py``
parses the file back with PyYAML and checks it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.topics import TOPIC_SPECS

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
#: The payload schemas, relative to the document (docs/ → schemas/json/).
SCHEMA_REF = "../schemas/json/{model}.json"
#: The contract's version (docs/contract.md "Wire contract (v2)"); CHANGELOG.md.
CONTRACT_VERSION = "2.0.0"
KAFKA_BINDING_VERSION = "0.5.0"


@dataclass(frozen=True, slots=True)
class Channel:
    model: str  # the wire model (schemas/wire.py) of every record on the topic
    send: bool  # the business center publishes it
    receive: bool  # the business center consumes it
    description: str
    internal: bool = False


CHANNELS: dict[str, Channel] = {
    "business.commands": Channel(
        "CommandEnvelope", send=False, receive=True,
        description="The gateway's commands: transferInit, transferConfirm, verifyOtp, "
        "topUp and the queries (docs/contract.md#commands-businesscommands)."),
    "business.replies": Channel(
        "Reply", send=True, receive=False,
        description="Replies to the gateway, addressed by requestId; one request may "
        "receive several (pending, then final)."),
    "account.commands": Channel(
        "AccountCommand", send=True, receive=False,
        description="Debits, credits and refunds for the account center, in order per "
        "account."),
    "account.events": Channel(
        "AccountEvent", send=False, receive=True,
        description="The account center's outcomes (debited, credited, refunded, rejected; "
        "opening balances as credits open:<accountId>): applied to the balance and history "
        "tables, then routed to the saga."),
    "notifications.otp": Channel(
        "OtpNotification", send=True, receive=False,
        description="One-time passwords for the SMS sender. Holds the plain OTP: restrict "
        "read access."),
    "business.transfer-events": Channel(
        "TransferEvent", send=True, receive=False,
        description="Every saga state change, in order per transfer, for audit and "
        "downstream readers (the worker's own query table of transfers is written with "
        "the saga, not read back from here)."),
    "business.dlq": Channel(
        "DeadLetter", send=True, receive=False,
        description="Records that could not be decoded or processed, with the reason and "
        "where they came from (docs/contract.md#businessdlq)."),
    "funding.commands": Channel(
        "FundingCommand", send=True, receive=False,
        description="Charges of linked bank accounts and cards for top-ups, and refunds of "
        "captures, for the funding provider."),
    "funding.events": Channel(
        "FundingEvent", send=False, receive=True,
        description="The funding provider's outcomes: captured, declined or refunded."),
    "business.saga-inputs": Channel(
        "SagaInput", send=True, receive=True, internal=True,
        description="Internal: account and funding events and timer ticks routed to the "
        "saga's home partition (an explicit partition, not the key's hash)."),
    "business.queries": Channel(
        "QueryRequest", send=True, receive=True, internal=True,
        description="Internal: authenticated queries, answered from the query tables in "
        "PostgreSQL by whichever worker consumes them."),
}


def _channel_id(topic: str) -> str:
    """``business.saga-inputs`` → ``businessSagaInputs``."""
    first, *rest = re.split(r"[.\-]", topic)
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def document() -> dict[str, Any]:
    """The AsyncAPI document as data."""
    missing = [s.name for s in TOPIC_SPECS if s.name not in CHANNELS]
    unknown = sorted(set(CHANNELS) - {s.name for s in TOPIC_SPECS})
    if missing or unknown:
        raise ValueError(f"app/asyncapi.py CHANNELS: missing {missing}, not topics {unknown}")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in TOPIC_SPECS:
        info = CHANNELS[spec.name]
        cid = _channel_id(spec.name)
        message_id = info.model
        channel: dict[str, Any] = {
            "address": spec.name,
            "title": spec.name,
            "description": info.description,
            "messages": {message_id: {"$ref": f"#/components/messages/{message_id}"}},
            "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING_VERSION,
                                   "topicConfiguration": {"cleanup.policy": [
                                       "compact" if spec.compacted else "delete"]}}},
            "x-key": spec.key,
            "x-internal": info.internal,
            "x-copartitioned": spec.copartitioned,
        }
        channels[cid] = channel
        for action, wanted in (("send", info.send), ("receive", info.receive)):
            if not wanted:
                continue
            operations[f"{action}{cid[:1].upper()}{cid[1:]}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": ("The business center publishes " if action == "send" else
                            "The business center consumes ") + f"{spec.name}.",
                "messages": [{"$ref": f"#/channels/{cid}/messages/{message_id}"}],
            }
        messages[message_id] = {
            "name": message_id,
            "title": message_id,
            "contentType": "application/json",
            "payload": {"$ref": SCHEMA_REF.format(model=info.model)},
            "bindings": {"kafka": {"bindingVersion": KAFKA_BINDING_VERSION,
                                   "key": {"type": "string", "description": spec.key}}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "bizcenter wire contract",
            "version": CONTRACT_VERSION,
            "description": "What the business center of the e-wallet exchanges over Kafka "
            "with the gateway, the account center, the funding provider, the SMS sender and "
            "downstream readers. The rules (idempotency, replies, error codes, tokens) are "
            "in docs/contract.md; the payloads are the JSON Schemas of schemas/json/. Every "
            "topic name takes the BIZ_TOPIC_PREFIX prefix (empty in production). Generated "
            "by `python -m app.asyncapi`: do not edit by hand.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:19092", "protocol": "kafka",
                      "description": "The broker of `make up` (KAFKA_BOOTSTRAP_SERVERS)."},
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


# ------------------------------------------------------------------------ the YAML text

_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_.$/\-]*$")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid YAML double-quoted scalar
    raise TypeError(f"cannot write {type(value).__name__} to YAML")


def _key(key: str) -> str:
    return key if _PLAIN_KEY.match(key) and key not in ("true", "false", "null") \
        else json.dumps(key)


def _emit(value: Any, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{_key(key)}:")
                _emit(item, indent + 1, out)
            else:
                out.append(f"{pad}{_key(key)}: {_empty(item) or _scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                lines: list[str] = []
                _emit(item, indent + 1, lines)
                out.append(f"{pad}- {lines[0].lstrip()}")
                out.extend(lines[1:])
            elif isinstance(item, list) and item:
                raise TypeError("nested lists are not written")
            else:
                out.append(f"{pad}- {_empty(item) or _scalar(item)}")
    else:
        out.append(pad + _scalar(value))


def _empty(value: Any) -> str:
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    return ""


def render(doc: dict[str, Any] | None = None) -> str:
    out = ["# Generated by `python -m app.asyncapi` from events/topics.py and "
           "schemas/json/: do not edit."]
    _emit(document() if doc is None else doc, 0, out)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.asyncapi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/asyncapi.yaml is not current; write nothing")
    args = parser.parse_args(argv)
    text = render()
    current = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.is_file() else None
    if args.check:
        if current != text:
            print(f"{DOCUMENT.relative_to(ROOT)} is not current: run python -m app.asyncapi",
                  file=sys.stderr)
            return 1
        return 0
    if current != text:
        DOCUMENT.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {DOCUMENT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
