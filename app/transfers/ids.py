"""Which ids does the command side derive, and from what?

Every id is deterministic (UUIDv5 over the scoped input): the same input always yields
the same id, so a redelivered or retried record decides the same thing again and a
re-emitted output is recognisably the same output.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from app.domain import transfer_saga as saga_core

#: Namespaces of the deterministic ids (UUIDv5): the same input always yields the same id.
TRANSFER_NS = uuid.UUID("6f1c1d2e-58a4-4c8e-9a57-2b1f3f0c9a01")
TOKEN_NS = uuid.UUID("0b9e3c44-7d1a-4f0e-8f3a-5c2d7e9b1a02")
#: Attempt ids of top-ups (transfers derive theirs from the transfer token's jti).
ATTEMPT_NS = uuid.UUID("9d4f2b7a-3c1e-4a8b-b6d2-7e0f5a9c1d03")

#: The steps whose commands go to the account center, and to the funding provider: an
#: event answering anything else is not an answer to this service.
ACCOUNT_STEPS = frozenset({"debit", "credit", "refund"})
FUNDING_STEPS = frozenset({"charge"})


def attempt_for(transfer_id: str, nonce: str) -> str:
    """16 hex digits unique to one attempt of a key: the token's jti for a transfer, the
    first request for a top-up. Kept in the idempotency record: every re-decision of the
    key uses the first attempt's id."""
    return _uuid5_hex(_ATTEMPT_NS, f"{transfer_id}\x1f{nonce}")[:saga_core.ATTEMPT_CHARS]


def transfer_id_for(operator_id: str, idempotency_key: str) -> str:
    """The transfer id is the scoped idempotency key, hashed: the saga table's key."""
    return _canonical(_uuid5_hex(_TRANSFER_NS, f"{operator_id}\x1f{idempotency_key}"))


def token_jti_for(operator_id: str, request_id: str) -> str:
    """The jti of the transfer token a transferInit issues, derived from the request: a
    replayed or retried init can never mint a second token able to fund another
    transfer."""
    return _canonical(_uuid5_hex(_TOKEN_NS, f"{operator_id}\x1f{request_id}"))


_TRANSFER_NS, _TOKEN_NS, _ATTEMPT_NS = TRANSFER_NS.bytes, TOKEN_NS.bytes, ATTEMPT_NS.bytes


def _uuid5_hex(namespace: bytes, name: str) -> str:
    """``uuid.uuid5(namespace, name).hex``, without building a ``uuid.UUID`` (a third of
    the time; a few calls per transfer): RFC 4122's SHA-1 name-based UUID, its version
    and variant bits set. Equal to the standard library's for every name (a test checks
    it); a name UTF-8 cannot encode raises as there."""
    digest = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest.hex()


def _canonical(x: str) -> str:
    """32 hex digits in a UUID's canonical form (8-4-4-4-12)."""
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def fingerprint(*parts: object) -> str:
    """What identifies a payload under an idempotency key."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]


#: A UUID in its canonical form, as ``str(uuid.UUID(...))`` writes it (lower-case hex).
_CANONICAL_UUID = re.compile(
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch


def is_transfer_id(value: str) -> bool:
    """A transfer id as this service makes them: a UUID in its canonical form (exactly the
    strings ``s`` with ``str(uuid.UUID(s)) == s``, a test checks it; matched, not parsed:
    a fifth of the time, twice per transfer)."""
    return _CANONICAL_UUID(value) is not None
