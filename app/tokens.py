"""JSON Web Tokens of the business center (RFC 7519), handled per RFC 8725 (JWT BCP).

Why one module: it answers one question, is this token acceptable (RFC 8725), for the two
kinds the business center sees. They share the checks that matter (time claims against an
explicit ``now``, ``typ``, the claim readers, the keys, the one error type that never holds
a token), and what keeps them from being confused with each other (audience, ``typ``, keys
never mixed) is reviewed by reading both side by side.

Two kinds of token, kept apart by audience *and* by explicit typing (RFC 8725 §3.11):

* **access tokens**, issued by the user center: verified by :class:`AccessTokenVerifier`
  against a pinned algorithm list and a key set configured next to it, the key chosen by
  the token's ``kid`` (never by its ``alg``; an unknown ``kid`` is refused), so that the
  user center can rotate keys with an overlap; ``none`` is never accepted; HMAC secrets
  and public keys are never mixed.
* **transfer tokens**, issued by this service between ``transferInit`` and
  ``transferConfirm``: short-lived HS256 JWTs with header ``typ: transfer+jwt``, handled by
  :class:`TransferTokens`. A token carrying the very header segment this service writes
  (every one it issued, PyJWT's spelling too) is signed and checked without PyJWT (16 µs
  to issue against 84, 35 to verify against 145, measured: PyJWT prepares the key and
  re-checks its options on every call; ~6 % of the worker's CPU): strict base64url, the HMAC
  compared in constant time, then the same claim checks; any other header goes through
  PyJWT as before (tests/unit/test_tokens.py compares the two paths on the same payloads).

Time claims (``exp``, ``iat``, ``nbf``) are checked here against an explicit ``now`` with
the configured leeway, not by PyJWT against the wall clock, so that callers and tests can
pin time. Nothing in this module ever puts a token into an exception, a log line or a repr.

**The verified-access-token cache** (:class:`AccessTokenVerifier`). A gateway sends the
same access token with every command of a user for its whole life (minutes), and a full
verification (parsing, base64 and JSON checks, HMAC or signature, claims) costs
~100-130 µs of CPU here, the largest piece of a transfer's business CPU. So each verifier
keeps a bounded LRU of the tokens it verified: the full token string → what verification
proved (the subject, the NumericDates, the kid and the key object used). Why it is safe:

* **Keyed by the whole token, exactly.** A hit needs a string equal, character for
  character, to one that passed the full verification (header, payload *and* signature:
  the dict compares the strings after the hash, and ``str`` hashing is randomised per
  process, so no crafted collision helps). Any change to any part (a tampered claim, a
  forged or re-encoded signature, another ``kid`` or ``alg``) is another string: a miss,
  verified in full. Only a token whose key, signature, ``typ``, ``iss``, ``aud``, ``sub``
  and time claims' form all passed is stored; any other failure is never cached, so such
  a token is refused again by the full path every time, and the cache cannot be filled by
  an attacker without genuine tokens (the work per refused token is what it was).
* **What depends on the moment or the caller is checked on every hit.** ``exp`` (with the
  leeway, unless ``check_expiry=False`` as before), ``iat`` and ``nbf`` are checked against
  the ``now`` of *this* call with the same function as the full path, from the numbers the
  verification read, so a cached token past its ``exp`` is refused as ``access token
  expired`` exactly when an uncached one would be; the subject is compared with *this*
  call's ``operator_id``, so a token of another operator is ``FORBIDDEN`` from the cache
  too.
* **Key rotation and revocation.** A hit also requires that the token's ``kid`` still
  selects, in the verifier's key set, the very key object that verified it (an identity
  check). The key set is fixed for a verifier's life (a rotation is a new
  ``BIZ_ACCESS_TOKEN_KEYS`` and so a new verifier, with an empty cache); should the key
  set ever be replaced in place, entries verified under a removed or replaced key stop
  hitting at once, and :meth:`AccessTokenVerifier.clear_cache` empties it. Access tokens
  have no revocation list in this service (they are short-lived and self-contained);
  withdrawing a key is the revocation, and it takes effect as above.
* **Bounded.** At most ``cache_size`` entries (least recently used evicted first), and
  only tokens of at most :data:`MAX_CACHED_TOKEN_LENGTH` characters are stored: memory is
  bounded whatever the traffic. Entries hold what the process already held while
  verifying (the token arrives in a Kafka record); nothing of the cache is ever logged,
  put in an exception or in a repr.
* **The same answers.** For any token, operator, ``now`` and ``check_expiry``, a hit
  returns or raises exactly what the full verification would (tests/unit/test_tokens.py,
  "cache").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import jwt
import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options
from pydantic import SecretStr

from schemas.wire import ErrorCode

__all__ = [
    "ACCESS_ALGORITHMS",
    "ACCESS_TOKEN_TYP",
    "MAX_CACHED_TOKEN_LENGTH",
    "MAX_TOKEN_LENGTH",
    "TRANSFER_TOKEN_TYP",
    "AccessIdentity",
    "AccessTokenVerifier",
    "TokenError",
    "TokenSettings",
    "TransferClaims",
    "TransferTokens",
]

#: Header ``typ`` of transfer tokens (explicit typing, RFC 8725 §3.11).
TRANSFER_TOKEN_TYP: Final = "transfer+jwt"  # noqa: S105 - a media type, not a secret
#: Header ``typ`` written by the stand-in user center (RFC 9068). Not required on input.
ACCESS_TOKEN_TYP: Final = "at+jwt"  # noqa: S105 - a media type, not a secret
#: Longer inputs are refused before any parsing.
MAX_TOKEN_LENGTH: Final = 8192
#: Longer access tokens are verified every time, never cached (bounds the cache's memory).
MAX_CACHED_TOKEN_LENGTH: Final = 2048
#: Verified access tokens a verifier remembers by default (least recently used evicted).
ACCESS_CACHE_SIZE: Final = 4096

#: Algorithms an access-token verifier may be pinned to. ``none`` is never one of them.
ACCESS_ALGORITHMS: Final = frozenset(
    {
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "EdDSA",
    }
)
_TRANSFER_ALGORITHM: Final = "HS256"
#: The header segment of every transfer token this service issues, byte for byte what
#: PyJWT writes for it (compact JSON, sorted keys): tokens of earlier versions, issued by
#: PyJWT, have it too.
_TRANSFER_HEADER: Final = base64.urlsafe_b64encode(json.dumps(
    {"alg": _TRANSFER_ALGORITHM, "typ": TRANSFER_TOKEN_TYP}, separators=(",", ":"),
    sort_keys=True).encode()).rstrip(b"=").decode("ascii")
#: The claims a transfer token must carry, none null (PyJWT's ``require``).
_TRANSFER_REQUIRED: Final = ("iss", "aud", "sub", "jti", "iat", "exp", "from", "to", "amt",
                             "cur")
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_MIN_TRANSFER_SECRET_BYTES: Final = 32  # RFC 7518 §3.2: at least the hash output size.
# NumericDate bounds accepted (1970 .. 9999-12-31): keeps datetime conversion total.
_MAX_NUMERIC_DATE: Final = 253_402_300_799
_CURRENCY: Final = re.compile(r"[A-Z]{3}")

_ACCESS_INVALID: Final = "invalid access token"
_ACCESS_EXPIRED: Final = "access token expired"
_ACCESS_FORBIDDEN: Final = "the access token does not belong to the operator"
_TRANSFER_INVALID: Final = "invalid transfer token"
_TRANSFER_EXPIRED: Final = "transfer token expired"

# Errors the decoding of a hostile token may raise. PyJWT wraps nearly everything in
# PyJWTError; the rest are listed so that no crafted input can escape as a crash.
_DECODE_ERRORS: Final = (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError)


class TokenSettings(Protocol):
    """The fields of :class:`app.settings.Settings` this module reads."""

    @property
    def access_token_algorithms(self) -> Sequence[str]: ...
    @property
    def access_token_key(self) -> SecretStr: ...
    def access_token_key_set(self) -> Mapping[str | None, str]: ...
    @property
    def access_token_issuer(self) -> str: ...
    @property
    def access_token_audience(self) -> str: ...
    @property
    def jwt_leeway_seconds(self) -> int: ...
    @property
    def transfer_token_secret(self) -> SecretStr: ...
    @property
    def transfer_token_ttl_seconds(self) -> int: ...


class TokenError(Exception):
    """A token was refused. ``message`` is safe to show to the client; it never holds the token."""

    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"TokenError(code={self.code.value!r}, message={self.message!r})"


@dataclass(frozen=True, slots=True)
class AccessIdentity:
    """The verified subject of an access token."""

    user_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TransferClaims:
    """The verified content of a transfer token."""

    jti: str
    operator_id: str
    from_account_id: str
    to_account_id: str
    amount_minor: int
    currency: str
    note: str | None
    issued_at: datetime
    expires_at: datetime


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: the token is invalid (mapped to the caller's error code)."""


