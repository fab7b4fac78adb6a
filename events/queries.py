"""The ``business.queries`` record: what the command side forwards once the caller of a
query is authenticated and known, keyed by the caller's account, or the transfer for
details (the tables that answer it are PostgreSQL's: any worker reads them)."""

from __future__ import annotations

import orjson

from schemas.wire import (
    CommandEnvelope,
    QueryRequest,
    QueryTransactionDetailsPayload,
    WireModel,
)


def query_record(env: CommandEnvelope, payload: WireModel, account_id: str,
                 currency: str) -> tuple[bytes, bytes]:
    """Key and value of the ``business.queries`` record of an authenticated query: keyed
    by the caller's account, or by the transfer for details, so that it reaches the
    partition of the tables that answer it."""
    request = QueryRequest(
        request_id=env.request_id, idempotency_key=env.idempotency_key,
        operator_id=env.operator_id, account_id=account_id, currency=currency,
        type=env.type.value, params=payload.to_wire(),
    )
    key = (payload.transfer_id if isinstance(payload, QueryTransactionDetailsPayload)
           else account_id)
    return key.encode(), orjson.dumps(request.to_wire())
