"""The HTTP views' own rules, without a broker (agents/web.py): every request is
authenticated by its bearer token alone, then answered where it arrives (every query
table is PostgreSQL's: no owner, no forwarding); the forward headers of earlier versions
are believed in no way, even correctly signed; the served-by tag names the worker without
its address. The same views between two real workers: tests/integration/test_queries_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from types import SimpleNamespace
from typing import Any

import jwt
import orjson

from agents.web import SERVED_BY_HEADER, QueryViews, _own_account, _query, new_served_by_tag
from app.domain.ports import UserRecord, UserStatus
from app.query_service import DictKeyValue, KeyValueReads, QueryService
from app.tokens import TokenError
from schemas.wire import CommandType, ErrorCode, QueryRequest

TOKEN_KEY = "token-key-" + "k" * 32
#: The secret and group under which earlier versions signed a forwarded request.
OLD_FORWARD_SECRET = "forward-secret-for-tests-" + "f" * 40
GROUP = "group"


def _user(user_id: str, status: UserStatus = UserStatus.ACTIVE) -> UserRecord:
    return UserRecord(user_id=user_id, account_id=f"acc-{user_id}", currency="USD",
                      phone="+15550000000", pin_verifier="00", otp_threshold_minor=0,
                      daily_limit_minor=0, status=status)


class Runtime:
    """QueryRuntime's surface as the views use it: the service over dict tables, the token
    verifier and the directory."""

    def __init__(self) -> None:
        self.balances = DictKeyValue()
        self.transfers = DictKeyValue()
        self.service = QueryService(KeyValueReads(self.balances), KeyValueReads(DictKeyValue()),
                                    KeyValueReads(self.transfers))
        self.access = SimpleNamespace(verify=self._verify)
        self.store = SimpleNamespace(get_user=self._get_user)
        self.blocked: set[str] = set()
        self.verified: list[str] = []  # the operators whose token was verified

    def _verify(self, token: str, operator_id: str, now: Any) -> None:
        try:
            subject = jwt.decode(token, TOKEN_KEY, algorithms=["HS256"])["sub"]
        except jwt.PyJWTError:
            raise TokenError(ErrorCode.UNAUTHENTICATED, "invalid access token") from None
        if subject != operator_id:
            raise TokenError(ErrorCode.UNAUTHENTICATED, "invalid access token")
        self.verified.append(operator_id)

    async def _get_user(self, user_id: str) -> UserRecord:
        return _user(user_id, UserStatus.BLOCKED if user_id in self.blocked
                     else UserStatus.ACTIVE)

    def put_balance(self, user: str, balance: int) -> None:
        self.balances.put(f"acc-{user}", orjson.dumps({
            "balanceMinor": balance, "asOf": "2030-01-01T00:00:00Z", "commandId": "c",
            "seq": 1}))

    def put_transfer(self, transfer_id: str, payer: str, payee: str, state: str) -> None:
        self.transfers.put(transfer_id, orjson.dumps({
            "transferId": transfer_id, "fromAccountId": f"acc-{payer}",
            "toAccountId": f"acc-{payee}", "amountMinor": 100, "currency": "USD",
            "state": state, "createdAt": "2030-01-01T00:00:00Z",
            "updatedAt": "2030-01-01T00:00:00Z", "seq": 1}))


def _views(runtime: Runtime) -> QueryViews:
    app = SimpleNamespace(conf=SimpleNamespace(canonical_url="http://10.0.0.7:6066"))
    return QueryViews(app, runtime)


class View:
    """faust.web.View's ``json`` as the views use it: (status, body, headers)."""

    def json(self, data: Any, *, status: int = 200, headers: Any = None
             ) -> tuple[int, Any, dict[str, str]]:
        return status, data, dict(headers or {})


def _request(path: str, headers: dict[str, str]) -> Any:
    return SimpleNamespace(headers=headers, method="GET", rel_url=path,
                           url=SimpleNamespace(path=path.partition("?")[0]))


def _token(user: str, key: str = TOKEN_KEY) -> str:
    return jwt.encode({"sub": user}, key, algorithm="HS256")


def _bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(user)}"}


def _old_forward_headers(path: str, operator: str) -> dict[str, str]:
    """The headers with which a worker of an earlier version vouched for an operator,
    correctly signed under its group's secret (bizcenter-forward-v1)."""
    operator_b64 = base64.urlsafe_b64encode(operator.encode()).decode()
    at = str(int(time.time()))
    message = "\n".join(("bizcenter-forward-v1", GROUP, "GET", path, operator_b64, at))
    return {
        "X-Bizcenter-Forwarded-Operator": operator_b64,
        "X-Bizcenter-Forwarded-At": at,
        "X-Bizcenter-Forward-Signature": hmac.new(
            OLD_FORWARD_SECRET.encode(), message.encode(), hashlib.sha256).hexdigest(),
    }


#: The three views: (path, query type, params), as register_views builds them.
VIEWS = {
    "balance": ("/accounts/acc-alice/balance", CommandType.QUERY_BALANCE, {}),
    "history": ("/accounts/acc-alice/transactions", CommandType.QUERY_TRANSACTION_HISTORY,
                {"limit": 5}),
    "details": ("/transactions/t-1", CommandType.QUERY_TRANSACTION_DETAILS,
                {"transferId": "t-1"}),
}


