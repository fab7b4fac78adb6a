"""Log lines as JSON (BIZ_LOG_FORMAT=json) with the request's ids, still redacted; rebalance
cancellations logged as INFO without a traceback, every other crash still an ERROR; the
readiness checks of /readyz from Faust's state; ``bizcenter config`` masks every secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from agents.health import readiness_checks
from app import log_format
from app.log_format import JsonFormatter, RebalanceCancellations, RetriedCoordinatorLookups
from app.log_redaction import REDACTED, RedactSecrets
from app.settings import DEV_PIN_PEPPER, Settings
from cli.main import effective_configuration
from reference.user_center import issue_access_token

TOKEN = issue_access_token(Settings(), "alice")


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose one handler is set up like the processes' (redaction, then
    log_format.install with json), writing to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger(f"test.logformat.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        log_format.install("json")
        assert isinstance(handler.formatter, JsonFormatter)
        assert [type(f) for f in handler.filters[:2]] == [RetriedCoordinatorLookups,
                                                           RebalanceCancellations]
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_carries_the_request_ids_and_no_secret(
        logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    logger.info("confirm %s with pin=%s", "t-1", "97531864",
                extra={"requestId": "r-1", "transferId": "t-1", "operatorId": "alice"})
    logger.warning("no ids here, token %s", TOKEN)
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        logger.exception("failed", extra={"transferId": "t-2"})
    first, second, third = _lines(stream)
    assert first["level"] == "INFO" and first["logger"] == logger.name
    assert first["message"] == f"confirm t-1 with pin={REDACTED}"
    assert (first["requestId"], first["transferId"], first["operatorId"]) == (
        "r-1", "t-1", "alice")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert not {"requestId", "transferId", "operatorId"} & set(second)
    assert TOKEN not in stream.getvalue() and "97531864" not in stream.getvalue()
    assert third["level"] == "ERROR" and third["transferId"] == "t-2"
    assert "ValueError: bad token <redacted>" in third["exc"]


def test_a_rebalance_cancellation_is_one_info_line_without_traceback(
        logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = logged
    faust_logger = logging.getLogger("faust.agents.agent")
    handler = logger.handlers[0]
    faust_logger.addHandler(handler)
    saved = faust_logger.propagate, faust_logger.level
    faust_logger.propagate, faust_logger.level = False, logging.DEBUG
    try:
        for exc in (asyncio.CancelledError(), RuntimeError("boom")):
            try:
                raise exc
            except BaseException as caught:  # as mode's Service.crash logs it
                faust_logger.exception("[^--Agent*: agents.x]: Crashed reason=%r", caught)
        # the same words from an application logger are not touched
        logger.error("Crashed reason=%r", asyncio.CancelledError())
    finally:
        faust_logger.removeHandler(handler)
        faust_logger.propagate, faust_logger.level = saved
    cancelled, crashed, ours = _lines(stream)
    assert cancelled["level"] == "INFO" and "exc" not in cancelled, cancelled
    assert "Crashed reason=CancelledError()" in cancelled["message"]
    assert "rebalance" in cancelled["message"]
    assert crashed["level"] == "ERROR" and "RuntimeError: boom" in crashed["exc"], crashed
    assert ours["level"] == "ERROR", ours


def test_a_retried_coordinator_lookup_is_a_warning_a_fatal_one_an_error(
        logged: tuple[logging.Logger, io.StringIO]) -> None:
    from aiokafka import errors

    logger, stream = logged
    aiokafka_logger = logging.getLogger("aiokafka.consumer.group_coordinator")
    handler = logger.handlers[0]
    aiokafka_logger.addHandler(handler)
    saved = aiokafka_logger.propagate
    aiokafka_logger.propagate = False
    try:
        # exactly as aiokafka logs it, then retries when the error is retriable
        for err in (errors.CoordinatorNotAvailableError(), errors.KafkaError("fatal")):
            aiokafka_logger.error("Group Coordinator Request failed: %s", err)
    finally:
        aiokafka_logger.removeHandler(handler)
        aiokafka_logger.propagate = saved
    retried, fatal = _lines(stream)
    assert retried["level"] == "WARNING", retried
    assert "CoordinatorNotAvailable" in retried["message"], retried
    assert "retrying" in retried["message"]
    assert fatal["level"] == "ERROR", fatal


def test_install_is_idempotent_and_text_stays_the_default() -> None:
    handler = logging.StreamHandler(io.StringIO())
    named = logging.getLogger(f"test.install.{uuid.uuid4().hex}")
    named.addHandler(handler)
    try:
        log_format.install()
        log_format.install()
        assert [type(f) for f in handler.filters] == [RetriedCoordinatorLookups,
                                                      RebalanceCancellations]
        assert not isinstance(handler.formatter, JsonFormatter)
    finally:
        named.removeHandler(handler)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_lines_are_plain_off_a_terminal_and_colored_on_one() -> None:
    """Faust's worker installs mode's colored formatter (~100 µs per line); off a
    terminal (a file, a pipe) the text lines are plain (~20 µs), on one they stay."""
    from mode.utils.logging import ExtensionFormatter

    piped, terminal = io.StringIO(), _Terminal()
    handlers = [logging.StreamHandler(piped), logging.StreamHandler(terminal)]
    named = logging.getLogger(f"test.text.{uuid.uuid4().hex}")
    for handler in handlers:
        handler.setFormatter(ExtensionFormatter(log_format.TEXT_FORMAT))
        named.addHandler(handler)
    try:
        log_format.install("text")
        assert type(handlers[0].formatter) is logging.Formatter
        assert isinstance(handlers[1].formatter, ExtensionFormatter)
        named.warning("transfer %s: %s", "t-1", "DEBITING -> CREDITING")
        line = piped.getvalue()
        assert line.endswith(f"WARNING {named.name}: transfer t-1: DEBITING -> CREDITING\n")
        assert "\x1b[" not in line  # no color codes in a file
    finally:
        for handler in handlers:
            named.removeHandler(handler)


def test_the_worker_logs_json_lines_by_setting() -> None:
    """The whole process: ``bizcenter`` with BIZ_LOG_FORMAT=json writes JSON lines."""
    code = ("import logging, sys; import cli.main as cli; from app.settings import load_settings;"
            "cli._setup_logging(load_settings());"
            "logging.getLogger('app.x').warning('hello', extra={'requestId': 'r-9'})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"BIZ_LOG_FORMAT": "json", "BIZ_ENV_FILE": "/nonexistent",
                              "PATH": "/usr/bin:/bin"}, timeout=60, check=True)
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert (line["message"], line["requestId"], line["level"]) == ("hello", "r-9", "WARNING")


# --------------------------------------------------------------------------------------
# /readyz from Faust's state
# --------------------------------------------------------------------------------------


class _Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def is_set(self) -> bool:
        return self.value

    def is_active(self) -> bool:
        return self.value


def _app(**over: Any) -> Any:
    state: dict[str, Any] = dict(
        crashed=False, should_stop=False, rebalancing_count=1, rebalancing=False,
        in_recovery=False, tables=SimpleNamespace(recovery=SimpleNamespace(
            completed=_Flag(True))), flow_control=_Flag(True),
        _fetcher=SimpleNamespace(started=True, should_stop=False))
    state.update(over)
    return SimpleNamespace(**state)


@pytest.mark.parametrize(("over", "failing"), [
    ({}, set()),
    ({"rebalancing_count": 0}, {"assigned"}),  # never joined its group yet
    ({"rebalancing": True}, {"assigned"}),
    ({"in_recovery": True}, {"recovered"}),
    ({"tables": SimpleNamespace(recovery=SimpleNamespace(completed=_Flag(False)))},
     {"recovered"}),
    ({"flow_control": _Flag(False)}, {"consuming"}),
    ({"_fetcher": SimpleNamespace(started=False, should_stop=False)}, {"consuming"}),
    ({"crashed": True}, {"assigned", "consuming"}),
])
def test_readiness_checks(over: dict[str, Any], failing: set[str]) -> None:
    checks = readiness_checks(_app(**over))
    assert {name for name, ok in checks.items() if not ok} == failing, checks


# --------------------------------------------------------------------------------------
# bizcenter config
# --------------------------------------------------------------------------------------


def test_config_masks_every_secret() -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex * 2
    settings = Settings(_env_file=None, pin_pepper=secret, otp_pepper="",  # type: ignore[call-arg]
                        database_url="postgresql+asyncpg://u:dbpass-xyz@h:5432/d")
    config = effective_configuration(settings)
    shown = json.dumps(config)
    assert secret not in shown and "dbpass-xyz" not in shown and DEV_PIN_PEPPER not in shown
    assert config["BIZ_PIN_PEPPER"] == f"(set, {len(secret)} bytes)"
    assert config["BIZ_OTP_PEPPER"] == "(unset)"
    assert config["BIZ_TRANSFER_TOKEN_SECRET"] == "(development placeholder)"
    assert config["DATABASE_URL"] == "postgresql+asyncpg://u:***@h:5432/d"
    assert set(config) >= {"KAFKA_BOOTSTRAP_SERVERS", "BIZ_WEB_ENABLED", "BIZ_LOG_FORMAT"}
    assert len(config) == len(Settings.model_fields)


def test_version_and_config_json_from_the_command_line() -> None:
    env = {"BIZ_ENV_FILE": "/nonexistent", "BIZ_ENVIRONMENT": "development",
           "PATH": "/usr/bin:/bin"}
    version = subprocess.run([sys.executable, "-m", "cli", "--version"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.startswith("bizcenter ") and version.stdout.strip() != "bizcenter"
    config = subprocess.run([sys.executable, "-m", "cli", "config", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(config.stdout)["BIZ_ENVIRONMENT"] == "development"
    # In production with every secret unset (where every process refuses to start),
    # config still shows what is set: it is how an operator finds the missing one.
    production = subprocess.run(
        [sys.executable, "-m", "cli", "config", "--json"], capture_output=True,
        text=True, timeout=60, check=True,
        env={**env, "BIZ_ENVIRONMENT": "production", "BIZ_PIN_PEPPER": ""})
    assert json.loads(production.stdout)["BIZ_PIN_PEPPER"] == "(unset)"


def test_a_refused_or_failed_record_is_logged_with_the_ids_it_holds(
        caplog: pytest.LogCaptureFixture) -> None:
    from app.record_failures import Handler, Outbound, RecordGuard, Refused, SourceRecord

    guard = RecordGuard(dlq_topic="dlq", partitions=3)
    handler = Handler(decide_with=None, poison_with=lambda r, e: [  # type: ignore[arg-type]
        Outbound("dlq", None, b"{}")])
    caplog.set_level(logging.INFO, logger="app.record_failures")
    command = json.dumps({"requestId": "r-77", "operatorId": "alice", "type": "transferInit",
                          "payload": "bad"}).encode()
    guard.poisoned(SourceRecord("business.commands", 1, 5, b"k", command), handler,
                   Refused("invalid envelope: payload: Input should be a valid dictionary"))
    guard.poisoned(SourceRecord("business.commands", 1, 6, b"k", command), handler,
                   ZeroDivisionError())
    guard.poisoned(SourceRecord("business.commands", 1, 7, b"k", b"not json"), handler,
                   Refused("undecodable"))
    refused, failed, unreadable = [json.loads(JsonFormatter().format(r))
                                   for r in caplog.records[-3:]]
    assert (refused["level"], refused["requestId"], refused["operatorId"]) == (
        "INFO", "r-77", "alice")
    assert (failed["level"], failed["requestId"], failed["operatorId"]) == (
        "ERROR", "r-77", "alice")
    assert "requestId" not in unreadable and "operatorId" not in unreadable


# --------------------------------------------------------------------------------------
# the cheap paths of the redaction and of the JSON lines give what the full ones give
# --------------------------------------------------------------------------------------

_SAMPLES = [
    "", "plain", "transfer 0b2d6a4e-1a1f-4f6e-9c1e-2f7d3c4b5a69: start -> DEBITING",
    "transfer x: AWAITING_OTP -> FAILED (OTP_EXPIRED)", "pin=123456", "PIN: 99", "otp = 1",
    "'pin': '1234'", '{"pin": "1234", "otp":"99"}', '{\\"accessToken\\": \\"abc\\"}',
    "Authorization: Bearer abc.def", "bearer xyz", "BEARER  q", f"token {TOKEN} end",
    "eyJhbGciOi.eyJzdWIi.sig", "eyJ", "pinned=1", "spin: 3", "password:hunter2",
    "transfer_token=abc&x=1", "ACCESS_TOKEN : 'x'", "x=1 y=2", "a:b:c",
    "\ufb01le pin=1", "Kelvin \u212a pin:1", "\u017fecret pa\u017fsword=1",
    "pa\u017fsword=hunter2",
    "\u0130pin=1", "bearer\u00a0x", "\u212aey=1", "caf\u00e9 pin=12 eyJa.b.c",
]


@pytest.mark.parametrize("text", _SAMPLES)
def test_the_redaction_fast_path_equals_the_full_scan(text: str) -> None:
    from app.log_redaction import _redact_fully, redact

    assert redact(text) == _redact_fully(text)


def test_the_redaction_fast_path_equals_the_full_scan_on_random_text() -> None:
    import random

    from app.log_redaction import _redact_fully, redact

    rng = random.Random(14)
    pieces = ["pin", "PIN", "otp", "Otp", "password", "accessToken", "access_token",
              "transferToken", "authorization", "Bearer", "bearer ", "eyJ", "eyJab", ".",
              ":", "=", " ", "'", '"', "\\", "x", "1", "-", "_", ",", "}",
              "\u017f", "\u212a", "\u00e9", "abc", "Tok", "en"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        assert redact(text) == _redact_fully(text), text


def test_a_json_line_is_what_json_dumps_wrote() -> None:
    """The formatter's cached encoder and per-second timestamp write the bytes the plain
    ``json.dumps`` and ``strftime`` did."""
    import time as time_module

    formatter = JsonFormatter()
    for created in (1_900_000_000.0, 1_900_000_000.999, 1_900_000_001.5, 1_900_000_000.25):
        record = logging.LogRecord("app.saga", logging.INFO, __file__, 1,
                                   "caf\u00e9 %s", ("\u2603",), None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        record.transferId = "t-1"  # type: ignore[attr-defined]
        line = formatter.format(record)
        expected = json.dumps({
            "ts": time_module.strftime("%Y-%m-%dT%H:%M:%S", time_module.gmtime(created))
            + f".{int(record.msecs):03d}Z",
            "level": "INFO", "logger": "app.saga", "message": "caf\u00e9 \u2603",
            "transferId": "t-1"}, ensure_ascii=False, default=str)
        assert line == expected


@pytest.fixture
def logging_globals() -> Iterator[None]:
    """What ``install`` changes in ``logging`` itself, put back after the test."""
    kept = (logging._srcfile, logging.logThreads, logging.logMultiprocessing)
    yield
    logging._srcfile, logging.logThreads, logging.logMultiprocessing = kept


def test_records_are_lean_and_lines_unchanged(logging_globals: None) -> None:
    """After ``install`` no record looks up its thread's or process's name; the service's
    lines, text and JSON, say the same as before."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(log_format.TEXT_FORMAT))
    named = logging.getLogger(f"test.lean.{uuid.uuid4().hex}")
    named.addHandler(handler)
    named.propagate = False
    try:
        log_format.install("text")
        assert not logging.logThreads and not logging.logMultiprocessing
        named.warning("transfer %s: %s", "t-1", "CREDITING -> COMPLETED",
                      extra={"transferId": "t-1"})
        assert stream.getvalue().endswith(
            f"WARNING {named.name}: transfer t-1: CREDITING -> COMPLETED\n")
        record = named.makeRecord(named.name, logging.INFO, "f", 1, "m", (), None)
        assert record.threadName is None and record.processName is None
        handler.setFormatter(log_format.JsonFormatter())
        named.warning("again %s", "t-2", extra={"transferId": "t-2"})
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert line["message"] == "again t-2" and line["transferId"] == "t-2"
        assert line["level"] == "WARNING" and line["logger"] == named.name
    finally:
        named.removeHandler(handler)


def test_stack_info_still_prints_the_stack(logging_globals: None) -> None:
    """``stack_info=True`` needs the caller looked up: after ``install`` a line asking for
    it still carries the stack, in text and in JSON, and names its caller."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    named = logging.getLogger(f"test.stack.{uuid.uuid4().hex}")
    named.addHandler(handler)
    named.propagate = False
    try:
        log_format.install("text")
        handler.setFormatter(logging.Formatter(log_format.TEXT_FORMAT))
        named.warning("where am I", stack_info=True)
        text = stream.getvalue()
        assert "Stack (most recent call last)" in text
        assert "test_stack_info_still_prints_the_stack" in text
        handler.setFormatter(log_format.JsonFormatter())
        named.warning("and here", stack_info=True)
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert "test_stack_info_still_prints_the_stack" in line["stack"]
    finally:
        named.removeHandler(handler)
