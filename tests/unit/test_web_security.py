"""The HTTP views' own rules, without a broker (agents/web.py): a transfer's details are
authorized on what the table holds before anything waits, and a waiting query does not
hold up the others; the forward signature binds the group, the request, the operator and
the time. The same views between two real workers: tests/integration/test_queries_e2e.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
from conftest import wait_for
from pydantic import SecretStr

from agents.web import QueryViews, _query, forward_headers, forward_signature, served_by_tag
from app.domain.ports import UserRecord, UserStatus
from app.query_service import Answer, DictKeyValue, QueryService
from schemas.wire import CommandType, ErrorCode, QueryRequest

SECRET = "forward-secret-for-tests-" + "f" * 40


def _user(user_id: str) -> UserRecord:
    return UserRecord(user_id=user_id, account_id=f"acc-{user_id}", currency="USD",
                      phone="+15550000000", pin_verifier="00", otp_threshold_minor=0,
                      daily_limit_minor=0, status=UserStatus.ACTIVE)


class Runtime:
    """QueryRuntime's surface as the views use it. ``answer`` waits, as the real one does,
    only for details of a transfer not known as final; here until ``caught_up`` is set."""

    def __init__(self) -> None:
        self.transfers = DictKeyValue()
        self.service = QueryService(DictKeyValue(), DictKeyValue(), self.transfers)
        self.settings = SimpleNamespace(web_forward_secret=SecretStr(SECRET), app_id="group")
        self.caught_up = asyncio.Event()
        self.waited: list[str] = []

    def store(self, transfer_id: str, payer: str, payee: str, state: str) -> None:
        self.transfers.put(transfer_id, orjson.dumps({
            "transferId": transfer_id, "fromAccountId": f"acc-{payer}",
            "toAccountId": f"acc-{payee}", "amountMinor": 100, "currency": "USD",
            "state": state, "createdAt": "2030-01-01T00:00:00Z",
            "updatedAt": "2030-01-01T00:00:00Z", "seq": 1}))

    async def answer(self, request: QueryRequest) -> Answer:
        transfer_id = str(request.params.get("transferId", ""))
        if (request.type == CommandType.QUERY_TRANSACTION_DETAILS.value
                and not self.service.transfer_settled(transfer_id)):
            self.waited.append(transfer_id)
            await self.caught_up.wait()
        return self.service.answer(request)


def _views(runtime: Runtime) -> QueryViews:
    app = SimpleNamespace(conf=SimpleNamespace(canonical_url="http://10.0.0.7:6066"))
    return QueryViews(app, runtime)


def _details(user: str, transfer_id: str) -> QueryRequest:
    return _query(_user(user), CommandType.QUERY_TRANSACTION_DETAILS,
                  {"transferId": transfer_id})


async def test_someone_elses_transfer_is_refused_before_any_wait() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.store("t-open", "alice", "bob", "AWAITING_OTP")
    runtime.store("t-done", "alice", "bob", "COMPLETED")
    for transfer_id in ("t-open", "t-done"):
        answer = await asyncio.wait_for(views._answer(_details("mallory", transfer_id)), 1)
        assert (answer.ok, answer.code) == (False, ErrorCode.FORBIDDEN)
    assert runtime.waited == []
    # The same answer as for an id that does not exist (which may wait: it could be one
    # of the caller's own, still on its way).
    runtime.caught_up.set()
    unknown = await views._answer(_details("mallory", "t-missing"))
    assert (unknown.code, unknown.message) == (answer.code, answer.message)
    assert runtime.waited == ["t-missing"]


async def test_the_parties_still_read_their_writes() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.store("t-open", "alice", "bob", "DEBITING")
    waiting = asyncio.create_task(views._answer(_details("bob", "t-open")))
    await wait_for(lambda: runtime.waited == ["t-open"], timeout=2, what="the wait")
    assert not waiting.done()
    runtime.store("t-open", "alice", "bob", "COMPLETED")
    runtime.caught_up.set()
    answer = await asyncio.wait_for(waiting, 1)
    assert answer.ok and answer.data is not None and answer.data["state"] == "COMPLETED"


async def test_a_waiting_details_query_holds_up_no_other_query() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.store("t-other", "alice", "bob", "COMPLETED")
    waiting = asyncio.create_task(views._answer(_details("carol", "t-not-yet")))
    others: list[Any] = [
        _query(_user("carol"), CommandType.QUERY_BALANCE, {}),
        _details("alice", "t-other"),
        _details("mallory", "t-other"),
    ]
    answers = await asyncio.wait_for(asyncio.gather(*(views._answer(q) for q in others)), 1)
    assert [a.ok for a in answers] == [True, True, False]
    assert not waiting.done()
    runtime.caught_up.set()
    assert (await waiting).code == ErrorCode.FORBIDDEN


def test_the_forward_signature_covers_group_request_operator_and_time() -> None:
    headers = forward_headers(SECRET, "group", "GET", "/accounts/acc-a/balance?x=1", "a",
                              1_900_000_000.7)
    operator, at, signature = headers.values()
    base = ("group", "GET", "/accounts/acc-a/balance?x=1", operator, at)
    assert forward_signature(SECRET, *base) == signature
    variants = [("other-group", *base[1:]), (base[0], "POST", *base[2:]),
                (*base[:2], "/accounts/acc-a/balance?x=2", *base[3:]),
                (*base[:3], "Yg==", base[4]), (*base[:4], "1900000001")]
    for variant in variants:
        assert forward_signature(SECRET, *variant) != signature, variant
    assert forward_signature("another-secret-" + "x" * 40, *base) != signature
    assert at == "1900000000"


def test_the_served_by_tag_reveals_no_address() -> None:
    tag = served_by_tag(SECRET, "http://10.0.0.7:6066")
    assert tag.startswith("w-") and len(tag) == 14
    assert "10.0.0.7" not in tag and "6066" not in tag
    assert tag != served_by_tag(SECRET, "http://10.0.0.8:6066")
    assert tag == served_by_tag(SECRET, "http://10.0.0.7:6066")  # stable per worker
