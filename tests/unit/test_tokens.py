"""Unit tests of app.tokens: access tokens (user center) and transfer tokens (ours). No broker.

Over 400 lines: both kinds of token side by side, as in app/tokens.py: their confusions
(audience, typ, keys) are tested against each other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import SecretStr

from app.settings import Settings
from app.tokens import (
    TRANSFER_TOKEN_TYP,
    AccessIdentity,
    AccessTokenVerifier,
    TokenError,
    TransferClaims,
    TransferTokens,
)
from reference.user_center import issue_access_token
from schemas.wire import ErrorCode

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
ACCESS_SECRET = "access-secret-for-tests-" + "a" * 48  # 72 bytes: fine for HS256..HS512
TRANSFER_SECRET = "transfer-secret-for-tests-" + "t" * 40
ISSUER = "user-center"
AUDIENCE = "business-center"
LEEWAY = 10
TTL = 300


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def access_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": ts(NOW),
        "exp": ts(NOW + timedelta(minutes=15)),
    }
    for name, value in overrides.items():
        if value is DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


DROP = object()


def encode(
    claims: dict[str, Any],
    key: Any = ACCESS_SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def hand_signed_hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWS built by hand (PyJWT refuses PEM keys as HMAC secrets)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def pem_private(key: Any) -> str:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode()


def pem_public(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def raises_token_error(call: Callable[[], object], code: ErrorCode) -> TokenError:
    with pytest.raises(TokenError) as info:
        call()
    assert info.value.code is code
    return info.value


@pytest.fixture()
def verifier() -> AccessTokenVerifier:
    return AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)


@pytest.fixture()
def transfers() -> TransferTokens:
    return TransferTokens(TRANSFER_SECRET, ttl_seconds=TTL, leeway_seconds=LEEWAY)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue_transfer(
    transfers: TransferTokens, *, note: str | None = "rent", now: datetime = NOW
) -> tuple[str, datetime]:
    return transfers.issue(
        jti="tok-1",
        operator_id="alice",
        from_account_id="acc-alice",
        to_account_id="acc-bob",
        amount_minor=12_345,
        currency="EUR",
        note=note,
        now=now,
    )


def transfer_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "business-center",
        "aud": "business-center:transfer-confirm",
        "sub": "alice",
        "jti": "tok-1",
        "iat": ts(NOW),
        "exp": ts(NOW + timedelta(seconds=TTL)),
        "from": "acc-alice",
        "to": "acc-bob",
        "amt": 500,
        "cur": "EUR",
    }
    for name, value in overrides.items():
        if value is DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


TRANSFER_HEADERS = {"typ": TRANSFER_TOKEN_TYP}


# --------------------------------------------------------------------------------------
# access tokens: HS256 basics
# --------------------------------------------------------------------------------------


def test_valid_hs256_access_token(verifier: AccessTokenVerifier) -> None:
    identity = verifier.verify(encode(access_claims()), "alice", now=NOW)
    assert identity == AccessIdentity(
        user_id="alice", expires_at=NOW.replace(microsecond=0) + timedelta(minutes=15)
    )
    assert identity.expires_at.tzinfo is not None


def test_issue_access_token_round_trip_with_settings() -> None:
    settings = Settings(access_token_key=SecretStr(ACCESS_SECRET))
    token = issue_access_token(settings, "alice", ttl_seconds=60, now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    identity = AccessTokenVerifier.from_settings(settings).verify(token, "alice", now=NOW)
    assert identity.expires_at == NOW + timedelta(seconds=60)


def test_from_settings_with_development_defaults_works_on_the_wall_clock() -> None:
    settings = Settings()
    token = issue_access_token(settings, "bob")
    assert AccessTokenVerifier.from_settings(settings).verify(token, "bob").user_id == "bob"


def test_tampered_payload_rejected(verifier: AccessTokenVerifier) -> None:
    header, _, signature = encode(access_claims()).split(".")
    forged = f"{header}.{b64json(access_claims(sub='mallory'))}.{signature}"
    err = raises_token_error(
        lambda: verifier.verify(forged, "mallory", now=NOW), ErrorCode.UNAUTHENTICATED
    )
    assert err.message == "invalid access token"


def test_tampered_signature_rejected(verifier: AccessTokenVerifier) -> None:
    header, payload, signature = encode(access_claims()).split(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    raises_token_error(
        lambda: verifier.verify(f"{header}.{payload}.{flipped}", "alice", now=NOW),
        ErrorCode.UNAUTHENTICATED,
    )


def test_token_signed_with_another_secret_rejected(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims(), key="another-secret-" + "x" * 40)
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b", "a.b.c", "....", "é.é.é", "x" * 10_000],
    ids=["empty", "one-part", "two-parts", "junk", "dots", "non-ascii", "oversized"],
)
def test_malformed_tokens_rejected(verifier: AccessTokenVerifier, garbage: str) -> None:
    raises_token_error(
        lambda: verifier.verify(garbage, "alice", now=NOW), ErrorCode.UNAUTHENTICATED
    )


def test_non_string_token_rejected(verifier: AccessTokenVerifier) -> None:
    raises_token_error(
        lambda: verifier.verify(None, "alice", now=NOW),  # type: ignore[arg-type]
        ErrorCode.UNAUTHENTICATED,
    )


def test_payload_that_is_not_an_object_rejected(verifier: AccessTokenVerifier) -> None:
    token = hand_signed_hs256(
        {"alg": "HS256", "typ": "JWT"},
        ["not", "an", "object"],  # type: ignore[arg-type]
        ACCESS_SECRET.encode(),
    )
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_unknown_critical_header_rejected(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims(), headers={"crit": ["x-unknown"], "x-unknown": 1})
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_naive_now_is_a_programming_error(verifier: AccessTokenVerifier) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verifier.verify(encode(access_claims()), "alice", now=NOW.replace(tzinfo=None))


# --------------------------------------------------------------------------------------
# access tokens: time claims
# --------------------------------------------------------------------------------------

EXP = NOW + timedelta(minutes=15)


@pytest.mark.parametrize(
    ("now", "accepted"),
    [
        (EXP - timedelta(seconds=1), True),
        (EXP, True),  # within leeway
        (EXP + timedelta(seconds=LEEWAY - 1), True),  # within leeway
        (EXP + timedelta(seconds=LEEWAY), False),
        (EXP + timedelta(hours=1), False),
    ],
    ids=["before", "at-exp", "in-leeway", "leeway-edge", "long-ago"],
)
def test_expiry_with_leeway(verifier: AccessTokenVerifier, now: datetime, accepted: bool) -> None:
    token = encode(access_claims())
    if accepted:
        assert verifier.verify(token, "alice", now=now).user_id == "alice"
    else:
        err = raises_token_error(
            lambda: verifier.verify(token, "alice", now=now), ErrorCode.UNAUTHENTICATED
        )
        assert err.message == "access token expired"


def test_expired_token_on_the_wall_clock(verifier: AccessTokenVerifier) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=1)
    token = encode(access_claims(iat=ts(long_ago), exp=ts(long_ago + timedelta(minutes=5))))
    err = raises_token_error(lambda: verifier.verify(token, "alice"), ErrorCode.UNAUTHENTICATED)
    assert err.message == "access token expired"


@pytest.mark.parametrize(
    ("iat_offset", "accepted"),
    [(LEEWAY - 1, True), (LEEWAY + 1, False), (3600, False)],
    ids=["future-in-leeway", "future-beyond-leeway", "an-hour-ahead"],
)
def test_iat_in_the_future(verifier: AccessTokenVerifier, iat_offset: int, accepted: bool) -> None:
    token = encode(access_claims(iat=ts(NOW) + iat_offset, exp=ts(NOW) + iat_offset + 900))
    if accepted:
        verifier.verify(token, "alice", now=NOW)
    else:
        err = raises_token_error(
            lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED
        )
        assert err.message == "invalid access token"


def test_nbf_in_the_future_rejected(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims(nbf=ts(NOW) + 600))
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)
    assert verifier.verify(token, "alice", now=NOW + timedelta(seconds=600)).user_id == "alice"


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": "2030"},
        {"exp": True},
        {"iat": "now"},
        {"iat": None},
        {"exp": 1e300},
        {"exp": -5},
        {"nbf": "soon"},
        {"exp": ts(NOW) - 100},
    ],
    ids=[
        "exp-str",
        "exp-bool",
        "iat-str",
        "iat-null",
        "exp-huge",
        "exp-negative",
        "nbf-str",
        "exp-before-iat",
    ],
)
def test_badly_typed_time_claims_rejected(
    verifier: AccessTokenVerifier, bad: dict[str, Any]
) -> None:
    token = encode(access_claims(**bad))
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


# --------------------------------------------------------------------------------------
# access tokens: algorithms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2ln"], ids=["empty-sig", "some-sig"])
def test_alg_none_rejected(verifier: AccessTokenVerifier, alg: str, signature: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(access_claims())}.{signature}"
    err = raises_token_error(
        lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED
    )
    assert err.message == "invalid access token"


def test_missing_alg_rejected(verifier: AccessTokenVerifier) -> None:
    signing_input = f"{b64json({'typ': 'JWT'})}.{b64json(access_claims())}"
    sig = hmac.new(ACCESS_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    raises_token_error(
        lambda: verifier.verify(f"{signing_input}.{b64url(sig)}", "alice", now=NOW),
        ErrorCode.UNAUTHENTICATED,
    )


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_unpinned_hmac_algorithm_rejected(verifier: AccessTokenVerifier, alg: str) -> None:
    token = encode(access_claims(), algorithm=alg)  # right secret, wrong algorithm
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_several_pinned_hmac_algorithms() -> None:
    both = AccessTokenVerifier(["HS256", "HS512"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)
    for alg in ("HS256", "HS512"):
        assert both.verify(encode(access_claims(), algorithm=alg), "alice", now=NOW)
    raises_token_error(
        lambda: both.verify(encode(access_claims(), algorithm="HS384"), "alice", now=NOW),
        ErrorCode.UNAUTHENTICATED,
    )


@pytest.mark.parametrize("kind", ["RS256", "EdDSA", "ES256"])
def test_asymmetric_access_tokens(
    kind: str,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    private = {"RS256": rsa_key, "EdDSA": ed_key, "ES256": ec_key}[kind]
    settings = Settings(
        access_token_algorithms=[kind],
        access_token_key=SecretStr(pem_public(private)),
    )
    verifier = AccessTokenVerifier.from_settings(settings)
    token = issue_access_token(
        settings, "alice", now=NOW, private_key=pem_private(private), algorithm=kind
    )
    assert jwt.get_unverified_header(token)["alg"] == kind
    assert verifier.verify(token, "alice", now=NOW).user_id == "alice"
    # A token signed by another key of the same type is refused.
    factories: dict[str, Callable[[], Any]] = {
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    }
    other = factories[kind]()
    forged = encode(access_claims(), key=other, algorithm=kind)
    raises_token_error(lambda: verifier.verify(forged, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize("kind", ["RS256", "EdDSA", "ES256"])
@pytest.mark.parametrize("hs_alg", ["HS256"])
def test_key_confusion_attack_rejected(
    kind: str,
    hs_alg: str,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    """RFC 8725 §2.1: an HS256 token whose HMAC secret is the verifier's PEM public key."""
    public_pem = pem_public({"RS256": rsa_key, "EdDSA": ed_key, "ES256": ec_key}[kind])
    verifier = AccessTokenVerifier([kind], public_pem, ISSUER, AUDIENCE, LEEWAY)
    forged = hand_signed_hs256({"alg": hs_alg, "typ": "JWT"}, access_claims(), public_pem.encode())
    raises_token_error(lambda: verifier.verify(forged, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_rs256_token_against_eddsa_verifier_rejected(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    verifier = AccessTokenVerifier(["EdDSA"], pem_public(ed_key), ISSUER, AUDIENCE, LEEWAY)
    token = encode(access_claims(), key=rsa_key, algorithm="RS256")
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


# --------------------------------------------------------------------------------------
# access tokens: configuration is checked at construction
# --------------------------------------------------------------------------------------


def test_public_key_refused_as_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="HS256"):
        AccessTokenVerifier(["HS256"], pem_public(rsa_key), ISSUER, AUDIENCE, LEEWAY)


@pytest.mark.parametrize(
    ("algorithms", "key", "match"),
    [
        ([], ACCESS_SECRET, "at least one"),
        (["none"], ACCESS_SECRET, "unsupported"),
        (["HS256", "none"], ACCESS_SECRET, "unsupported"),
        (["HS256", "RS256"], ACCESS_SECRET, "mix"),
        (["HS256"], "short-secret", "too short"),
        (["HS512"], "x" * 48, "too short"),  # RFC 7518 §3.2: 64 bytes for HS512
        (["RS256"], ACCESS_SECRET, "PEM public key"),
    ],
)
def test_bad_configuration_refused(algorithms: list[str], key: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AccessTokenVerifier(algorithms, key, ISSUER, AUDIENCE, LEEWAY)


def test_algorithms_must_be_a_list_not_a_string() -> None:
    with pytest.raises(TypeError):
        AccessTokenVerifier("HS256", ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)


def test_key_must_suit_every_pinned_algorithm(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    with pytest.raises(ValueError, match="ES256"):
        AccessTokenVerifier(["RS256", "ES256"], pem_public(rsa_key), ISSUER, AUDIENCE, LEEWAY)
    with pytest.raises(ValueError, match="RS256"):
        AccessTokenVerifier(["RS256"], pem_public(ed_key), ISSUER, AUDIENCE, LEEWAY)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="ES256"):
        AccessTokenVerifier(["ES256"], pem_public(p384), ISSUER, AUDIENCE, LEEWAY)
    with pytest.raises(ValueError, match="PEM public key"):  # a private key is not configured
        AccessTokenVerifier(["RS256"], pem_private(rsa_key), ISSUER, AUDIENCE, LEEWAY)


def test_weak_rsa_key_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with pytest.raises(ValueError, match="weak"):
        AccessTokenVerifier(["RS256"], pem_public(weak), ISSUER, AUDIENCE, LEEWAY)


def test_verifier_repr_hides_the_key(verifier: AccessTokenVerifier) -> None:
    assert ACCESS_SECRET not in repr(verifier)
    assert "HS256" in repr(verifier)


# --------------------------------------------------------------------------------------
# access tokens: claims
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss", "aud"])
def test_missing_required_claim_rejected(verifier: AccessTokenVerifier, claim: str) -> None:
    token = encode(access_claims(**{claim: DROP}))
    err = raises_token_error(
        lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED
    )
    assert err.message == "invalid access token"


@pytest.mark.parametrize(
    "bad",
    [
        {"iss": "evil-center"},
        {"iss": ["user-center"]},
        {"aud": "someone-else"},
        {"aud": ["someone-else"]},
        {"aud": "business-center:transfer-confirm"},
        {"sub": ""},
        {"sub": 42},
        {"sub": ["alice"]},
    ],
    ids=[
        "wrong-iss",
        "iss-list",
        "wrong-aud",
        "wrong-aud-list",
        "transfer-aud",
        "empty-sub",
        "int-sub",
        "list-sub",
    ],
)
def test_wrong_claims_rejected(verifier: AccessTokenVerifier, bad: dict[str, Any]) -> None:
    # By hand: PyJWT refuses to encode some of these (e.g. a non-string iss).
    token = hand_signed_hs256(
        {"alg": "HS256", "typ": "JWT"}, access_claims(**bad), ACCESS_SECRET.encode()
    )
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_audience_list_containing_ours_accepted(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims(aud=["wallet-app", AUDIENCE]))
    assert verifier.verify(token, "alice", now=NOW).user_id == "alice"


def test_operator_other_than_subject_is_forbidden(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims(sub="alice"))
    err = raises_token_error(lambda: verifier.verify(token, "bob", now=NOW), ErrorCode.FORBIDDEN)
    assert "alice" not in err.message and "bob" not in err.message


def test_invalid_token_for_another_operator_is_unauthenticated(
    verifier: AccessTokenVerifier,
) -> None:
    """Validity is checked before ownership: no FORBIDDEN oracle for forged tokens."""
    token = encode(access_claims(sub="alice"), key="wrong-secret-" + "z" * 40)
    raises_token_error(lambda: verifier.verify(token, "bob", now=NOW), ErrorCode.UNAUTHENTICATED)


# --------------------------------------------------------------------------------------
# the two token kinds never stand in for one another
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_secret", [False, True], ids=["own-secrets", "same-secret"])
def test_transfer_token_presented_as_access_token(shared_secret: bool) -> None:
    transfers = TransferTokens(ACCESS_SECRET if shared_secret else TRANSFER_SECRET, TTL, LEEWAY)
    verifier = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)
    token, _ = issue_transfer(transfers)
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize("typ", ["transfer+jwt", "Transfer+JWT", "application/transfer+jwt"])
def test_access_token_with_transfer_typ_rejected(verifier: AccessTokenVerifier, typ: str) -> None:
    """Even with the access audience and issuer, the transfer `typ` is refused."""
    token = encode(access_claims(), headers={"typ": typ})
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "application/at+jwt"])
def test_access_token_typ_is_otherwise_free(verifier: AccessTokenVerifier, typ: str) -> None:
    assert verifier.verify(encode(access_claims(), headers={"typ": typ}), "alice", now=NOW)


