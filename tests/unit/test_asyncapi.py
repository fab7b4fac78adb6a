"""docs/asyncapi.yaml: current (what ``python -m app.asyncapi`` writes), valid YAML that
parses back to the generated document, AsyncAPI 3, every topic a channel with its key,
every message's payload an exported JSON Schema of schemas/json/, and the directions the
worker really has (what it consumes is what its consumer group reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from system import System

from app import asyncapi
from events.topics import TOPIC_SPECS
from schemas.export import SCHEMA_DIR, expected_files

DOC_PATH = asyncapi.DOCUMENT


def _load() -> dict[str, Any]:
    loaded = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


def test_the_document_is_current() -> None:
    assert asyncapi.main(["--check"]) == 0, "run: python -m app.asyncapi"


def test_the_yaml_parses_back_to_the_generated_document() -> None:
    assert _load() == asyncapi.document()


def test_asyncapi_3_with_every_topic_its_key_and_a_message() -> None:
    doc = _load()
    assert str(doc["asyncapi"]).startswith("3."), doc["asyncapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    by_address = {ch["address"]: ch for ch in doc["channels"].values()}
    assert set(by_address) == {spec.name for spec in TOPIC_SPECS}
    for spec in TOPIC_SPECS:
        channel = by_address[spec.name]
        assert channel["x-key"] == spec.key
        assert channel["description"]
        assert len(channel["messages"]) == 1, spec.name
        for message_ref in channel["messages"].values():
            message = _resolve(doc, message_ref["$ref"])
            assert message["bindings"]["kafka"]["key"]["description"] == spec.key
            assert message["contentType"] == "application/json"


def test_every_payload_is_an_exported_schema() -> None:
    doc = _load()
    exported = expected_files()
    for name, message in doc["components"]["messages"].items():
        ref = message["payload"]["$ref"]
        path = (DOC_PATH.parent / ref).resolve()
        assert path.parent == SCHEMA_DIR, ref
        assert path.name in exported, f"{name}: {ref} is not an exported schema"
        assert path.read_text(encoding="utf-8") == exported[path.name], f"{ref} is stale"


def test_operations_reference_their_channels_and_say_the_direction() -> None:
    doc = _load()
    received, sent = set(), set()
    for op_id, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        channel = _resolve(doc, op["channel"]["$ref"])
        for message in op["messages"]:
            assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/"), op_id
            _resolve(doc, message["$ref"])
        (sent if op["action"] == "send" else received).add(channel["address"])
    assert received | sent == {spec.name for spec in TOPIC_SPECS}
    # What the business center consumes is exactly what its consumer groups read.
    worker = System.build("unused:9092", "postgresql+asyncpg://u@h/d", "x", Path("/tmp"))
    prefix = worker.settings.topic_prefix
    assert received == {t.removeprefix(prefix) for topics in worker.worker_groups().values()
                        for t in topics}
    # The gateway's commands come in; replies, account commands and OTPs go out.
    assert "business.commands" not in sent and "business.replies" not in received
    assert {"account.commands", "notifications.otp", "business.dlq"} <= sent