async def _serve(views: QueryViews, view: str, headers: dict[str, str]
                 ) -> tuple[int, Any, dict[str, str]]:
    """As the views of register_views: an account's own owner only."""
    path, type_, params = VIEWS[view]

    def query(user: UserRecord) -> QueryRequest:
        if path.startswith("/accounts/"):
            _own_account(path.split("/")[2], user)
        return _query(user, type_, params)

    result: Any = await views.serve(View(), _request(path, headers),  # type: ignore[arg-type]
                                    query)
    return result  # type: ignore[no-any-return]


async def test_every_view_is_answered_where_it_arrives() -> None:
    """Balance, history and details from the tables, by the worker the request reached
    (its tag on the answer); a transfer's details to its payer and payee only, someone
    else's exactly as an unknown one."""
    runtime = Runtime()
    views = _views(runtime)
    runtime.put_balance("alice", 700)
    runtime.put_transfer("t-1", "alice", "bob", "DEBITING")
    tag = {SERVED_BY_HEADER: views.served_by}
    assert await _serve(views, "balance", _bearer("alice")) == (200, {
        "accountId": "acc-alice", "currency": "USD", "balanceMinor": 700,
        "asOf": "2030-01-01T00:00:00Z"}, tag)
    assert await _serve(views, "history", _bearer("alice")) == (200, {"items": []}, tag)
    for party in ("alice", "bob"):
        status, body, headers = await _serve(views, "details", _bearer(party))
        assert (status, body["state"], headers) == (200, "DEBITING", tag), party
    others = await _serve(views, "details", _bearer("mallory"))
    runtime.transfers.rows.clear()
    unknown = await _serve(views, "details", _bearer("mallory"))
    assert others == unknown
    assert others[:2] == (403, {"code": "FORBIDDEN",
                                "message": "no such transfer among yours"})


async def test_every_view_authenticates_with_the_bearer_token_first() -> None:
    runtime = Runtime()
    views = _views(runtime)
    runtime.put_transfer("t-1", "alice", "bob", "COMPLETED")
    good = _token("alice")
    refused = {
        "no header": {},
        "not a jwt": {"Authorization": "Bearer not-a-jwt"},
        "empty bearer": {"Authorization": "Bearer "},
        "another scheme": {"Authorization": f"Basic {good}"},
        "signed with another key": {"Authorization": f"Bearer {_token('alice', 'x' * 42)}"},
        "over the length limit": {"Authorization": "Bearer " + "a" * 70_000},
    }
    for view in VIEWS:
        for what, headers in refused.items():
            status, body, out = await _serve(views, view, headers)
            assert (status, body["code"]) == (401, "UNAUTHENTICATED"), (view, what)
            assert set(body) == {"code", "message"}
            assert out == {SERVED_BY_HEADER: views.served_by}
        # A blocked operator, with a good token: refused after the directory lookup.
        runtime.blocked.add("alice")
        status, body, _ = await _serve(views, view, {"Authorization": f"Bearer {good}"})
        assert (status, body["code"]) == (403, "FORBIDDEN"), view
        runtime.blocked.clear()
        status, _, _ = await _serve(views, view, {"Authorization": f"Bearer {good}"})
        assert status == 200, view  # the control


async def test_forward_headers_are_believed_in_no_way() -> None:
    """No worker forwards any more: the headers with which an earlier version vouched for
    an operator are ignored, however correctly signed. Without a bearer token a request is
    refused; with one, it is the token's operator who is answered, never the header's."""
    runtime = Runtime()
    views = _views(runtime)
    runtime.put_balance("alice", 700)
    runtime.put_transfer("t-1", "alice", "bob", "COMPLETED")
    for view, (path, _type, _params) in VIEWS.items():
        signed = _old_forward_headers(path, "alice")
        status, body, _ = await _serve(views, view, signed)
        assert (status, body["code"]) == (401, "UNAUTHENTICATED"), view
        # Mallory's token with a header vouching for alice: answered as mallory.
        status, body, _ = await _serve(views, view, {**signed, **_bearer("mallory")})
        assert (status, body["code"]) == (403, "FORBIDDEN"), view
        # Alice's own token with a header vouching for mallory: answered as alice.
        status, _, _ = await _serve(views, view, {**_old_forward_headers(path, "mallory"),
                                                  **_bearer("alice")})
        assert status == 200, view
    assert set(runtime.verified) == {"mallory", "alice"}  # every answer: a verified token


def test_the_served_by_tag_reveals_no_address() -> None:
    runtime = Runtime()
    first, second = _views(runtime), _views(runtime)
    for tag in (first.served_by, second.served_by, new_served_by_tag()):
        assert tag.startswith("w-") and len(tag) == 14
        assert set(tag[2:]) <= set("0123456789abcdef")
        assert "10.0.0.7" not in tag and "6066" not in tag
    assert first.served_by != second.served_by  # one per worker process
