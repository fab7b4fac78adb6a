"""The queries over HTTP, on the worker's web server (faust.web, aiohttp driver).

    GET /accounts/{accountId}/balance
    GET /accounts/{accountId}/transactions?cursor=&limit=&from=&to=
    GET /transactions/{transferId}

``Authorization: Bearer <access token>``, verified exactly as on Kafka (AccessTokenVerifier;
the token's ``sub`` is the operator, who must be an active user of the directory). The
answers are those of ``business.queries`` (QueryService), as JSON: the ``data`` of an ok
reply with status 200, else ``{code, message}`` with 400 INVALID_REQUEST, 401
UNAUTHENTICATED, 403 FORBIDDEN, 500 INTERNAL, or 503 INTERNAL while the partitions of the
``transfers`` table are being reassigned or recovered (details only; retry).

Any worker answers for any key. Each request is authenticated first, where it arrives
(the token, then the directory): nothing unauthenticated is ever forwarded. A balance or a
history page is then answered right there: the account tables are PostgreSQL's, shared by
every worker, and the saga engine commits an account's movements before it sends the
transfer's final reply (read your writes, whichever worker answers). A transfer's details
come from the ``transfers`` Faust table, held by the worker owning the transfer's
partition: a details request for a transfer another worker of the same group owns (its
canonical URL, from the assignment the consumer group agreed on) is forwarded once to that
worker, **without** the bearer token: the forwarding worker vouches for the operator it
authenticated with ``X-Bizcenter-Forwarded-Operator``, ``X-Bizcenter-Forwarded-At`` and
``X-Bizcenter-Forward-Signature``, an HMAC-SHA256 under ``BIZ_WEB_FORWARD_SECRET`` (shared
by the workers) over the group (``BIZ_APP_ID``), the method, the path and query, the
operator and the time. The owner accepts a forwarded request only with a valid signature
no older than :data:`FORWARD_MAX_AGE_SECONDS` (compared in constant time), re-reads the
operator from the directory, authorizes and answers from its tables; a forged or stale one
is 401, on every view (a correctly signed balance or history request, which no worker of
this version sends, is answered where it arrives). A worker that receives a forwarded
details request for a transfer it does not own (ownership moving during a rebalance)
answers 503 rather than forwarding again (no loops).

``X-Bizcenter-Served-By`` names the worker that answered by an opaque tag (an HMAC of its
URL under the forward secret, :func:`served_by_tag`), never by its address.

A transfer's details are authorized before any wait: a transfer the table holds and the
operator is not party to is answered at once (as an unknown one); only a transfer missing
from the table or the operator's own unfinished one waits for the transfer events still on
their way (app.query_service, at most ``DETAILS_CATCH_UP_SECONDS``), in the request's own
task, so that no other query waits for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
from app.record_failures import validation_reason
from app.tokens import MAX_TOKEN_LENGTH, TokenError
from schemas.wire import CommandType, ErrorCode, QueryRequest, QueryTransactionHistoryPayload

log = logging.getLogger(__name__)

#: Headers of a forwarded request (see the module docstring).
FORWARDED_OPERATOR_HEADER = "X-Bizcenter-Forwarded-Operator"
FORWARDED_AT_HEADER = "X-Bizcenter-Forwarded-At"
FORWARD_SIGNATURE_HEADER = "X-Bizcenter-Forward-Signature"
_FORWARD_HEADERS = (FORWARDED_OPERATOR_HEADER, FORWARDED_AT_HEADER, FORWARD_SIGNATURE_HEADER)
#: An opaque tag of the worker whose tables answered (operators and tests), not its URL.
SERVED_BY_HEADER = "X-Bizcenter-Served-By"
STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL: 500,
}
FORWARD_TIMEOUT_SECONDS = 10.0
#: A forwarded request older (or newer) than this is refused: a replay window.
FORWARD_MAX_AGE_SECONDS = 30.0


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


def served_by_tag(secret: str, canonical_url: str) -> str:
    """The public name of a worker: 12 hex digits of an HMAC of its URL under the forward
    secret. Stable per worker, and says nothing about where the worker is."""
    digest = hmac.new(secret.encode(), b"served-by\n" + canonical_url.encode(),
                      hashlib.sha256).hexdigest()
    return f"w-{digest[:12]}"


def forward_signature(secret: str, group: str, method: str, path_qs: str,
                      operator_b64: str, at: str) -> str:
    """HMAC-SHA256 (hex) of a forwarded request under the workers' shared secret."""
    message = "\n".join(("bizcenter-forward-v1", group, method.upper(), path_qs,
                         operator_b64, at))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def forward_headers(secret: str, group: str, method: str, path_qs: str, operator_id: str,
                    now: float) -> dict[str, str]:
    """The headers with which a worker vouches for the operator it authenticated."""
    operator_b64 = base64.urlsafe_b64encode(operator_id.encode()).decode()
    at = str(int(now))
    return {
        FORWARDED_OPERATOR_HEADER: operator_b64,
        FORWARDED_AT_HEADER: at,
        FORWARD_SIGNATURE_HEADER: forward_signature(secret, group, method, path_qs,
                                                    operator_b64, at),
    }