@pytest.mark.parametrize("shared_secret", [False, True], ids=["own-secrets", "same-secret"])
def test_access_token_presented_as_transfer_token(shared_secret: bool) -> None:
    settings = Settings(access_token_key=SecretStr(ACCESS_SECRET))
    transfers = TransferTokens(ACCESS_SECRET if shared_secret else TRANSFER_SECRET, TTL, LEEWAY)
    token = issue_access_token(settings, "alice", now=NOW)
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)
    raises_token_error(
        lambda: transfers.verify(token, NOW, check_expiry=False), ErrorCode.UNAUTHENTICATED
    )


# --------------------------------------------------------------------------------------
# transfer tokens
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("note", ["rent", None])
def test_transfer_token_round_trip(transfers: TransferTokens, note: str | None) -> None:
    token, expires_at = issue_transfer(transfers, note=note)
    assert expires_at == NOW + timedelta(seconds=TTL)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "transfer+jwt"}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["sub"] == "alice" and payload["amt"] == 12_345
    assert ("note" in payload) is (note is not None)
    claims = transfers.verify(token, NOW + timedelta(seconds=TTL - 1))
    assert claims == TransferClaims(
        jti="tok-1",
        operator_id="alice",
        from_account_id="acc-alice",
        to_account_id="acc-bob",
        amount_minor=12_345,
        currency="EUR",
        note=note,
        issued_at=NOW,
        expires_at=expires_at,
    )


