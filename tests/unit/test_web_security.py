"""The HTTP views' own rules, without a broker (agents/web.py): a transfer's details are
authorized on what the table holds before anything waits, and a waiting query does not
hold up the others; a balance or history request is authenticated, then answered where it
arrives (PostgreSQL: no owner, no forwarding), while details still go to their owner; the
forward signature binds the group, the request, the operator and the time, and is checked
on every view. The same views between two real workers: tests/integration/test_queries_e2e.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import jwt
import orjson
from conftest import wait_for
from pydantic import SecretStr

from agents.web import (
    FORWARD_SIGNATURE_HEADER,
    QueryViews,
    _own_account,
    _query,
    forward_headers,
    forward_signature,
    served_by_tag,
)
from app.domain.ports import UserRecord, UserStatus
from app.query_service import Answer, DictKeyValue, KeyValueReads, QueryService
from app.tokens import TokenError
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
        self.balances = DictKeyValue()
        self.transfers = DictKeyValue()
        self.service = QueryService(KeyValueReads(self.balances), KeyValueReads(DictKeyValue()),
                                    KeyValueReads(self.transfers))
        self.settings = SimpleNamespace(web_forward_secret=SecretStr(SECRET), app_id="group")
        self.caught_up = asyncio.Event()
        self.waited: list[str] = []
        #: The (table, key) of every owner looked up; the owner: None (rebalancing).
        self.owners_asked: list[tuple[str, bytes]] = []
        self.access = SimpleNamespace(verify=self._verify)
        self.store = SimpleNamespace(get_user=self._get_user)

    def _verify(self, token: str, operator_id: str, now: Any) -> None:
        if jwt.decode(token, "token-key-" + "k" * 32, algorithms=["HS256"])["sub"] != operator_id:
            raise TokenError(ErrorCode.UNAUTHENTICATED, "invalid access token")

    async def _get_user(self, user_id: str) -> UserRecord:
        return _user(user_id)

    def owner_url(self, table: str, key: bytes) -> str | None:
        self.owners_asked.append((table, key))
        return None

    def put_transfer(self, transfer_id: str, payer: str, payee: str, state: str) -> None:
        self.transfers.put(transfer_id, orjson.dumps({
            "transferId": transfer_id, "fromAccountId": f"acc-{payer}",
            "toAccountId": f"acc-{payee}", "amountMinor": 100, "currency": "USD",
            "state": state, "createdAt": "2030-01-01T00:00:00Z",
            "updatedAt": "2030-01-01T00:00:00Z", "seq": 1}))

    async def answer(self, request: QueryRequest) -> Answer:
        transfer_id = str(request.params.get("transferId", ""))
        if (request.type == CommandType.QUERY_TRANSACTION_DETAILS.value
                and not await self.service.transfer_settled(transfer_id)):
            self.waited.append(transfer_id)
            await self.caught_up.wait()
        return await self.service.answer(request)


def _views(runtime: Runtime) -> QueryViews:
    app = SimpleNamespace(conf=SimpleNamespace(canonical_url="http://10.0.0.7:6066"),
                          in_recovery=True)  # the Faust tables: only details care
    return QueryViews(app, runtime)


class View:
    """faust.web.View's ``json`` as the views use it: (status, body)."""

    def json(self, data: Any, *, status: int = 200, headers: Any = None) -> tuple[int, Any]:
        return status, data


def _request(path: str, headers: dict[str, str]) -> Any:
    return SimpleNamespace(headers=headers, method="GET", rel_url=path,
                           url=SimpleNamespace(path=path.partition("?")[0]))