class _Expired(Exception):
    """Internal: the token is valid but past its ``exp`` (plus leeway)."""


def _aware_utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _normalise_typ(value: object) -> str | None:
    """RFC 7515 §4.1.9: media types compare case-insensitively, ``application/`` optional."""
    if not isinstance(value, str):
        return None
    lowered = value.strip().lower()
    return lowered.removeprefix("application/")


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2) or None when absent; anything else is invalid."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(name)
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= _MAX_NUMERIC_DATE:
        raise _Invalid(name)
    return number


def _check_times(
    payload: Mapping[str, Any], now: datetime, leeway: float, *, check_expiry: bool
) -> tuple[datetime, datetime]:
    """Validate ``iat``/``nbf``/``exp`` against ``now``; returns (issued_at, expires_at)."""
    exp, iat, nbf = _time_claims(payload)
    _check_instants(exp, iat, nbf, now.timestamp(), leeway, check_expiry=check_expiry)
    return datetime.fromtimestamp(iat, UTC), datetime.fromtimestamp(exp, UTC)


def _time_claims(payload: Mapping[str, Any]) -> tuple[float, float, float | None]:
    """(exp, iat, nbf) as numbers; ``exp`` and ``iat`` are required."""
    exp = _numeric_date(payload, "exp")
    iat = _numeric_date(payload, "iat")
    nbf = _numeric_date(payload, "nbf")
    if exp is None or iat is None:
        raise _Invalid("exp/iat")
    return exp, iat, nbf