def test_transfer_token_expiry_is_consistent_with_sub_second_now(
    transfers: TransferTokens,
) -> None:
    now = NOW + timedelta(microseconds=654_321)
    token, expires_at = issue_transfer(transfers, now=now)
    assert expires_at == NOW + timedelta(seconds=TTL)
    assert transfers.verify(token, now).expires_at == expires_at


def test_transfer_token_from_settings() -> None:
    settings = Settings(
        transfer_token_secret=SecretStr(TRANSFER_SECRET), transfer_token_ttl_seconds=60
    )
    transfers = TransferTokens.from_settings(settings)
    token, expires_at = issue_transfer(transfers)
    assert expires_at == NOW + timedelta(seconds=60)
    assert transfers.verify(token, NOW).jti == "tok-1"
    assert TRANSFER_SECRET not in repr(transfers)


@pytest.mark.parametrize(
    ("elapsed", "expired"),
    [(TTL - 1, False), (TTL + LEEWAY - 1, False), (TTL + LEEWAY, True), (86_400, True)],
)
def test_expired_transfer_token(transfers: TransferTokens, elapsed: int, expired: bool) -> None:
    token, _ = issue_transfer(transfers)
    later = NOW + timedelta(seconds=elapsed)
    if expired:
        err = raises_token_error(lambda: transfers.verify(token, later), ErrorCode.TOKEN_EXPIRED)
        assert err.message == "transfer token expired"
    else:
        assert transfers.verify(token, later).jti == "tok-1"
    # Without the expiry check an old token is still recognised (idempotent duplicates).
    assert transfers.verify(token, later, check_expiry=False).amount_minor == 12_345


