"""The queries over HTTP, on the worker's web server (faust.web, aiohttp driver).

    GET /accounts/{accountId}/balance
    GET /accounts/{accountId}/transactions?cursor=&limit=&from=&to=
    GET /transactions/{transferId}

``Authorization: Bearer <access token>``, verified exactly as on Kafka (AccessTokenVerifier;
the token's ``sub`` is the operator, who must be an active user of the directory). The
answers are those of ``business.queries`` (QueryService), as JSON: the ``data`` of an ok
reply with status 200, else ``{code, message}`` with 400 INVALID_REQUEST, 401
UNAUTHENTICATED, 403 FORBIDDEN or 500 INTERNAL.

Every worker answers every request itself, where it arrives: it authenticates it (the
token, then the directory), authorizes it (the operator's own account; a transfer's
details only to its payer or payee) and answers from the query tables, all PostgreSQL's,
shared by every worker and read with no cache. The saga engine commits an account's
movements and a transfer's details with the saga, before it sends the transfer's final
reply: read your writes, whichever worker answers. Nothing is forwarded between workers,
and no header but ``Authorization`` says who the caller is: the ``X-Bizcenter-Forwarded-*``
headers of earlier versions are ignored (a request carrying them is authenticated by its
bearer token like any other, and refused without one).

``X-Bizcenter-Served-By`` names the worker that answered by an opaque tag, random per
process (:func:`new_served_by_tag`), never by its address; the worker logs its tag with its
URL at start, for operators.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import jwt
from faust import web
from pydantic import ValidationError

from app.domain.ports import UserRecord, UserStatus
from app.query_service import Answer
from app.record_failures import validation_reason
from app.tokens import MAX_TOKEN_LENGTH, TokenError
from schemas.wire import CommandType, ErrorCode, QueryRequest, QueryTransactionHistoryPayload

log = logging.getLogger(__name__)

#: An opaque tag of the worker that answered (operators and tests), not its URL.
SERVED_BY_HEADER = "X-Bizcenter-Served-By"
STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL: 500,
}


class HttpError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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


def new_served_by_tag() -> str:
    """A worker's public name: ``w-`` and 12 random hex digits, drawn once per process.
    Says nothing about where the worker is."""
    return f"w-{secrets.token_hex(6)}"


class QueryViews:
    """What the three views share: authentication, the answer as JSON."""

    def __init__(self, app: Any, runtime: Any) -> None:
        self.app = app
        self.runtime = runtime
        self.served_by = new_served_by_tag()
        self._served_by = {SERVED_BY_HEADER: self.served_by}
        log.info("HTTP answers of this worker (%s) are tagged %s: %s",
                 getattr(getattr(app, "conf", None), "canonical_url", "?"),
                 SERVED_BY_HEADER, self.served_by)

    async def serve(self, view: web.View, request: web.Request,
                    query: Callable[[UserRecord], QueryRequest]) -> web.Response:
        """Authenticate (the bearer token alone), then answer here, from PostgreSQL."""
        try:
            user = await self._authenticate(request)
            answer: Answer = await self.runtime.service.answer(query(user))
        except HttpError as err:
            return self._error(view, err.status, err.code, err.message)
        except Exception:
            log.exception("HTTP query %s failed", request.url.path)
            return self._error(view, 500, ErrorCode.INTERNAL, "internal error; retry")
        if answer.ok:
            return view.json(answer.data, headers=self._served_by)
        assert answer.code is not None
        return self._error(view, STATUS.get(answer.code, 500), answer.code,
                           answer.message or "")

    def _error(self, view: web.View, status: int, code: ErrorCode, message: str
               ) -> web.Response:
        return view.json({"code": code.value, "message": message}, status=status,
                         headers=self._served_by)

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
        return await self._active_user(subject)

    async def _active_user(self, user_id: str) -> UserRecord:
        user: UserRecord | None = await self.runtime.store.get_user(user_id)
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
        raise HttpError(400, ErrorCode.INVALID_REQUEST, validation_reason(exc)) from None


def register_views(app: Any, runtime: Any) -> None:
    """Add the three views to the worker's web server."""
    views = QueryViews(app, runtime)

    @app.page("/accounts/{account_id}/balance", name="account-balance")
    class AccountBalance(web.View):
        async def get(self, request: web.Request, account_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                _own_account(account_id, user)
                return _query(user, CommandType.QUERY_BALANCE, {})

            return await views.serve(self, request, query)

    @app.page("/accounts/{account_id}/transactions", name="account-transactions")
    class AccountTransactions(web.View):
        async def get(self, request: web.Request, account_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                _own_account(account_id, user)
                return _query(user, CommandType.QUERY_TRANSACTION_HISTORY,
                              _history_params(request.query))

            return await views.serve(self, request, query)

    @app.page("/transactions/{transfer_id}", name="transaction-details")
    class TransactionDetails(web.View):
        async def get(self, request: web.Request, transfer_id: str) -> web.Response:
            def query(user: UserRecord) -> QueryRequest:
                if not 0 < len(transfer_id) <= 128:
                    raise HttpError(400, ErrorCode.INVALID_REQUEST, "transferId: 1 to 128 "
                                    "characters")
                return _query(user, CommandType.QUERY_TRANSACTION_DETAILS,
                              {"transferId": transfer_id})

            return await views.serve(self, request, query)
