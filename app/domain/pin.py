"""PIN verifiers: a keyed hash (HMAC-SHA256, server-side pepper), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac


def pin_verifier(pepper: bytes, user_id: str, pin: str) -> str:
    """The stored form of a PIN. The user id salts it so equal PINs differ."""
    return hmac.new(pepper, f"{user_id}\x1f{pin}".encode(), hashlib.sha256).hexdigest()


def pin_matches(pepper: bytes, user_id: str, pin: str, verifier: str) -> bool:
    return hmac.compare_digest(pin_verifier(pepper, user_id, pin), verifier)