def _check_instants(exp: float, iat: float, nbf: float | None, instant: float,
                    leeway: float, *, check_expiry: bool) -> None:
    """The time checks of a token against ``instant`` (POSIX seconds): the one rule of
    the full verification and of a cache hit."""
    if iat > instant + leeway:
        raise _Invalid("iat in the future")
    if nbf is not None and nbf > instant + leeway:
        raise _Invalid("not yet valid")
    if exp <= iat:
        raise _Invalid("exp before iat")
    if check_expiry and exp <= instant - leeway:
        raise _Expired


def _str_claim(payload: Mapping[str, Any], name: str, max_length: int = 256) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise _Invalid(name)
    return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2): the alphabet only, no padding, and the canonical
    encoding of what it decodes to (no second spelling of the same bytes)."""
    if not _BASE64URL.fullmatch(segment):
        raise _Invalid("base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64url(data) != segment:
        raise _Invalid("base64url")
    return data


def _acceptable_input(token: object) -> bool:
    return isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH


def _hmac_key(algorithm: str, secret: str) -> bytes:
    """The HMAC key for ``algorithm``; refuses public keys and short secrets (RFC 7518 §3.2)."""
    alg = jwt.get_algorithm_by_name(algorithm)
    try:
        key = alg.prepare_key(secret.encode("utf-8"))
    except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unusable {algorithm} secret: {type(exc).__name__}") from None
    if alg.check_key_length(key):
        raise ValueError(f"{algorithm} secret too short (RFC 7518 §3.2)")
    assert isinstance(key, bytes)
    return key


def _prepare_access_key(algs: tuple[str, ...], key: str) -> Any:
    """One key of the access-token key set, checked against every pinned algorithm."""
    if not isinstance(key, str):
        raise ValueError("an access token key must be a string")
    if algs[0].startswith("HS"):
        keys = {_hmac_key(a, key) for a in algs}
        return keys.pop()
    try:
        prepared = load_pem_public_key(key.encode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"access token key is not a PEM public key: {type(exc).__name__}"
        ) from None
    for a in algs:
        alg = jwt.get_algorithm_by_name(a)
        try:
            alg.prepare_key(prepared)
        except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"access token key does not suit {a}: {type(exc).__name__}"
            ) from None
        if alg.check_key_length(prepared):
            raise ValueError(f"access token key too weak for {a}")
    return prepared


# --------------------------------------------------------------------------------------
# access tokens
# --------------------------------------------------------------------------------------


class AccessTokenVerifier:
    """Verifies access tokens issued by the user center.

    ``algorithms`` is the pinned allow-list handed to PyJWT; ``key`` is the HMAC secret for
    HS* or the PEM public key (SubjectPublicKeyInfo) for RS*/PS*/ES*/EdDSA, loaded once here;
    or a key set, ``{kid: key}``, where the ``None`` kid is the key of tokens that carry no
    ``kid`` (a plain ``key`` is exactly ``{None: key}``). A token's ``kid`` selects its key;
    a ``kid`` not in the set, or a token without one when the set has no ``None`` key, is
    refused. Every key must suit every pinned algorithm, so HMAC and public-key algorithms
    can never be mixed (RFC 8725 §3.1) and a misconfiguration fails at start-up.

    Tokens that passed verification are remembered, at most ``cache_size`` of them (0: no
    cache); a repeated token is answered from what its verification proved, with the time
    claims, the operator and the key re-checked on each call (why that is safe: the module
    docstring).
    """

    __slots__ = ("_algorithms", "_audience", "_cache", "_cache_size", "_issuer", "_keys",
                 "_leeway", "_options")

    def __init__(
        self,
        algorithms: Sequence[str],
        key: str | Mapping[str | None, str],
        issuer: str,
        audience: str,
        leeway_seconds: int,
        *,
        cache_size: int = ACCESS_CACHE_SIZE,
    ) -> None:
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a sequence of algorithm names")
        algs = tuple(dict.fromkeys(algorithms))
        if not algs:
            raise ValueError("at least one access token algorithm must be pinned")
        unsupported = [a for a in algs if a not in ACCESS_ALGORITHMS]
        if unsupported:
            raise ValueError(f"unsupported access token algorithms: {unsupported}")
        if len({a.startswith("HS") for a in algs}) > 1:
            raise ValueError("do not mix HMAC and public-key algorithms (RFC 8725 §3.1)")
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")

        key_set: Mapping[str | None, str] = {None: key} if isinstance(key, str) else key
        if not key_set:
            raise ValueError("at least one access token key is required")
        prepared: dict[str | None, Any] = {}
        for kid, one in key_set.items():
            if kid is not None and (not isinstance(kid, str) or not kid):
                raise ValueError("a kid must be a non-empty string")
            try:
                prepared[kid] = _prepare_access_key(algs, one)
            except ValueError as exc:
                raise ValueError(f"{exc} (kid {kid})" if kid is not None else str(exc)
                                 ) from None

        self._algorithms = list(algs)
        self._keys = prepared
        self._issuer = issuer
        self._audience = audience
        self._leeway = float(leeway_seconds)
        self._cache_size = cache_size
        #: token → what its verification proved; see the module docstring.
        self._cache: OrderedDict[str, _VerifiedAccess] = OrderedDict()
        self._options: Options = {
            "require": ["exp", "iat", "sub", "iss", "aud"],
            "verify_signature": True,
            "verify_iss": True,
            "verify_aud": True,
            "verify_sub": True,
            # Checked against `now` by _check_times.
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
            "enforce_minimum_key_length": True,
        }

    @classmethod
    def from_settings(cls, settings: TokenSettings) -> AccessTokenVerifier:
        return cls(
            algorithms=list(settings.access_token_algorithms),
            key=dict(settings.access_token_key_set()),
            issuer=settings.access_token_issuer,
            audience=settings.access_token_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
        )

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._algorithms)

    @property
    def kids(self) -> tuple[str | None, ...]:
        """The kids of the key set (``None``: tokens without a kid are accepted)."""
        return tuple(self._keys)

    def __repr__(self) -> str:
        return (
            f"AccessTokenVerifier(algorithms={self._algorithms!r}, issuer={self._issuer!r}, "
            f"audience={self._audience!r}, kids={list(self._keys)!r})"
        )

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens are remembered now (never which)."""
        return len(self._cache)

    def clear_cache(self) -> None:
        """Forget every verified token (call it if the key set is ever changed in place)."""
        self._cache.clear()

    def verify(
        self, token: str, operator_id: str, now: datetime | None = None, *,
        check_expiry: bool = True,
    ) -> AccessIdentity:
        """The identity in ``token``, which must belong to ``operator_id``.

        Raises TokenError: UNAUTHENTICATED for any invalid or expired token, FORBIDDEN for
        a valid token of another user. ``check_expiry=False`` still verifies everything
        else; it serves only to re-send a reply already given to this very request.
        """
        current = _aware_utc(now)
        if not _acceptable_input(token):
            raise TokenError(ErrorCode.UNAUTHENTICATED, _ACCESS_INVALID)
        verified = self._cache.get(token)
        # A hit only while the kid still selects the very key that verified the token.
        if verified is None or self._keys.get(verified.kid, _NO_KEY) is not verified.key:
            verified = self._verify_fully(token)
        else:
            self._cache.move_to_end(token)
        try:
            _check_instants(verified.exp, verified.iat, verified.nbf, current.timestamp(),
                            self._leeway, check_expiry=check_expiry)
        except _Expired:
            raise TokenError(ErrorCode.UNAUTHENTICATED, _ACCESS_EXPIRED) from None
        except _Invalid:
            raise TokenError(ErrorCode.UNAUTHENTICATED, _ACCESS_INVALID) from None
        if verified.identity.user_id != operator_id:
            raise TokenError(ErrorCode.FORBIDDEN, _ACCESS_FORBIDDEN)
        return verified.identity

    def _verify_fully(self, token: str) -> _VerifiedAccess:
        """Everything about ``token`` that does not depend on the moment or the caller
        (the key, signature, typ, iss, aud, sub, the time claims' presence and form);
        remembered when it passes. Raises TokenError (UNAUTHENTICATED)."""
        try:
            # The key is chosen by kid from the configured set, never from the token's own
            # claims about itself (alg, jku, jwk, x5u are not read).
            kid = jwt.get_unverified_header(token).get("kid")
            if kid is not None and not isinstance(kid, str):
                raise _Invalid("kid")
            if kid not in self._keys:
                raise _Invalid("unknown kid")
            key = self._keys[kid]
            decoded = jwt.decode_complete(
                token,
                key=key,
                algorithms=self._algorithms,
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
            )
            header: dict[str, Any] = decoded["header"]
            payload: dict[str, Any] = decoded["payload"]
            # An access token is never a transfer token (RFC 8725 §3.11, §3.12).
            if _normalise_typ(header.get("typ")) == TRANSFER_TOKEN_TYP:
                raise _Invalid("typ")
            subject = _str_claim(payload, "sub")
            exp, iat, nbf = _time_claims(payload)
            if exp <= iat:
                raise _Invalid("exp before iat")
        except (_Invalid, *_DECODE_ERRORS):
            raise TokenError(ErrorCode.UNAUTHENTICATED, _ACCESS_INVALID) from None
        verified = _VerifiedAccess(
            AccessIdentity(user_id=subject, expires_at=datetime.fromtimestamp(exp, UTC)),
            exp, iat, nbf, kid, key)
        if self._cache_size and len(token) <= MAX_CACHED_TOKEN_LENGTH:
            self._cache[token] = verified
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)  # the least recently used
        return verified