def test_check_expiry_false_still_verifies_everything_else(transfers: TransferTokens) -> None:
    token, _ = issue_transfer(transfers)
    later = NOW + timedelta(days=2)
    header, _, signature = token.split(".")
    forged = f"{header}.{b64json(transfer_claims(amt=999_999))}.{signature}"
    raises_token_error(
        lambda: transfers.verify(forged, later, check_expiry=False), ErrorCode.UNAUTHENTICATED
    )
    other = TransferTokens("another-transfer-secret-" + "q" * 40, TTL, LEEWAY)
    foreign, _ = issue_transfer(other)
    raises_token_error(
        lambda: transfers.verify(foreign, later, check_expiry=False), ErrorCode.UNAUTHENTICATED
    )
    early = encode(
        transfer_claims(iat=ts(NOW) + 3600, exp=ts(NOW) + 3600 + TTL),
        key=TRANSFER_SECRET,
        headers=TRANSFER_HEADERS,
    )
    raises_token_error(
        lambda: transfers.verify(early, NOW, check_expiry=False), ErrorCode.UNAUTHENTICATED
    )


def test_hand_made_transfer_token_with_our_secret_accepted(transfers: TransferTokens) -> None:
    """Sanity check of the crafting helper used by the rejection tests below."""
    token = encode(transfer_claims(), key=TRANSFER_SECRET, headers=TRANSFER_HEADERS)
    assert transfers.verify(token, NOW).amount_minor == 500


@pytest.mark.parametrize(
    "amt",
    [500.0, 500.5, "500", True, 0, -500, None, [500]],
    ids=["float", "fraction", "string", "bool", "zero", "negative", "null", "list"],
)
def test_transfer_amount_must_be_a_positive_int(transfers: TransferTokens, amt: Any) -> None:
    token = encode(transfer_claims(amt=amt), key=TRANSFER_SECRET, headers=TRANSFER_HEADERS)
    err = raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)
    assert err.message == "invalid transfer token"


@pytest.mark.parametrize(
    "bad",
    [
        {"jti": DROP},
        {"sub": DROP},
        {"from": DROP},
        {"to": DROP},
        {"cur": DROP},
        {"exp": DROP},
        {"iat": DROP},
        {"iss": DROP},
        {"aud": DROP},
        {"cur": "eur"},
        {"cur": 978},
        {"note": 5},
        {"from": ""},
        {"to": 7},
        {"jti": 1},
        {"iss": "user-center"},
        {"aud": "business-center"},
        {"aud": ["business-center:transfer-confirm"]},
    ],
    ids=lambda bad: "-".join(f"{k}={'missing' if v is DROP else v!r}" for k, v in bad.items()),
)
def test_transfer_claims_validated(transfers: TransferTokens, bad: dict[str, Any]) -> None:
    token = encode(transfer_claims(**bad), key=TRANSFER_SECRET, headers=TRANSFER_HEADERS)
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize(
    "headers",
    [None, {"typ": "JWT"}, {"typ": "at+jwt"}, {"typ": 1}],
    ids=["default-JWT", "JWT", "at+jwt", "non-string"],
)
def test_transfer_token_needs_its_typ(transfers: TransferTokens, headers: Any) -> None:
    token = encode(transfer_claims(), key=TRANSFER_SECRET, headers=headers)
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_transfer_token_algorithm_pinned(transfers: TransferTokens, alg: str) -> None:
    token = encode(transfer_claims(), key=TRANSFER_SECRET, algorithm=alg, headers=TRANSFER_HEADERS)
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)


def test_transfer_token_alg_none_rejected(transfers: TransferTokens) -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'transfer+jwt'})}.{b64json(transfer_claims())}."
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)
    raises_token_error(
        lambda: transfers.verify(token, NOW, check_expiry=False), ErrorCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"amount_minor": 1.5},
        {"amount_minor": True},
        {"amount_minor": 0},
        {"currency": "eur"},
        {"jti": ""},
        {"operator_id": ""},
    ],
)
def test_transfer_issue_validates_its_input(
    transfers: TransferTokens, kwargs: dict[str, Any]
) -> None:
    base: dict[str, Any] = {
        "jti": "j",
        "operator_id": "alice",
        "from_account_id": "a",
        "to_account_id": "b",
        "amount_minor": 1,
        "currency": "EUR",
        "note": None,
        "now": NOW,
    }
    with pytest.raises(ValueError):
        transfers.issue(**(base | kwargs))