def _bearer(user: str) -> dict[str, str]:
    token = jwt.encode({"sub": user}, "token-key-" + "k" * 32, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def _serve(views: QueryViews, path: str, headers: dict[str, str], type_: CommandType,
                 params: dict[str, Any], owned: tuple[str, str] | None = None) -> Any:
    """As the views of register_views: an account's own owner only."""
    def query(user: UserRecord) -> QueryRequest:
        if path.startswith("/accounts/"):
            _own_account(path.split("/")[2], user)
        return _query(user, type_, params)

    result: Any = await views.serve(View(), _request(path, headers),  # type: ignore[arg-type]
                                    query, owned=owned)
    return result


def _details(user: str, transfer_id: str) -> QueryRequest:
    return _query(_user(user), CommandType.QUERY_TRANSACTION_DETAILS,
                  {"transferId": transfer_id})


async def test_someone_elses_transfer_is_refused_before_any_wait() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.put_transfer("t-open", "alice", "bob", "AWAITING_OTP")
    runtime.put_transfer("t-done", "alice", "bob", "COMPLETED")
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
    runtime.put_transfer("t-open", "alice", "bob", "DEBITING")
    waiting = asyncio.create_task(views._answer(_details("bob", "t-open")))
    await wait_for(lambda: runtime.waited == ["t-open"], timeout=2, what="the wait")
    assert not waiting.done()
    runtime.put_transfer("t-open", "alice", "bob", "COMPLETED")
    runtime.caught_up.set()
    answer = await asyncio.wait_for(waiting, 1)
    assert answer.ok and answer.data is not None and answer.data["state"] == "COMPLETED"


async def test_a_waiting_details_query_holds_up_no_other_query() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.put_transfer("t-other", "alice", "bob", "COMPLETED")
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


async def test_balance_and_history_are_answered_where_they_arrive() -> None:
    """The account tables are PostgreSQL's: no owner looked up, nothing forwarded, no wait
    for the Faust tables' recovery; the details of a transfer still go to its owner (here
    unknown: 503)."""
    runtime = Runtime()
    views = _views(runtime)
    runtime.balances.put("acc-alice", orjson.dumps({
        "balanceMinor": 700, "asOf": "2030-01-01T00:00:00Z", "commandId": "c", "seq": 1}))
    balance = await _serve(views, "/accounts/acc-alice/balance", _bearer("alice"),
                           CommandType.QUERY_BALANCE, {})
    history = await _serve(views, "/accounts/acc-alice/transactions", _bearer("alice"),
                           CommandType.QUERY_TRANSACTION_HISTORY, {"limit": 5})
    assert balance == (200, {"accountId": "acc-alice", "currency": "USD",
                             "balanceMinor": 700, "asOf": "2030-01-01T00:00:00Z"})
    assert history == (200, {"items": []})
    assert runtime.owners_asked == []
    details = await _serve(views, "/transactions/t-1", _bearer("alice"),
                           CommandType.QUERY_TRANSACTION_DETAILS, {"transferId": "t-1"},
                           owned=("transfers", "t-1"))
    assert details[0] == 503 and runtime.owners_asked == [("transfers", b"t-1")]


async def test_a_balance_request_is_authenticated_first() -> None:
    runtime = Runtime()
    views = _views(runtime)
    path = "/accounts/acc-alice/balance"
    basic = {"Authorization": _bearer("alice")["Authorization"].replace("Bearer", "Basic")}
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}, basic):
        status, body = await _serve(views, path, headers, CommandType.QUERY_BALANCE, {})
        assert (status, body["code"]) == (401, "UNAUTHENTICATED"), headers
    status, body = await _serve(views, path, _bearer("mallory"), CommandType.QUERY_BALANCE,
                                {})
    assert (status, body["code"]) == (403, "FORBIDDEN")  # someone else's account


async def test_forward_headers_on_a_balance_request_are_checked_all_the_same() -> None:
    """No worker forwards a balance, but a request carrying the forward headers is still
    believed only with the group's signature over it, made now; a signed one is answered
    here (the operator re-read from the directory), never sent on."""
    runtime = Runtime()
    views = _views(runtime)
    path = "/accounts/acc-alice/balance"
    good = forward_headers(SECRET, "group", "GET", path, "alice", time.time())
    forged = [
        {**good, FORWARD_SIGNATURE_HEADER: "0" * 64},
        forward_headers("another-secret-" + "x" * 40, "group", "GET", path, "alice",
                        time.time()),
        forward_headers(SECRET, "group", "GET", "/accounts/acc-bob/balance", "alice",
                        time.time()),
        forward_headers(SECRET, "group", "GET", path, "alice", time.time() - 120),
        {**good, **_bearer("alice"), FORWARD_SIGNATURE_HEADER: ""},
    ]
    for headers in forged:
        status, body = await _serve(views, path, headers, CommandType.QUERY_BALANCE, {})
        assert (status, body["code"]) == (401, "UNAUTHENTICATED"), headers
    status, body = await _serve(views, path, good, CommandType.QUERY_BALANCE, {})
    assert (status, body["balanceMinor"]) == (200, 0)
    assert runtime.owners_asked == []