#: No key (a kid the key set does not have): never the key of a cache entry.
_NO_KEY: Final = object()


@dataclass(frozen=True, slots=True)
class _VerifiedAccess:
    """What the full verification of an access token proved: the identity, the numbers
    of its time claims (re-checked against each call's ``now``), and the kid and key
    object that verified it (re-checked against the key set on each hit)."""

    identity: AccessIdentity
    exp: float
    iat: float
    nbf: float | None
    kid: str | None
    key: Any


# --------------------------------------------------------------------------------------
# transfer tokens
# --------------------------------------------------------------------------------------


class TransferTokens:
    """Issues and verifies the business center's own transfer tokens (HS256, ``transfer+jwt``).

    ``verify`` does not compare the token's operator with the caller: check
    ``claims.operator_id`` against the authenticated operator.
    """

    __slots__ = ("_audience", "_issuer", "_key", "_leeway", "_options", "_ttl")

    def __init__(
        self,
        secret: str,
        ttl_seconds: int,
        leeway_seconds: int,
        issuer: str = "business-center",
        audience: str = "business-center:transfer-confirm",
    ) -> None:
        if len(secret.encode("utf-8")) < _MIN_TRANSFER_SECRET_BYTES:
            raise ValueError(
                f"transfer token secret must be at least {_MIN_TRANSFER_SECRET_BYTES} bytes"
            )
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        if not issuer or not audience:
            raise ValueError("issuer and audience are required")
        self._key = _hmac_key(_TRANSFER_ALGORITHM, secret)
        self._ttl = timedelta(seconds=ttl_seconds)
        self._leeway = float(leeway_seconds)
        self._issuer = issuer
        self._audience = audience
        self._options: Options = {
            "require": ["iss", "aud", "sub", "jti", "iat", "exp", "from", "to", "amt", "cur"],
            "verify_signature": True,
            "verify_iss": True,
            "verify_aud": True,
            "strict_aud": True,
            "verify_sub": True,
            "verify_jti": True,
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
            "enforce_minimum_key_length": True,
        }

    @classmethod
    def from_settings(cls, settings: TokenSettings) -> TransferTokens:
        return cls(
            secret=settings.transfer_token_secret.get_secret_value(),
            ttl_seconds=settings.transfer_token_ttl_seconds,
            leeway_seconds=settings.jwt_leeway_seconds,
        )

    @property
    def ttl(self) -> timedelta:
        return self._ttl

    def __repr__(self) -> str:
        return (
            f"TransferTokens(issuer={self._issuer!r}, audience={self._audience!r}, "
            f"ttl={self._ttl.total_seconds():g}s)"
        )

    def issue(
        self,
        *,
        jti: str,
        operator_id: str,
        from_account_id: str,
        to_account_id: str,
        amount_minor: int,
        currency: str,
        note: str | None,
        now: datetime,
    ) -> tuple[str, datetime]:
        """A signed transfer token and its expiry.

        ``now`` is truncated to whole seconds (NumericDate), so ``expires_at`` is
        ``floor(now) + ttl`` and equals the ``expires_at`` that :meth:`verify` returns.
        """
        for name, value in (
            ("jti", jti),
            ("operator_id", operator_id),
            ("from_account_id", from_account_id),
            ("to_account_id", to_account_id),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor <= 0:
            raise ValueError("amount_minor must be a positive int")
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
            raise ValueError("currency must be three upper-case letters")
        if note is not None and not isinstance(note, str):
            raise ValueError("note must be a string or None")
        issued_at = _aware_utc(now).replace(microsecond=0)
        expires_at = issued_at + self._ttl
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": operator_id,
            "jti": jti,
            "iat": int(issued_at.timestamp()),
            "exp": int(expires_at.timestamp()),
            "from": from_account_id,
            "to": to_account_id,
            "amt": amount_minor,
            "cur": currency,
        }
        if note is not None:
            payload["note"] = note
        # What PyJWT would write (HS256 over ``header.payload``, base64url without
        # padding), without its per-call key preparation and checks (84 µs a token
        # against 16): the header is a constant, the payload built above.
        signing_input = f"{_TRANSFER_HEADER}.{_b64url(orjson.dumps(payload))}"
        signature = hmac.new(self._key, signing_input.encode("ascii"), hashlib.sha256)
        return f"{signing_input}.{_b64url(signature.digest())}", expires_at

    def verify(self, token: str, now: datetime, *, check_expiry: bool = True) -> TransferClaims:
        """The claims of a transfer token issued by this service.

        Raises TokenError: TOKEN_EXPIRED when past ``exp`` (only if ``check_expiry``),
        UNAUTHENTICATED for anything else. With ``check_expiry=False`` everything but the
        expiry is still verified (signature, typ, iss, aud, claims, iat).
        """
        current = _aware_utc(now)
        if not _acceptable_input(token):
            raise TokenError(ErrorCode.UNAUTHENTICATED, _TRANSFER_INVALID)
        try:
            payload = self._payload_of(token)
            amount = payload.get("amt")
            if type(amount) is not int or amount <= 0:
                raise _Invalid("amt")
            currency = payload.get("cur")
            if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
                raise _Invalid("cur")
            note = payload.get("note")
            if note is not None and not isinstance(note, str):
                raise _Invalid("note")
            issued_at, expires_at = _check_times(
                payload, current, self._leeway, check_expiry=check_expiry
            )
            claims = TransferClaims(
                jti=_str_claim(payload, "jti"),
                operator_id=_str_claim(payload, "sub"),
                from_account_id=_str_claim(payload, "from"),
                to_account_id=_str_claim(payload, "to"),
                amount_minor=amount,
                currency=currency,
                note=note,
                issued_at=issued_at,
                expires_at=expires_at,
            )
        except _Expired:
            raise TokenError(ErrorCode.TOKEN_EXPIRED, _TRANSFER_EXPIRED) from None
        except (_Invalid, *_DECODE_ERRORS):
            raise TokenError(ErrorCode.UNAUTHENTICATED, _TRANSFER_INVALID) from None
        return claims

    def _payload_of(self, token: str) -> dict[str, Any]:
        """The payload of a token whose signature, header, and ``iss``/``aud``/``sub``/
        ``jti`` and required claims hold, as PyJWT checks them with ``_options``.

        A token with the header this service writes (every one it issued) is checked here
        directly: exactly three segments, strict base64url, the HMAC compared in constant
        time, a JSON object, the required claims present and not null, ``iss`` and ``aud``
        the expected strings, ``sub`` and ``jti`` strings (35 µs with the claims' checks
        against 145 through PyJWT). Any other header goes through PyJWT, unchanged:
        the algorithm pinned, the ``typ`` compared as a media type."""
        header, _, rest = token.partition(".")
        if header != _TRANSFER_HEADER:
            decoded = jwt.decode_complete(
                token,
                key=self._key,
                algorithms=[_TRANSFER_ALGORITHM],
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
            )
            if _normalise_typ(decoded["header"].get("typ")) != TRANSFER_TOKEN_TYP:
                raise _Invalid("typ")
            payload: dict[str, Any] = decoded["payload"]
            return payload
        body, _, signature = rest.partition(".")
        if "." in signature or not _BASE64URL.fullmatch(body):
            raise _Invalid("segments")
        expected = hmac.new(self._key, f"{header}.{body}".encode("ascii"), hashlib.sha256)
        if not hmac.compare_digest(_b64url_decode(signature), expected.digest()):
            raise _Invalid("signature")
        claims = orjson.loads(_b64url_decode(body))
        if not isinstance(claims, dict):
            raise _Invalid("payload")
        if any(claims.get(name) is None for name in _TRANSFER_REQUIRED):
            raise _Invalid("required claim")
        if (claims["iss"] != self._issuer or not isinstance(claims["aud"], str)
                or claims["aud"] != self._audience or not isinstance(claims["sub"], str)
                or not isinstance(claims["jti"], str)):
            raise _Invalid("iss/aud/sub/jti")
        return claims