@pytest.mark.parametrize(
    ("args", "match"),
    [(("short", TTL, LEEWAY), "at least 32 bytes"), ((TRANSFER_SECRET, 0, LEEWAY), "ttl")],
)
def test_transfer_tokens_configuration_checked(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TransferTokens(*args)


# --------------------------------------------------------------------------------------
# errors never carry the token
# --------------------------------------------------------------------------------------


def _failures(rsa_key: rsa.RSAPrivateKey) -> list[tuple[str, Callable[[], object]]]:
    verifier = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)
    rs_verifier = AccessTokenVerifier(["RS256"], pem_public(rsa_key), ISSUER, AUDIENCE, LEEWAY)
    transfers = TransferTokens(TRANSFER_SECRET, TTL, LEEWAY)
    valid = encode(access_claims())
    transfer, _ = issue_transfer(transfers)
    none_token = f"{b64json({'alg': 'none'})}.{b64json(access_claims())}."
    garbage = "not-a-jwt-but-secret-looking-" + "s" * 40
    cases: list[tuple[str, Callable[[], object]]] = [
        (valid, lambda: verifier.verify(valid, "alice", now=NOW + timedelta(days=1))),
        (valid, lambda: verifier.verify(valid, "bob", now=NOW)),
        (valid[:-3], lambda: verifier.verify(valid[:-3], "alice", now=NOW)),
        (none_token, lambda: verifier.verify(none_token, "alice", now=NOW)),
        (garbage, lambda: verifier.verify(garbage, "alice", now=NOW)),
        (valid, lambda: rs_verifier.verify(valid, "alice", now=NOW)),
        (transfer, lambda: verifier.verify(transfer, "alice", now=NOW)),
        (valid, lambda: transfers.verify(valid, NOW)),
        (transfer, lambda: transfers.verify(transfer, NOW + timedelta(days=1))),
        (transfer[:-2], lambda: transfers.verify(transfer[:-2], NOW)),
        (garbage, lambda: transfers.verify(garbage, NOW, check_expiry=False)),
    ]
    return cases


def test_token_error_never_contains_the_token(rsa_key: rsa.RSAPrivateKey) -> None:
    for token, call in _failures(rsa_key):
        with pytest.raises(TokenError) as info:
            call()
        err = info.value
        rendered = [
            err.message,
            str(err),
            repr(err),
            repr(err.args),
            "".join(traceback.format_exception(err)),
        ]
        for text in rendered:
            for piece in (token, *[p for p in token.split(".") if len(p) > 8]):
                assert piece not in text
        assert str(err) == err.message
        assert repr(err) == f"TokenError(code={err.code.value!r}, message={err.message!r})"
        # Suppressed context: no library exception (and its message) rides along.
        assert err.__cause__ is None
        assert err.__context__ is None or err.__suppress_context__


def test_token_error_pickles() -> None:
    err = TokenError(ErrorCode.TOKEN_EXPIRED, "transfer token expired")
    copy = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own bytes
    assert (copy.code, copy.message, str(copy)) == (err.code, err.message, str(err))


# --------------------------------------------------------------------------------------
# the stand-in user center
# --------------------------------------------------------------------------------------


