"""No secret in any log line at any level: the redaction filter (app/log_redaction.py) on
its own, then the whole system at DEBUG (Faust logs every value it sends there) running a
transfer with an OTP and an HTTP query, every line of every process's log searched for the
PIN, the OTP and both tokens."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from system import PIN, System, free_port

from app import log_redaction
from app.log_redaction import REDACTED, RedactSecrets, redact
from app.settings import Settings
from reference.user_center import issue_access_token

TOKEN = issue_access_token(Settings(), "alice")


# --------------------------------------------------------------------------------------
# the filter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    json.dumps({"pin": "97531864", "transferToken": TOKEN, "otp": "482913"}),
    json.dumps({"payload": json.dumps({"pin": "97531864", "otp": "482913"})}),  # nested
    "b'" + json.dumps({"accessToken": TOKEN, "otp": "482913"}) + "'",  # a bytes repr
    str({"pin": "97531864", "access_token": TOKEN, "otp": "482913"}),  # a dict repr
    f"pin=97531864 otp=482913 transfer_token={TOKEN} done",
    f"Authorization: Bearer {TOKEN} | PIN: 97531864 | OTP = 482913",
    f"verifying {TOKEN} for alice",  # a JWT anywhere
])
def test_secrets_are_redacted_in_every_form(text: str) -> None:
    out = redact(text)
    for secret in ("97531864", "482913", TOKEN, TOKEN.rsplit(".", 1)[1]):
        assert secret not in out, out
    assert REDACTED in out
    assert redact(out) == out  # idempotent: several handlers may filter one record


def test_what_is_not_secret_stays() -> None:
    text = ("pin_max_attempts=5 otp_ttl_seconds=300 code=PIN_LOCKED spinning "
            "transferId=0f5e8a7c-6f6e-4b8e-9a57-3c1d2b4a5e6f kafka 127.0.0.1:19092 "
            "faust.transport.consumer offset=482913 OTP_REQUIRED")
    assert redact(text) == text


def test_the_filter_redacts_arguments_exceptions_and_stacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    second = logging.StreamHandler(io.StringIO())  # a second handler sees the same record
    second.addFilter(RedactSecrets())
    logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(second)
    logger.addHandler(handler)
    logger.debug("sent %r to %s", {"otp": "482913"}, "alice")
    logger.debug("confirm %(payload)s", {"payload": '{"pin":"97531864"}'})
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        logger.exception("failed with pin=%s", "97531864")
    logger.info("stack", stack_info=True, extra={"x": 1})
    out = stream.getvalue()
    assert "482913" not in out and "97531864" not in out and TOKEN not in out, out
    assert "sent {'otp': '<redacted>'} to alice" in out
    assert "ValueError: bad token <redacted>" in out  # the traceback text itself
    assert "Logging error" not in out


def test_install_puts_the_filter_on_every_handler() -> None:
    named = logging.getLogger(f"test.install.{uuid.uuid4().hex}")
    handler = logging.StreamHandler(io.StringIO())
    named.addHandler(handler)
    try:
        log_redaction.install()
        log_redaction.install()  # idempotent
        assert [type(f) for f in handler.filters] == [RedactSecrets]
        assert all(any(isinstance(f, RedactSecrets) for f in h.filters)
                   for h in logging.root.handlers)
    finally:
        named.removeHandler(handler)


# --------------------------------------------------------------------------------------
# the system at DEBUG
# --------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(kafka_bootstrap: str, database_url: str, isolation_id: str,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    sys_ = System.build(kafka_bootstrap, database_url, isolation_id,
                        tmp_path_factory.mktemp("debug-logs"), log_level="DEBUG",
                        web_enabled=True, web_port=free_port())
    await sys_.start()
    try:
        yield sys_
    finally:
        await sys_.close()


def _lines(system: System) -> Iterator[tuple[str, int, str]]:
    for path in sorted(system.logdir.glob("*.log")):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            yield path.name, number, line


@pytest.mark.integration
async def test_no_secret_in_any_log_line_at_debug(system: System) -> None:
    payer, payee = "p" + uuid.uuid4().hex[:8], "q" + uuid.uuid4().hex[:8]
    await system.add_user(payer, balance=100_000, threshold=1_000)  # OTP above 10.00
    await system.add_user(payee, balance=0)
    access_token = system.token(payer)
    init = await system.init(payer, f"acc-{payee}", 5_000, token=access_token)
    assert init["status"] == "ok", init
    transfer_token = init["data"]["transferToken"]
    idem = str(uuid.uuid4())
    confirm = await system.confirm(payer, transfer_token, idem=idem, token=access_token)
    assert confirm["code"] == "OTP_REQUIRED", confirm
    transfer_id = confirm["data"]["transferId"]
    otp = await system.otp_for(transfer_id)
    done = await system.call("verifyOtp", payer, {"otp": otp}, idem=idem, token=access_token)
    assert (done["status"], done["data"]["state"]) == ("ok", "COMPLETED"), done
    status, body, _ = await system.http_get(system.settings.web_port,
                                            f"/transactions/{transfer_id}", access_token)
    assert (status, body["state"]) == (200, "COMPLETED"), body
    for name in list(system.processes):  # stopped: every line is in the files
        await system.stop_process(name)

    found = []
    patterns = {
        "PIN": re.compile(rf"(?<![0-9]){PIN}(?![0-9])"),
        "OTP": re.compile(rf"(?<![0-9]){otp}(?![0-9])"),
        "access token": re.compile(re.escape(access_token)),
        "access token signature": re.compile(re.escape(access_token.rsplit(".", 1)[1])),
        "transfer token": re.compile(re.escape(transfer_token)),
        "transfer token signature": re.compile(re.escape(transfer_token.rsplit(".", 1)[1])),
    }
    for file, number, line in _lines(system):
        found += [f"{what} in {file}:{number}: {line[:300]}"
                  for what, pattern in patterns.items() if pattern.search(line)]
    assert not found, "\n".join(found[:20])

    # The scan means something: every process logged at DEBUG, the worker logged the
    # records it sent for this very transfer (events/producing.py), and redacted their
    # secrets.
    logs = {p.stem: p.read_text(errors="replace") for p in system.logdir.glob("*.log")}
    assert set(logs) >= {"worker", "account-center", "funding-provider"}
    for name, text in logs.items():
        assert re.search(r"\bDEBUG\b", text), f"{name} did not log at DEBUG"
    assert transfer_id in logs["worker"]
    assert REDACTED in logs["worker"]


@pytest.mark.integration
async def test_database_errors_never_show_bound_values(database_url: str) -> None:
    """Every engine hides its parameters: an error's text (logged or raised) names the
    statement, not the values bound to it. (A value the driver itself refuses before
    sending, e.g. text for an integer, is quoted by asyncpg's own message: not covered.)"""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from app.adapters.db import make_engine

    engine = make_engine(database_url, "public", pool_size=1)
    try:
        assert engine.sync_engine.hide_parameters is True
        with pytest.raises(DBAPIError) as info:
            async with engine.connect() as conn:
                # Fails on the server (division by zero), after binding the value.
                await conn.execute(text("SELECT length(CAST(:pin AS text)) / 0"),
                                   {"pin": "97531864"})
        assert "97531864" not in str(info.value)
        assert "SQL parameters hidden" in str(info.value)
    finally:
        await engine.dispose()
