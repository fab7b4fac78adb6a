"""The user center's part in development: access tokens as it would issue them.

Another team's system in production (it signs the access tokens the gateway forwards);
here only for demos, ``bizcenter token``, the tests and the benchmark. The product
verifies these tokens with :class:`app.tokens.AccessTokenVerifier` and never imports this
module.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from app.tokens import ACCESS_ALGORITHMS, ACCESS_TOKEN_TYP, TokenSettings


def _aware_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def issue_access_token(
    settings: TokenSettings,
    user_id: str,
    *,
    ttl_seconds: int = 900,
    now: datetime | None = None,
    private_key: str | None = None,
    algorithm: str | None = None,
    kid: str | None = None,
) -> str:
    """An access token as the user center would issue it (demos, CLI and tests only).

    The header names a ``kid``: ``kid`` if given, else the first kid of the settings' key
    set. HS* tokens are signed with that kid's key unless ``private_key`` is given;
    RS*/PS*/ES*/EdDSA need ``private_key`` (PEM). ``algorithm`` defaults to the first
    pinned algorithm of the settings.
    """
    alg = algorithm or settings.access_token_algorithms[0]
    if alg not in ACCESS_ALGORITHMS:
        raise ValueError(f"unsupported access token algorithm: {alg}")
    key_set = settings.access_token_key_set()
    if kid is None:
        kid = next((k for k in key_set if k is not None), None)
    if private_key is not None:
        key: str = private_key
    elif alg.startswith("HS"):
        if kid not in key_set:
            raise ValueError("kid is not in the key set")
        key = key_set[kid]
    else:
        raise ValueError(f"{alg} access tokens need private_key (settings hold the public key)")
    issued_at = _aware_utc(now).replace(microsecond=0)
    payload: dict[str, Any] = {
        "iss": settings.access_token_issuer,
        "aud": settings.access_token_audience,
        "sub": user_id,
        "iat": int(issued_at.timestamp()),
        "exp": int((issued_at + timedelta(seconds=ttl_seconds)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    headers: dict[str, Any] = {"typ": ACCESS_TOKEN_TYP}
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, key, algorithm=alg, headers=headers)
