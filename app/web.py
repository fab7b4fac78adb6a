"""The queries over HTTP, on the worker's web server (faust.web, aiohttp driver).

    GET /accounts/{accountId}/balance
    GET /accounts/{accountId}/transactions?cursor=&limit=&from=&to=
    GET /transactions/{transferId}

``Authorization: Bearer <access token>``, verified exactly as on Kafka (AccessTokenVerifier;
the token's ``sub`` is the operator, who must be an active user of the directory). The
answers are those of ``business.queries`` (QueryService), as JSON: the ``data`` of an ok
reply with status 200, else ``{code, message}`` with 400 INVALID_REQUEST, 401
UNAUTHENTICATED, 403 FORBIDDEN, 500 INTERNAL, or 503 INTERNAL while the partitions are
being reassigned (retry).

Any worker answers for any key: a request for a key another worker owns is forwarded once
to that worker (its canonical URL, from the assignment the consumer group agreed on), which
authenticates, authorizes and answers from its tables. A forwarded request carries the
header ``X-Bizcenter-Routed``; a worker that receives one for a key it does not own answers
503 rather than forwarding again (no loops while two workers disagree during a rebalance).

Faust's own ``/table``, ``/router``, statistics and graph pages are not served (app
configuration in app/faust_app.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from faust import web
from pydantic import ValidationError
from yarl import URL

from app.domain.ports import UserRecord, UserStatus
from app.query_service import Answer
from app.tokens import MAX_TOKEN_LENGTH, TokenError
from schemas.wire import CommandType, ErrorCode, QueryRequest, QueryTransactionHistoryPayload

log = logging.getLogger(__name__)

ROUTED_HEADER = "X-Bizcenter-Routed"
#: The canonical URL of the worker whose tables answered (operators and tests).
SERVED_BY_HEADER = "X-Bizcenter-Served-By"
STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL: 500,
}
FORWARD_TIMEOUT_SECONDS = 10.0


class HttpError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _unavailable(message: str) -> HttpError:
    return HttpError(503, ErrorCode.INTERNAL, message)


def _claimed_subject(token: str) -> str | None:
    """The ``sub`` the token claims, read without trusting it: only to name the operator
    whom the full verification then checks the token against."""
    if not 0 < len(token) <= MAX_TOKEN_LENGTH:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except Exception:
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) and subject else None


def _ident(url: str) -> tuple[str, int]:
    parsed = URL(url)
    return parsed.host or "", int(parsed.port or 80)


class QueryViews:
    """What the three views share: forwarding, authentication, the answer as JSON."""

    def __init__(self, app: Any, runtime: Any) -> None:
        self.app = app
        self.runtime = runtime

    async def serve(self, view: web.View, request: web.Request, table: str, key: str,
                    query: Callable[[UserRecord], QueryRequest]) -> web.Response:
        try:
            forwarded = await self._forward_if_elsewhere(view, request, table, key)
            if forwarded is not None:
                return forwarded
            if getattr(self.app, "in_recovery", False):
                raise _unavailable("the tables are being recovered; retry")
            user = await self._authenticate(request)
            answer: Answer = await self.runtime.answer(query(user))
        except HttpError as err:
            return self._error(view, err.status, err.code, err.message)
        except Exception:
            log.exception("HTTP query %s failed", request.url.path)
            return self._error(view, 500, ErrorCode.INTERNAL, "internal error; retry")
        if answer.ok:
            return view.json(answer.data, headers=self._served_by())
        assert answer.code is not None
        return self._error(view, STATUS.get(answer.code, 500), answer.code,
                           answer.message or "")

    def _served_by(self) -> dict[str, str]:
        return {SERVED_BY_HEADER: str(self.app.conf.canonical_url)}

    def _error(self, view: web.View, status: int, code: ErrorCode, message: str
               ) -> web.Response:
        return view.json({"code": code.value, "message": message}, status=status,
                         headers=self._served_by())

    async def _forward_if_elsewhere(self, view: web.View, request: web.Request, table: str,
                                    key: str) -> web.Response | None:
        owner = self.runtime.owner_url(table, key.encode())
        if owner is None:
            raise _unavailable("the partitions are being reassigned; retry")
        if _ident(owner) == _ident(str(self.app.conf.canonical_url)):
            return None
        if request.headers.get(ROUTED_HEADER):
            raise _unavailable("the partitions are being reassigned; retry")
        headers = {ROUTED_HEADER: "1"}
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            headers["Authorization"] = authorization
        url = URL(owner.rstrip("/") + str(request.rel_url), encoded=True)
        try:
            async with self.app.http_client.get(
                url, headers=headers,
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS),
            ) as response:
                body = await response.read()
                served_by = response.headers.get(SERVED_BY_HEADER, owner)
                return view.bytes(body, content_type="application/json",
                                  status=response.status,
                                  headers={SERVED_BY_HEADER: served_by})
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot forward %s to %s: %s", request.url.path, owner, exc)
            raise _unavailable("the worker owning this key does not answer; retry") from None

    async def _authenticate(self, request: web.Request) -> UserRecord:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, ErrorCode.UNAUTHENTICATED, "a bearer access token is required")
        subject = _claimed_subject(token)
        if subject is None:
            raise HttpError(401, ErrorCode.UNAUTHENTICATED, "invalid access token")
        try:
            self.runtime.access.verify(token, subject, datetime.fromtimestamp(time.time(), UTC))
        except TokenError as err:
            raise HttpError(STATUS.get(err.code, 401), err.code, err.message) from None
        user: UserRecord | None = await self.runtime.store.get_user(subject)
        if user is None or user.status is not UserStatus.ACTIVE:
            raise HttpError(403, ErrorCode.FORBIDDEN, "the user is unknown or blocked")
        return user


def _query(user: UserRecord, type_: CommandType, params: dict[str, Any]) -> QueryRequest:
    return QueryRequest(
        request_id=f"http-{uuid.uuid4()}", operator_id=user.user_id,
        account_id=user.account_id, currency=user.currency, type=type_.value, params=params,
    )


def _own_account(account_id: str, user: UserRecord) -> None:
    if account_id != user.account_id:
        raise HttpError(403, ErrorCode.FORBIDDEN, "not your account")


def _history_params(query: Any) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("cursor", "from", "to"):
        value = query.get(name)
        if value:
            params[name] = value
    limit = query.get("limit")
    if limit:
        try:
            params["limit"] = int(limit)
        except ValueError:
            raise HttpError(400, ErrorCode.INVALID_REQUEST, "limit: not an integer") from None
    try:
        return QueryTransactionHistoryPayload.model_validate(params).to_wire()
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:5])
        raise HttpError(400, ErrorCode.INVALID_REQUEST, reasons) from None


def register_views(app: Any, runtime: Any) -> None:
    """Add the three views to the worker's web server."""
    views = QueryViews(app, runtime)

    @app.page("/accounts/{account_id}/balance", name="account-balance")
    class AccountBalance(web.View):
        async def get(self, request: web.Request, account_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                _own_account(account_id, user)
                return _query(user, CommandType.QUERY_BALANCE, {})

            return await views.serve(self, request, "balances", account_id, query)

    @app.page("/accounts/{account_id}/transactions", name="account-transactions")
    class AccountTransactions(web.View):
        async def get(self, request: web.Request, account_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                _own_account(account_id, user)
                return _query(user, CommandType.QUERY_TRANSACTION_HISTORY,
                              _history_params(request.query))

            # Routed by account: every account table lives in the account's partition.
            return await views.serve(self, request, "balances", account_id, query)

    @app.page("/transactions/{transfer_id}", name="transaction-details")
    class TransactionDetails(web.View):
        async def get(self, request: web.Request, transfer_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                if not 0 < len(transfer_id) <= 128:
                    raise HttpError(400, ErrorCode.INVALID_REQUEST, "transferId: 1 to 128 "
                                    "characters")
                return _query(user, CommandType.QUERY_TRANSACTION_DETAILS,
                              {"transferId": transfer_id})

            return await views.serve(self, request, "transfers", transfer_id, query)