def test_issue_access_token_for_public_key_algorithm_needs_a_private_key(
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    settings = Settings(
        access_token_algorithms=["EdDSA"],
        access_token_key=SecretStr(pem_public(ed_key)),
    )
    with pytest.raises(ValueError, match="private_key"):
        issue_access_token(settings, "alice")


def test_issue_access_token_claims() -> None:
    settings = Settings(access_token_key=SecretStr(ACCESS_SECRET))
    token = issue_access_token(settings, "alice", ttl_seconds=120, now=NOW)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["iss"] == settings.access_token_issuer
    assert payload["aud"] == settings.access_token_audience
    assert payload["sub"] == "alice"
    assert payload["exp"] - payload["iat"] == 120
    assert isinstance(payload["jti"], str) and payload["jti"]


# --------------------------------------------------------------------------------------
# key rotation: a key set selected by kid
# --------------------------------------------------------------------------------------

K1 = "key-one-for-tests-" + "1" * 40
K2 = "key-two-for-tests-" + "2" * 40


def key_set(*entries: tuple[str, str]) -> SecretStr:
    return SecretStr(json.dumps([{"kid": kid, "key": key} for kid, key in entries]))


def test_a_key_set_verifies_each_token_with_the_key_its_kid_names() -> None:
    verifier = AccessTokenVerifier(["HS256"], {"k1": K1, "k2": K2}, ISSUER, AUDIENCE, LEEWAY)
    for kid, key in (("k1", K1), ("k2", K2)):
        token = encode(access_claims(), key=key, headers={"kid": kid})
        assert verifier.verify(token, "alice", now=NOW).user_id == "alice"
    refused = {
        "signed with k1, naming k2": encode(access_claims(), key=K1, headers={"kid": "k2"}),
        "unknown kid, signed with a known key": encode(access_claims(), key=K1,
                                                       headers={"kid": "k3"}),
        "empty kid": encode(access_claims(), key=K1, headers={"kid": ""}),
        "kid not a string": hand_signed_hs256({"alg": "HS256", "kid": 1}, access_claims(),
                                              K1.encode()),
        "no kid (the set has no key for it)": encode(access_claims(), key=K1),
    }
    for what, token in refused.items():
        err = raises_token_error(lambda t=token: verifier.verify(t, "alice", now=NOW),
                                 ErrorCode.UNAUTHENTICATED)
        assert err.message == "invalid access token", what
    assert verifier.kids == ("k1", "k2")
    assert K1 not in repr(verifier) and K2 not in repr(verifier)


def test_rotation_with_an_overlap_through_the_settings() -> None:
    before = Settings(access_token_keys=key_set(("k1", K1)))
    during = Settings(access_token_keys=key_set(("k2", K2), ("k1", K1)))
    after = Settings(access_token_keys=key_set(("k2", K2)))
    old_token = issue_access_token(before, "alice", now=NOW)
    new_token = issue_access_token(during, "alice", now=NOW)  # signs with the first kid
    assert jwt.get_unverified_header(old_token)["kid"] == "k1"
    assert jwt.get_unverified_header(new_token)["kid"] == "k2"
    overlap = AccessTokenVerifier.from_settings(during)
    for token in (old_token, new_token):
        assert overlap.verify(token, "alice", now=NOW).user_id == "alice"
    raises_token_error(lambda: AccessTokenVerifier.from_settings(after).verify(
        old_token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)  # k1 retired
    raises_token_error(lambda: AccessTokenVerifier.from_settings(before).verify(
        new_token, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)  # k2 not yet known
    # With a key set, a token without a kid is refused unless BIZ_ACCESS_TOKEN_KEY is set
    # too (moving from the single key): then that key verifies it, and only it.
    no_kid = encode(access_claims(), key=ACCESS_SECRET)
    raises_token_error(lambda: AccessTokenVerifier.from_settings(during).verify(
        no_kid, "alice", now=NOW), ErrorCode.UNAUTHENTICATED)
    moving = Settings(access_token_keys=key_set(("k2", K2)),
                      access_token_key=SecretStr(ACCESS_SECRET))
    assert AccessTokenVerifier.from_settings(moving).verify(no_kid, "alice", now=NOW)
    raises_token_error(lambda: AccessTokenVerifier.from_settings(moving).verify(
        encode(access_claims(), key=K2), "alice", now=NOW), ErrorCode.UNAUTHENTICATED)


def test_the_single_key_accepts_no_kid_and_the_default_kid_only() -> None:
    settings = Settings(access_token_key=SecretStr(ACCESS_SECRET))
    verifier = AccessTokenVerifier.from_settings(settings)
    issued = issue_access_token(settings, "alice", now=NOW)
    assert jwt.get_unverified_header(issued)["kid"] == "default"  # the issuer sets a kid
    for token in (issued, encode(access_claims(), key=ACCESS_SECRET),
                  encode(access_claims(), key=ACCESS_SECRET, headers={"kid": "default"})):
        assert verifier.verify(token, "alice", now=NOW).user_id == "alice"
    raises_token_error(lambda: verifier.verify(
        encode(access_claims(), key=ACCESS_SECRET, headers={"kid": "k9"}), "alice", now=NOW),
        ErrorCode.UNAUTHENTICATED)


def test_a_key_set_never_mixes_hmac_secrets_and_public_keys(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(ValueError, match="kid k2"):
        AccessTokenVerifier(["HS256"], {"k1": K1, "k2": pem_public(rsa_key)}, ISSUER,
                            AUDIENCE, LEEWAY)
    with pytest.raises(ValueError, match="kid k2"):
        AccessTokenVerifier(["RS256"], {"k1": pem_public(rsa_key), "k2": K1}, ISSUER,
                            AUDIENCE, LEEWAY)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = AccessTokenVerifier(["RS256"], {"a": pem_public(rsa_key),
                                               "b": pem_public(other)},
                                   ISSUER, AUDIENCE, LEEWAY)
    for kid, private in (("a", rsa_key), ("b", other)):
        token = encode(access_claims(), key=private, algorithm="RS256", headers={"kid": kid})
        assert verifier.verify(token, "alice", now=NOW).user_id == "alice"
    swapped = encode(access_claims(), key=rsa_key, algorithm="RS256", headers={"kid": "b"})
    raises_token_error(lambda: verifier.verify(swapped, "alice", now=NOW),
                       ErrorCode.UNAUTHENTICATED)
    # The public key of kid a used as an HMAC secret (algorithm confusion): refused.
    confused = hand_signed_hs256({"alg": "HS256", "kid": "a"}, access_claims(),
                                 pem_public(rsa_key).encode())
    raises_token_error(lambda: verifier.verify(confused, "alice", now=NOW),
                       ErrorCode.UNAUTHENTICATED)


@pytest.mark.parametrize("text", [
    "not json", '{"kid": "k1"}', '[{"kid": "k1"}]', '[{"key": "x"}]',
    '[{"kid": "", "key": "x"}]',
    f'[{{"kid": "k1", "key": "{K1}"}}, {{"kid": "k1", "key": "{K2}"}}]',
])
def test_a_malformed_key_set_is_refused_without_showing_a_key(text: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        Settings(access_token_keys=SecretStr(text))
    shown = str(info.value.errors(include_input=False, include_url=False))
    assert K1 not in shown and K2 not in shown


# --------------------------------------------------------------------------------------
# the verified-access-token cache (app/tokens.py, module docstring: why it is safe)
# --------------------------------------------------------------------------------------


def _counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full verification (``jwt.decode_complete`` in app.tokens) is recorded."""
    import app.tokens as tokens_module

    calls: list[str] = []
    real = tokens_module.jwt.decode_complete

    def counted(token: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(tokens_module.jwt, "decode_complete", counted)
    return calls


def test_cache_a_repeated_token_is_verified_once(
    verifier: AccessTokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _counting_decodes(monkeypatch)
    token = encode(access_claims())
    first = verifier.verify(token, "alice", now=NOW)
    for seconds in (1, 60, 600):
        assert verifier.verify(token, "alice", now=NOW + timedelta(seconds=seconds)) == first
    assert decodes == [token]
    assert verifier.cached_tokens == 1


def test_cache_a_cached_token_past_its_exp_is_refused(
    verifier: AccessTokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _counting_decodes(monkeypatch)
    token = encode(access_claims(exp=ts(NOW + timedelta(seconds=60))))
    verifier.verify(token, "alice", now=NOW)
    # Within the leeway: still accepted; past exp + leeway: expired, from the cache.
    verifier.verify(token, "alice", now=NOW + timedelta(seconds=60 + LEEWAY - 1))
    for later in (60 + LEEWAY, 60 + LEEWAY + 1, 86_400):
        err = raises_token_error(
            lambda s=later: verifier.verify(token, "alice", now=NOW + timedelta(seconds=s)),
            ErrorCode.UNAUTHENTICATED)
        assert err.message == "access token expired"
    assert decodes == [token]  # the refusals came from the cache, not from a re-decode
    # As before, check_expiry=False (a reply re-sent to the same request) still passes.
    assert verifier.verify(token, "alice", now=NOW + timedelta(days=1),
                           check_expiry=False).user_id == "alice"


def test_cache_time_claims_are_checked_against_each_calls_now(
    verifier: AccessTokenVerifier
) -> None:
    token = encode(access_claims(nbf=ts(NOW)))
    verifier.verify(token, "alice", now=NOW)
    # An earlier `now` (pinned by a caller): iat and nbf in its future, refused as invalid.
    err = raises_token_error(
        lambda: verifier.verify(token, "alice", now=NOW - timedelta(seconds=LEEWAY + 1)),
        ErrorCode.UNAUTHENTICATED)
    assert err.message == "invalid access token"


def test_cache_a_token_for_another_operator_is_refused_from_the_cache_too(
    verifier: AccessTokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _counting_decodes(monkeypatch)
    token = encode(access_claims())
    verifier.verify(token, "alice", now=NOW)
    err = raises_token_error(lambda: verifier.verify(token, "mallory", now=NOW),
                             ErrorCode.FORBIDDEN)
    assert err.message == "the access token does not belong to the operator"
    assert decodes == [token]
    # Cached first for the wrong operator: refused, and the right one still accepted.
    other = encode(access_claims(sub="bob"))
    raises_token_error(lambda: verifier.verify(other, "alice", now=NOW), ErrorCode.FORBIDDEN)
    raises_token_error(lambda: verifier.verify(other, "alice", now=NOW), ErrorCode.FORBIDDEN)
    assert verifier.verify(other, "bob", now=NOW).user_id == "bob"


def test_cache_a_tampered_token_never_hits_the_cache(
    verifier: AccessTokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = encode(access_claims())
    verifier.verify(token, "alice", now=NOW)
    decodes = _counting_decodes(monkeypatch)
    header, payload, signature = token.split(".")
    tampered = {
        "payload": f"{header}.{b64json(access_claims(sub='mallory'))}.{signature}",
        "signature": f"{header}.{payload}.{('B' if signature[0] == 'A' else 'A')}"
                     f"{signature[1:]}",
        "a character appended": token + "A",
        "the header": f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'x': 1})}.{payload}."
                      f"{signature}",
    }
    for what, forged in tampered.items():
        for operator in ("alice", "mallory"):
            err = raises_token_error(lambda f=forged, o=operator: verifier.verify(f, o, now=NOW),
                                     ErrorCode.UNAUTHENTICATED)
            assert err.message == "invalid access token", what
    # Each forged token went through the full verification, every time, and none is kept.
    assert len(decodes) == 2 * len(tampered)
    assert verifier.cached_tokens == 1


def test_cache_failures_are_never_cached(
    verifier: AccessTokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = _counting_decodes(monkeypatch)
    wrong_key = encode(access_claims(), key="another-secret-" + "x" * 40)
    for _ in range(3):
        raises_token_error(lambda: verifier.verify(wrong_key, "alice", now=NOW),
                           ErrorCode.UNAUTHENTICATED)
    assert decodes == [wrong_key] * 3 and verifier.cached_tokens == 0
    # A genuine token whose iat is ahead of `now`: what the signature and claims proved is
    # kept, the time checks refuse it on every call until its iat is reached.
    future = encode(access_claims(iat=ts(NOW + timedelta(minutes=5))))
    for _ in range(3):
        err = raises_token_error(lambda: verifier.verify(future, "alice", now=NOW),
                                 ErrorCode.UNAUTHENTICATED)
        assert err.message == "invalid access token"
    assert verifier.verify(future, "alice", now=NOW + timedelta(minutes=5)).user_id == "alice"
    assert decodes.count(future) == 1


def test_cache_is_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY,
                                   cache_size=3)
    tokens = [encode(access_claims(jti=str(i))) for i in range(5)]
    for token in tokens[:3]:
        verifier.verify(token, "alice", now=NOW)
    verifier.verify(tokens[0], "alice", now=NOW)  # tokens[0] is now the most recent
    verifier.verify(tokens[3], "alice", now=NOW)  # evicts tokens[1]
    assert verifier.cached_tokens == 3
    decodes = _counting_decodes(monkeypatch)
    for token in (tokens[0], tokens[2], tokens[3]):
        verifier.verify(token, "alice", now=NOW)
    assert decodes == []
    verifier.verify(tokens[1], "alice", now=NOW)
    assert decodes == [tokens[1]]
    for token in tokens:
        verifier.verify(token, "alice", now=NOW)
    assert verifier.cached_tokens == 3
    # A long token is verified every time, never stored; cache_size=0 stores nothing.
    from app.tokens import MAX_CACHED_TOKEN_LENGTH

    long_token = encode(access_claims(pad="x" * MAX_CACHED_TOKEN_LENGTH))
    verifier.verify(long_token, "alice", now=NOW)
    verifier.verify(long_token, "alice", now=NOW)
    assert decodes.count(long_token) == 2
    none = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY,
                               cache_size=0)
    none.verify(tokens[0], "alice", now=NOW)
    assert none.cached_tokens == 0
    with pytest.raises(ValueError, match="cache_size"):
        AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY, cache_size=-1)


def test_cache_follows_the_key_set() -> None:
    """An entry hits only while its kid selects the very key that verified it: a key
    withdrawn or replaced in place (or a new verifier after a rotation) verifies again."""
    verifier = AccessTokenVerifier(["HS256"], {"k1": K1, "k2": K2}, ISSUER, AUDIENCE, LEEWAY)
    token = encode(access_claims(), key=K1, headers={"kid": "k1"})
    verifier.verify(token, "alice", now=NOW)
    assert verifier.cached_tokens == 1
    keys = verifier._keys  # the verifier's prepared key set (fixed for its life)
    withdrawn = keys.pop("k1")
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW),
                       ErrorCode.UNAUTHENTICATED)
    keys["k1"] = K2.encode()  # k1 now names another secret: the token is not its
    raises_token_error(lambda: verifier.verify(token, "alice", now=NOW),
                       ErrorCode.UNAUTHENTICATED)
    keys["k1"] = withdrawn
    assert verifier.verify(token, "alice", now=NOW).user_id == "alice"
    verifier.clear_cache()
    assert verifier.cached_tokens == 0
    # A rotation is a new verifier: it knows nothing of the old one's tokens.
    rotated = AccessTokenVerifier(["HS256"], {"k2": K2}, ISSUER, AUDIENCE, LEEWAY)
    raises_token_error(lambda: rotated.verify(token, "alice", now=NOW),
                       ErrorCode.UNAUTHENTICATED)


def test_cache_never_shows_a_token(verifier: AccessTokenVerifier) -> None:
    token = encode(access_claims())
    verifier.verify(token, "alice", now=NOW)
    assert token not in repr(verifier)
    err = raises_token_error(lambda: verifier.verify(token, "mallory", now=NOW),
                             ErrorCode.FORBIDDEN)
    assert token not in repr(err) and token not in str(err)


@pytest.mark.parametrize("operator", ["alice", "bob"])
@pytest.mark.parametrize("check_expiry", [True, False])
@pytest.mark.parametrize("offset", [-3600, -LEEWAY - 1, -LEEWAY, 0, 899, 900 + LEEWAY - 1,
                                    900 + LEEWAY, 86_400])
def test_cache_answers_as_the_full_verification(
    operator: str, check_expiry: bool, offset: int
) -> None:
    """A cached and an uncached verifier answer every (token, operator, now,
    check_expiry) alike."""
    token = encode(access_claims(nbf=ts(NOW)))
    cached = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY)
    cached.verify(token, "alice", now=NOW)
    fresh = AccessTokenVerifier(["HS256"], ACCESS_SECRET, ISSUER, AUDIENCE, LEEWAY,
                                cache_size=0)
    now = NOW + timedelta(seconds=offset)

    def outcome(v: AccessTokenVerifier) -> object:
        try:
            return v.verify(token, operator, now=now, check_expiry=check_expiry)
        except TokenError as err:
            return (err.code, err.message)

    assert outcome(cached) == outcome(fresh)
    assert cached.cached_tokens == 1


# --------------------------------------------------------------------------------------
# transfer tokens: this service's own header, checked without PyJWT
# --------------------------------------------------------------------------------------


def _signed(header: dict[str, Any] | str, body: bytes, secret: str = TRANSFER_SECRET) -> str:
    """``header.body.signature`` signed HS256 with ``secret``; ``header`` a dict (compact
    JSON in the dict's order) or a ready segment."""
    import hashlib
    import hmac

    head = header if isinstance(header, str) else b64url(
        json.dumps(header, separators=(",", ":")).encode())
    signing_input = f"{head}.{b64url(body)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


OUR_HEADER = {"alg": "HS256", "typ": TRANSFER_TOKEN_TYP}  # PyJWT's order: sorted
OTHER_SPELLING = {"typ": TRANSFER_TOKEN_TYP, "alg": "HS256"}  # the same header, not ours


def test_tokens_of_pyjwt_and_of_this_service_are_one_format(transfers: TransferTokens) -> None:
    """A token issued here is what PyJWT verifies with the same checks, and one PyJWT
    issues (earlier versions of this service) has this service's header segment."""
    token, _ = issue_transfer(transfers, note="loyer · été")
    decoded = jwt.decode_complete(token, TRANSFER_SECRET, algorithms=["HS256"],
                                  audience="business-center:transfer-confirm",
                                  issuer="business-center",
                                  options={"verify_exp": False, "verify_iat": False})
    assert decoded["header"] == OUR_HEADER
    assert decoded["payload"]["note"] == "loyer · été" and decoded["payload"]["amt"] == 12_345
    by_pyjwt = encode(transfer_claims(), key=TRANSFER_SECRET, headers=TRANSFER_HEADERS)
    assert by_pyjwt.split(".")[0] == token.split(".")[0] == _signed(OUR_HEADER, b"{}").split(
        ".")[0]
    assert transfers.verify(by_pyjwt, NOW).amount_minor == 500


_PAYLOADS: list[Any] = [
    transfer_claims(),
    transfer_claims(note="ünïcode ✓"),
    transfer_claims(extra={"nested": [1, 2]}),
    *(transfer_claims(**{name: None}) for name in (
        "iss", "aud", "sub", "jti", "iat", "exp", "from", "to", "amt", "cur")),
    transfer_claims(iss="user-center"),
    transfer_claims(iss=["business-center"]),
    transfer_claims(aud=["business-center:transfer-confirm"]),
    transfer_claims(aud="business-center"),
    transfer_claims(sub=7),
    transfer_claims(jti=["tok"]),
    transfer_claims(amt=True),
    transfer_claims(exp=ts(NOW) - 3600),
    transfer_claims(iat=ts(NOW) + 3600),
    [1, 2, 3],
    "a string",
]


@pytest.mark.parametrize("payload", _PAYLOADS, ids=lambda p: json.dumps(p)[:60])
def test_this_service_s_header_is_checked_as_pyjwt_checks_another(
        transfers: TransferTokens, payload: Any) -> None:
    """The same payload signed under this service's header (checked here) and under
    another spelling of it (checked by PyJWT) gets the same answer: the same claims, or
    the same refusal."""
    def outcome(header: dict[str, Any]) -> Any:
        token = _signed(header, json.dumps(payload).encode())
        try:
            return transfers.verify(token, NOW)
        except TokenError as err:
            return err.code

    assert outcome(OUR_HEADER) == outcome(OTHER_SPELLING)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _other_spelling(last: str) -> str:
    """The last character of a 32-byte value's base64url (43 characters) carries 4 bits
    and 2 unused ones: flipping an unused bit spells the same bytes otherwise."""
    return _ALPHABET[_ALPHABET.index(last) ^ 1]


@pytest.mark.parametrize("mangle", [
    lambda t: t + "=",                                   # padded signature
    lambda t: t[:-1] + ("B" if t[-1] == "A" else "A"),   # another signature
    lambda t: t[:-1] + _other_spelling(t[-1]),          # the same bytes, spelled otherwise
    lambda t: t + ".x",                                  # four segments
    lambda t: t.rsplit(".", 1)[0] + ".",                 # no signature
    lambda t: t.rsplit(".", 1)[0],                       # two segments
    lambda t: t.split(".")[0] + ".!!!." + t.split(".")[2],  # not base64url
    lambda t: t.split(".")[0] + "." + t.split(".")[1] + "=." + t.split(".")[2],
], ids=["padded", "other-signature", "non-canonical", "four", "empty-signature", "two",
        "alphabet", "padded-payload"])
def test_a_mangled_token_of_this_service_s_header_is_refused(
        transfers: TransferTokens, mangle: Callable[[str], str]) -> None:
    token, _ = issue_transfer(transfers)
    assert transfers.verify(token, NOW).jti == "tok-1"
    raises_token_error(lambda: transfers.verify(mangle(token), NOW), ErrorCode.UNAUTHENTICATED)


def test_a_token_signed_with_another_secret_under_our_header_is_refused(
        transfers: TransferTokens) -> None:
    token = _signed(OUR_HEADER, json.dumps(transfer_claims()).encode(),
                    secret="another-transfer-secret-" + "q" * 40)
    raises_token_error(lambda: transfers.verify(token, NOW), ErrorCode.UNAUTHENTICATED)