class QueryViews:
    """What the three views share: authentication, forwarding (details), the answer as
    JSON."""

    def __init__(self, app: Any, runtime: Any) -> None:
        self.app = app
        self.runtime = runtime
        self._secret = runtime.settings.web_forward_secret.get_secret_value()
        self._group = runtime.settings.app_id
        self._served_by = {SERVED_BY_HEADER: served_by_tag(
            self._secret, str(self.app.conf.canonical_url))}

    async def serve(self, view: web.View, request: web.Request,
                    query: Callable[[UserRecord], QueryRequest], *,
                    owned: tuple[str, str] | None = None) -> web.Response:
        """Authenticate, then answer; ``owned``: the (Faust table, key) whose owner answers
        (forwarded there), None: answered here (the account tables, PostgreSQL)."""
        try:
            if any(h in request.headers for h in _FORWARD_HEADERS):
                user = await self._forwarded_operator(request)
                if owned is not None and not self._owns(*owned):
                    raise _unavailable("the partitions are being reassigned; retry")
            else:
                user = await self._authenticate(request)
                if owned is not None:
                    forwarded = await self._forward_if_elsewhere(view, request, *owned,
                                                                 user)
                    if forwarded is not None:
                        return forwarded
            if owned is not None and getattr(self.app, "in_recovery", False):
                raise _unavailable("the tables are being recovered; retry")
            answer: Answer = await self._answer(query(user))
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

    async def _answer(self, request: QueryRequest) -> Answer:
        """The answer from the tables. Details are authorized on what the table holds
        before anything waits: someone else's transfer is answered at once."""
        if request.type == CommandType.QUERY_TRANSACTION_DETAILS.value:
            service = self.runtime.service
            transfer_id = str(request.params.get("transferId", ""))
            now: Answer = await service.answer(request)
            if await service.transfers.get(transfer_id) is not None and (
                    not now.ok or await service.transfer_settled(transfer_id)):
                return now  # not the operator's (same answer as unknown), or final
        answer: Answer = await self.runtime.answer(request)  # waits only if it may be theirs
        return answer

    def _error(self, view: web.View, status: int, code: ErrorCode, message: str
               ) -> web.Response:
        return view.json({"code": code.value, "message": message}, status=status,
                         headers=self._served_by)

    def _owner(self, table: str, key: str) -> str:
        owner = self.runtime.owner_url(table, key.encode())
        if owner is None:
            raise _unavailable("the partitions are being reassigned; retry")
        return str(owner)

    def _owns(self, table: str, key: str) -> bool:
        return _ident(self._owner(table, key)) == _ident(str(self.app.conf.canonical_url))

    async def _forward_if_elsewhere(self, view: web.View, request: web.Request, table: str,
                                    key: str, user: UserRecord) -> web.Response | None:
        owner = self._owner(table, key)  # a worker of this group: the group's assignment
        if _ident(owner) == _ident(str(self.app.conf.canonical_url)):
            return None
        path_qs = str(request.rel_url)
        headers = forward_headers(self._secret, self._group, request.method, path_qs,
                                  user.user_id, time.time())
        url = URL(owner.rstrip("/") + path_qs, encoded=True)
        try:
            async with self.app.http_client.get(
                url, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS),
            ) as response:
                body = await response.read()
                served_by = response.headers.get(SERVED_BY_HEADER)
                return view.bytes(body, content_type="application/json",
                                  status=response.status,
                                  headers={SERVED_BY_HEADER: served_by} if served_by else {})
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The owner's address goes to the log only, never to the client.
            log.warning("cannot forward %s to %s: %s", request.url.path, owner,
                        type(exc).__name__)
            raise _unavailable("the worker owning this key does not answer; retry") from None

    async def _forwarded_operator(self, request: web.Request) -> UserRecord:
        """The operator another worker of the group authenticated, if its signature holds."""
        operator_b64 = request.headers.get(FORWARDED_OPERATOR_HEADER, "")
        at = request.headers.get(FORWARDED_AT_HEADER, "")
        signature = request.headers.get(FORWARD_SIGNATURE_HEADER, "")
        expected = forward_signature(self._secret, self._group, request.method,
                                     str(request.rel_url), operator_b64, at)
        refused = HttpError(401, ErrorCode.UNAUTHENTICATED, "invalid forwarded request")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            log.warning("refused a forwarded request with a bad signature: %s",
                        request.url.path)
            raise refused
        try:
            sent_at = int(at)
            operator_id = base64.urlsafe_b64decode(operator_b64.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            raise refused from None
        if abs(time.time() - sent_at) > FORWARD_MAX_AGE_SECONDS or not operator_id:
            raise refused
        return await self._active_user(operator_id)

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

            return await views.serve(self, request, query, owned=("transfers", transfer_id))
